"""Small synthetic scenes and cameras for renderer tests."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from nurec_jax import cameras, geometry
from nurec_jax.metadata import (
    FThetaIntrinsics,
    OpenCVFisheyeIntrinsics,
    OpenCVPinholeIntrinsics,
    PolynomialType,
    ShutterType,
)
from nurec_jax.poses import PosePair
from nurec_jax.render import ActorPoses
from nurec_jax.types import Gaussians, SceneGaussians, Sky

BACKGROUND = (0.2, 0.3, 0.5)


def make_camera(model: str, shutter=ShutterType.GLOBAL, width=40, height=32, dtype=jnp.float32):
    if model == "ftheta":
        bw = (0.0, 0.021, 1.5e-5, -2e-7, 0.0, 0.0)
        intr = FThetaIntrinsics(
            (width, height),
            shutter,
            (width / 2 - 0.3, height / 2 + 0.2),
            PolynomialType.PIXELDIST_TO_ANGLE,
            bw,
            (),
            1.2,
            (1.01, 0.01, -0.005),
        )
    elif model == "pinhole":
        intr = OpenCVPinholeIntrinsics(
            (width, height),
            shutter,
            (width / 2 + 0.3, height / 2 - 0.2),
            (30.0, 31.0),
            (-0.05, 0.01, 0.0, 0.001, 0.0, 0.0),
            (1e-3, -5e-4),
            (1e-4, 0.0, -1e-4, 0.0),
        )
    elif model == "fisheye":
        intr = OpenCVFisheyeIntrinsics(
            (width, height),
            shutter,
            (width / 2, height / 2),
            (16.0, 16.0),
            (0.01, -0.002, 0.0, 0.0),
            math.radians(95.0),
        )
    else:
        raise ValueError(model)
    return cameras.camera_from_intrinsics(intr, dtype)


def camera_poses(motion=0.0, dtype=np.float64):
    """Camera -> world at start/end: a yawed camera moving sideways by `motion` metres (camera x)."""
    r = geometry.quat_wxyz_to_matrix(np.array([0.97, 0.05, -0.2, 0.1]))
    start = geometry.make_transform(r, [0.5, -0.3, 0.2])
    end = geometry.make_transform(
        r @ geometry.quat_wxyz_to_matrix(np.array([1.0, 0.0, 0.01, 0.0])),
        start[:3, 3] + r @ np.array([motion, 0.0, 0.0]),
    )
    return start.astype(dtype), end.astype(dtype)


def random_scene(seed=0, n=60, n_actor=6, degree=2, wide=False, dtype=np.float32):
    """Gaussians in front of the start camera (some behind, some near), plus 2 moving actors."""
    rng = np.random.default_rng(seed)
    start, end = camera_poses()
    half = 1.2 if wide else 0.5
    z = rng.uniform(1.0, 7.0, n)
    pc = np.stack([rng.uniform(-half, half, n) * z, rng.uniform(-half, half, n) * z, z], -1)
    pc[:3, 2] *= -1  # behind the camera
    pc[3, 2] = 0.1  # inside the near plane
    means = pc @ start[:3, :3].T + start[:3, 3]
    quats = geometry.normalize_quat(rng.normal(size=(n, 4)))
    scales = rng.uniform(0.05, 0.45, (n, 3))
    opac = rng.uniform(0.2, 0.98, n)
    k = (degree + 1) ** 2
    shc = rng.normal(0, 0.25, (n, k, 3))
    shc[:, 0] += rng.uniform(-1.5, 1.5, (n, 3))
    a_means = rng.normal(0, 0.3, (n_actor, 3))
    a_quats = geometry.normalize_quat(rng.normal(size=(n_actor, 4)))
    a_scales = rng.uniform(0.1, 0.3, (n_actor, 3))
    a_op = rng.uniform(0.5, 0.95, n_actor)
    a_sh = rng.normal(0, 0.3, (n_actor, k, 3))
    tracks = np.array([0] * (n_actor // 2) + [1] * (n_actor - n_actor // 2), np.int32)
    actor_T = []
    for a, depth in enumerate((3.0, 4.5)):
        p0 = start[:3, :3] @ np.array([-0.6 + a, 0.2, depth]) + start[:3, 3]
        q0 = geometry.quat_wxyz_to_matrix(np.array([0.9, 0.1 * a, 0.3, -0.1]))
        t0 = geometry.make_transform(q0, p0)
        t1 = geometry.make_transform(
            q0 @ geometry.quat_wxyz_to_matrix(np.array([1.0, 0.0, 0.0, 0.05])),
            p0 + start[:3, :3] @ np.array([0.25, 0.0, 0.0]),
        )
        actor_T.append((t0, t1))
    host = dict(
        means=means,
        quats=quats,
        scales=scales,
        opac=opac,
        shc=shc,
        a_means=a_means,
        a_quats=a_quats,
        a_scales=a_scales,
        a_op=a_op,
        a_sh=a_sh,
        tracks=tracks,
        actor_T=actor_T,
        degree=degree,
    )
    return host


def to_scene(host, dtype=np.float32) -> SceneGaussians:
    c = lambda x: jnp.asarray(np.asarray(x, dtype))  # noqa: E731
    static = Gaussians(
        c(host["means"]), c(host["quats"]), c(host["scales"]), c(host["opac"]), c(host["shc"]), host["degree"]
    )
    dyn = Gaussians(
        c(host["a_means"]), c(host["a_quats"]), c(host["a_scales"]), c(host["a_op"]), c(host["a_sh"]), host["degree"]
    )
    sky = Sky(None, c(BACKGROUND), c(np.eye(3)))
    return SceneGaussians(
        static,
        jnp.zeros(static.means.shape[0], jnp.int32),
        dyn,
        jnp.asarray(host["tracks"]),
        sky,
        ("background",),
        ("a", "b"),
    )


def actor_poses(host, dtype=np.float32) -> ActorPoses:
    s = np.stack([t[0] for t in host["actor_T"]]).astype(dtype)
    e = np.stack([t[1] for t in host["actor_T"]]).astype(dtype)
    return ActorPoses(PosePair.from_matrices(s, e), jnp.ones(len(host["actor_T"]), bool))


def brute_inputs(host):
    means = np.concatenate([host["means"], host["a_means"]])
    quats = np.concatenate([host["quats"], host["a_quats"]])
    scales = np.concatenate([host["scales"], host["a_scales"]])
    opac = np.concatenate([host["opac"], host["a_op"]])
    shc = np.concatenate([host["shc"], host["a_sh"]])
    frames = np.concatenate([np.zeros(len(host["means"]), int), 1 + host["tracks"]])
    # What the renderer sees is float32: round the same way.
    f32 = lambda x: np.asarray(x, np.float32).astype(np.float64)  # noqa: E731
    q = f32(quats)
    return f32(means), q / np.linalg.norm(q, axis=1, keepdims=True), f32(scales), f32(opac), f32(shc), frames


# --- hand-placed Gaussians for the analytic checks (tests/test_render_analytic.py) ---------------------


def analytic_scene(means, scales, opac, color=(1.0, 0.5, 0.25), actor=None) -> SceneGaussians:
    """Axis-aligned static Gaussians of one colour under a black sky; `actor` (a scale) adds one actor Gaussian of
    that size at its track's origin (track "car")."""
    n = len(means)
    sh0 = (np.asarray(color) - 0.5) / 0.28209479177387814
    static = Gaussians(
        jnp.asarray(means, jnp.float32),
        jnp.tile(jnp.array([1.0, 0, 0, 0]), (n, 1)),
        jnp.asarray(scales, jnp.float32),
        jnp.asarray(opac, jnp.float32),
        jnp.asarray(np.tile(sh0, (n, 1, 1)), jnp.float32),
        0,
    )
    if actor is None:
        dyn = Gaussians(
            jnp.zeros((0, 3)), jnp.zeros((0, 4)), jnp.zeros((0, 3)), jnp.zeros((0,)), jnp.zeros((0, 1, 3)), 0
        )
        tracks, ids = jnp.zeros(0, jnp.int32), ()
    else:
        dyn = Gaussians(
            jnp.zeros((1, 3)),
            jnp.array([[1.0, 0, 0, 0]]),
            jnp.full((1, 3), actor),
            jnp.array([0.9]),
            jnp.asarray(np.tile(sh0, (1, 1, 1)), jnp.float32),
            0,
        )
        tracks, ids = jnp.zeros(1, jnp.int32), ("car",)
    sky = Sky(None, jnp.asarray((0.0, 0.0, 0.0), jnp.float32), jnp.eye(3))
    return SceneGaussians(static, jnp.zeros(n, jnp.int32), dyn, tracks, sky, ("s",), ids)


def square_pinhole(shutter=ShutterType.GLOBAL, size=64, f=40.0):
    """A size x size pinhole camera with focal length f pixels and the principal point at the centre."""
    intr = OpenCVPinholeIntrinsics((size, size), shutter, (size / 2, size / 2), (f, f))
    return cameras.camera_from_intrinsics(intr)


def identity_pose() -> PosePair:
    """A sensor at the world origin looking along +z, still during the exposure."""
    return PosePair.from_matrices(np.eye(4, dtype=np.float32))
