"""bloomduo: BLOOM served by tensor parallelism over gRPC. Shared pieces and the CLI live here."""

__version__ = "0.1.0"
