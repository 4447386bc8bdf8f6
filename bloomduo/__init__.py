"""bloomduo: BLOOM served by tensor parallelism over gRPC.

Rooms, bottom to top (import-linter's contracts in pyproject.toml keep imports pointing down):
    bloomduo.v1            generated protobuf code of proto/
    bloomduo.core          the shared kernel: logs, metrics, gRPC serving, tensor wire, checkpoint, dtypes
    bloomduo.gateway       the gateway service         (folder gateway/)
    bloomduo.shard_worker  the shard-worker service    (folder shard_worker/)
    bloomduo.client        the Python SDK              (folder client/; knows only bloomduo.v1)
    bloomduo.apps          the `bloomduo` command and its tools (launcher, bench, eval, demo model, ...)
"""

__version__ = "0.1.0"
