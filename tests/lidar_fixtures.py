"""Flat-disc scenes, small spinning lidar models and sensor poses for the lidar tests (tests/test_lidar.py,
tests/kernels/test_render_pallas.py)."""

import math

import jax.numpy as jnp
import numpy as np

from nurec_jax import lidar_models
from nurec_jax.types import Gaussians, SceneGaussians, Sky

WALL_BEAMS = np.linspace(40.0, -15.0, 16)  # shared by the wall tests, so they share compiled passes


def make_scene(means, normal_axis, *, dtype=np.float32, intensity=0.5, size=0.25, opacity=0.95):
    """Flat overlapping discs (thin along `normal_axis`) with a constant lidar intensity."""
    n = len(means)
    scales = np.full((n, 3), size)
    scales[:, normal_axis] = 0.02
    quats = np.tile([1.0, 0, 0, 0], (n, 1))
    shc = np.zeros((n, 1, 3))
    c = lambda x: jnp.asarray(np.asarray(x, dtype))  # noqa: E731
    static = Gaussians(c(means), c(quats), c(scales), c(np.full(n, opacity)), c(shc), 0)
    empty = Gaussians(
        c(np.zeros((0, 3))), c(np.zeros((0, 4))), c(np.zeros((0, 3))), c(np.zeros(0)), c(np.zeros((0, 1, 3))), 0
    )
    return SceneGaussians(
        static,
        jnp.zeros(n, jnp.int32),
        empty,
        jnp.zeros(0, jnp.int32),
        Sky(None, c(np.zeros(3)), c(np.eye(3))),
        ("static",),
        (),
        static_intensity=c(np.full(n, intensity)),
    )


def ground(half=16.0, step=0.3):
    g = np.arange(-half, half + 1e-9, step)
    xx, yy = np.meshgrid(g, g)
    return np.stack([xx.ravel(), yy.ravel(), np.zeros(xx.size)], -1)


def wall(x=8.0, ripple=0.0, step=0.25):
    ys, zs = np.arange(-6, 6.01, step), np.arange(-3, 3.01, step)
    yy, zz = np.meshgrid(ys, zs)
    xs = x + ripple * np.sin(yy * 0.8) * np.cos(zz * 0.6)
    return np.stack([xs.ravel(), yy.ravel(), zz.ravel()], -1)


def small_model(elev_deg, columns=64, full=True):
    az = (
        np.linspace(math.pi, -math.pi, columns, endpoint=False)
        if full
        else np.radians(np.linspace(40, -40, columns, endpoint=False))
    )
    return lidar_models.LidarModel("test", np.radians(elev_deg), np.zeros(len(elev_deg)), az, 10.0, 0.3, 200.0)


def pose_at(height=0.0, x=0.0, dtype=np.float32):
    m = np.eye(4)
    m[:3, 3] = [x, 0.0, height]
    return m.astype(dtype)
