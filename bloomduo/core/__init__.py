"""The shared kernel below the services: logs, metrics, gRPC serving, the tensor wire, checkpoints, dtypes."""
