"""gRPC server pieces (wire-compatible with NuRec's SensorsimService)."""
