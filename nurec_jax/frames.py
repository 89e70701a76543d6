"""Coordinate frames of a frame's Gaussians: frame 0 is the world, frame 1 + a is actor track a.

`ActorPoses` holds each actor's object -> world poses at the start and end of an exposure (or a lidar
spin); `merge_gaussians` concatenates the static and the dynamic Gaussians (actors cuboid-local, hidden
ones at zero opacity) with each one's frame index; `frame_pairs` gives every frame's poses. The camera
pipeline and the lidar both start here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nurec_jax.poses import Pose, PosePair
from nurec_jax.types import SceneGaussians


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ActorPoses:
    """Object -> world poses of every actor track at the start and end of the exposure.

    Attributes:
      poses: PosePair with (A,) leading axes, one per `SceneGaussians.track_ids` entry.
      visible: (A,) bool; an invisible actor (outside its track's time range, or removed) is not drawn.
    """

    poses: PosePair
    visible: jax.Array

    @staticmethod
    def hidden(n: int, dtype=jnp.float32) -> "ActorPoses":
        """`n` actors, none drawn (identity poses)."""
        ident = Pose(jnp.tile(jnp.array([1.0, 0.0, 0.0, 0.0], dtype), (n, 1)), jnp.zeros((n, 3), dtype))
        return ActorPoses(PosePair(ident, ident), jnp.zeros((n,), bool))


def frame_pairs(actors: ActorPoses, dtype) -> PosePair:
    ident = Pose(jnp.array([[1.0, 0.0, 0.0, 0.0]], dtype), jnp.zeros((1, 3), dtype))
    start = Pose(
        jnp.concatenate([ident.quat, actors.poses.start.quat.astype(dtype)]),
        jnp.concatenate([ident.trans, actors.poses.start.trans.astype(dtype)]),
    )
    end = Pose(
        jnp.concatenate([ident.quat, actors.poses.end.quat.astype(dtype)]),
        jnp.concatenate([ident.trans, actors.poses.end.trans.astype(dtype)]),
    )
    return PosePair(start, end)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MergedGaussians:
    means: jax.Array
    quats: jax.Array
    scales: jax.Array
    opacities: jax.Array
    sh: jax.Array
    frames: jax.Array
    sh_degree: int = dataclasses.field(metadata=dict(static=True), default=0)


def merge_gaussians(gaussians: SceneGaussians, actors: ActorPoses) -> MergedGaussians:
    s, d = gaussians.static, gaussians.dynamic
    k = max(s.sh.shape[1], d.sh.shape[1])

    def pad(x):
        return jnp.pad(x, ((0, 0), (0, k - x.shape[1]), (0, 0)))

    dyn_op = d.opacities
    if d.count:
        dyn_op = jnp.where(actors.visible[gaussians.dynamic_track], d.opacities, 0.0)
    frames = jnp.concatenate([jnp.zeros(s.count, jnp.int32), 1 + gaussians.dynamic_track.astype(jnp.int32)])
    return MergedGaussians(
        means=jnp.concatenate([s.means, d.means]),
        quats=jnp.concatenate([s.quats, d.quats]),
        scales=jnp.concatenate([s.scales, d.scales]),
        opacities=jnp.concatenate([s.opacities, dyn_op]),
        sh=jnp.concatenate([pad(s.sh), pad(d.sh)]),
        frames=frames,
        sh_degree=max(s.sh_degree, d.sh_degree),
    )


def checked_actors(gaussians: SceneGaussians, actors: ActorPoses | None) -> ActorPoses:
    n_tracks = len(gaussians.track_ids)
    if actors is None:
        return ActorPoses.hidden(n_tracks, gaussians.static.means.dtype)
    if actors.visible.shape[0] != n_tracks:
        raise ValueError(
            f"actors holds {actors.visible.shape[0]} poses but the scene has {n_tracks} actor tracks "
            f"{gaussians.track_ids}"
        )
    return actors
