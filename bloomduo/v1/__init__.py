"""Generated gRPC code for bloomduo.v1 (python -m bloomduo.protogen); do not edit."""
