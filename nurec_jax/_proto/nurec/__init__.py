"""Generated gRPC modules of the renamed NuRec 26.x protos (`nurec.grpc.protos.*`, tools/gen_protos.py); do not edit."""
