"""Generated gRPC modules (tools/gen_protos.py); do not edit."""
