"""Pallas GPU kernels (installed as `nurec_jax.kernels`)."""
