"""Frozen pytree dataclasses that carry scene data onto the device.

Every array field is a pytree leaf; ints, strings and tuples are static metadata (they are part of
the jit cache key), following the rule "a leaf is a pytree node iff it is an array".
All Gaussian values are *activated* (render-ready): linear scales, opacities in (0, 1),
unit wxyz quaternions, and SH coefficients in the standard 3DGS convention
`rgb = max(0, 0.5 + sum_k Y_k(d) * sh[k])` (the loader converts NuRec's `radiance_sph_O0`
layers to it; see BUILD_NOTES.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nurec_jax.ppisp import Ppisp


def static_field(**kwargs):
    """A dataclass field that is static pytree metadata (part of the jit cache key), not a traced leaf."""
    return dataclasses.field(metadata=dict(static=True), **kwargs)


@dataclasses.dataclass(frozen=True)
class HostLayer:
    """One decoded Gaussian layer on the host, activated, float32 numpy: what every scene reader (`.nurec`
    payloads, checkpoints, PLY files, USD ParticleFields) produces before the layers go to the device.

    Attributes:
      name: layer name (`background`, `road`, `dynamic_rigids`, `gaussians`, ...).
      rigid: True for rigid-actor layers (Gaussians in cuboid-local frames).
      means, quats, scales, opacities, sh: as in `Gaussians`.
      sh_degree: active degree.
      cuboid_ids: (N,) int32 index into `track_ids` (rigid layers), else None.
      track_ids: the layer's own clean track list (rigid layers), else ().
      dropped: number of Gaussians dropped for non-finite or degenerate values.
      colour_convention: "radiance_sph_O0" or "3dgs" (what the file stored; `sh` is always 3dgs).
    """

    name: str
    rigid: bool
    means: np.ndarray
    quats: np.ndarray
    scales: np.ndarray
    opacities: np.ndarray
    sh: np.ndarray
    sh_degree: int
    cuboid_ids: np.ndarray | None
    track_ids: tuple[str, ...]
    dropped: int
    colour_convention: str
    lidar_intensity: np.ndarray | None = None  # (N,) the layer's lidar feature (channel 0), if it has one
    approximation: str = ""  # what this layer's render leaves out of NuRec's model, "" when nothing

    @property
    def count(self) -> int:
        return int(self.means.shape[0])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Gaussians:
    """A set of 3D Gaussians.

    Attributes:
      means: (N, 3) centres, in the frame the owner documents (world for static layers,
        cuboid-local for actor Gaussians).
      quats: (N, 4) unit rotations, (w, x, y, z); the columns of R(q) are the principal axes.
      scales: (N, 3) standard deviations along the principal axes, metres.
      opacities: (N,) peak opacity in (0, 1).
      sh: (N, K, 3) real SH coefficients, K = (sh_degree + 1) ** 2, DC first, RGB innermost.
      sh_degree: active SH degree (0..3), static.
    """

    means: jax.Array
    quats: jax.Array
    scales: jax.Array
    opacities: jax.Array
    sh: jax.Array
    sh_degree: int = static_field(default=0)

    @property
    def count(self) -> int:
        return int(self.means.shape[0])

    def take(self, index) -> "Gaussians":
        """Gaussians at `index` (any numpy/jax index along the first axis)."""
        return dataclasses.replace(
            self,
            means=self.means[index],
            quats=self.quats[index],
            scales=self.scales[index],
            opacities=self.opacities[index],
            sh=self.sh[index],
        )

    @staticmethod
    def concatenate(parts: "list[Gaussians]") -> "Gaussians":
        """Joins Gaussian sets; lower SH degrees are zero-padded to the highest one."""
        if not parts:
            raise ValueError("nothing to concatenate")
        degree = max(p.sh_degree for p in parts)
        k = (degree + 1) ** 2
        xp = jnp if any(isinstance(p.means, jax.Array) for p in parts) else np

        def pad(sh):
            return xp.concatenate([sh, xp.zeros((sh.shape[0], k - sh.shape[1], 3), sh.dtype)], 1)

        return Gaussians(
            means=xp.concatenate([p.means for p in parts]),
            quats=xp.concatenate([p.quats for p in parts]),
            scales=xp.concatenate([p.scales for p in parts]),
            opacities=xp.concatenate([p.opacities for p in parts]),
            sh=xp.concatenate([pad(p.sh) for p in parts]),
            sh_degree=degree,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sky:
    """What is seen behind the Gaussians.

    Attributes:
      cubemap: (6, S, S, 3) faces in the order +X, -X, +Y, -Y, +Z, -Z (OpenGL) or None.
      color: (3,) constant background colour, used when there is no cubemap.
      rotation_world_to_sky: (3, 3) rotates world directions into the cubemap's frame
        (the rotation part of `world_to_nre`; the GL axis mapping lives in `nurec_jax.sky`).
    """

    cubemap: jax.Array | None
    color: jax.Array
    rotation_world_to_sky: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SceneGaussians:
    """All Gaussians of a scene, grouped for rendering.

    Attributes:
      static: every static layer, concatenated, in the world frame.
      static_layer: (N,) int32 index of each static Gaussian's layer in `static_layer_names`.
      dynamic: every rigid-actor Gaussian, concatenated, each in its own cuboid-local frame.
      dynamic_track: (M,) int32 index of each dynamic Gaussian's track in `track_ids`.
      sky: the background.
      static_layer_names: names of the static layers, static.
      track_ids: clean track ids (no `@suffix`) of the actor groups, static.
      static_intensity, dynamic_intensity: (N,) / (M,) lidar intensity per Gaussian from the scene's
        lidar feature (NaN where a layer has none), or None when no layer has one.
      ppisp: the scene's PPISP camera post-processing (`nurec_jax.ppisp.Ppisp`), or None.
    """

    static: Gaussians
    static_layer: jax.Array
    dynamic: Gaussians
    dynamic_track: jax.Array
    sky: Sky
    static_layer_names: tuple[str, ...] = static_field(default=())
    track_ids: tuple[str, ...] = static_field(default=())
    static_intensity: jax.Array | None = None
    dynamic_intensity: jax.Array | None = None
    ppisp: Ppisp | None = None

    def layer(self, name: str) -> Gaussians:
        """The Gaussians of one static layer (host-side helper; not for use under jit)."""
        i = self.static_layer_names.index(name)
        return self.static.take(np.flatnonzero(np.asarray(self.static_layer) == i))

    def actor(self, track_id: str) -> Gaussians:
        """The cuboid-local Gaussians of one actor track (host-side helper; not for use under jit)."""
        i = self.track_ids.index(track_id)
        return self.dynamic.take(np.flatnonzero(np.asarray(self.dynamic_track) == i))
