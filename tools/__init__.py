"""Scripts beside the package (scene generators, benchmarks, protos); the tests import them as `tools.x`."""
