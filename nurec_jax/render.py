"""The differentiable camera renderer (NuRec's 3DGUT): unscented-transform tiling + per-ray eval3d.

`render` composes one module per stage of the pipeline (docs/rendering.md#pipeline):
  1. `nurec_jax.rays`: per pixel its exposure time tau (rolling shutter), its camera pose at tau, its
     ray, and the same ray in every actor's frame (`nurec_jax.frames`) at tau.
  2. `nurec_jax.projection`: per Gaussian (no gradients) the 7 sigma points through the exact camera
     with the rolling-shutter fixed point -> 2D mean and covariance -> opacity-aware tile rectangle;
     culling; depth key; SH colours.
  3. `nurec_jax.binning`: (tile, Gaussian) pairs in a fixed-capacity buffer, one sort, per-tile ranges.
  4. `nurec_jax.compositing`: per tile eval3d + front-to-back compositing (`nurec_jax.kernels`).
  5. `nurec_jax.compose`: sky behind, alpha and depth, tiles -> image; then the scene's PPISP camera
     post-processing (`nurec_jax.ppisp`), when it has one.

The stage functions here (`prepare_frame` = 1 + 2, `bin_frame`, `composite_frame`, `compose_frame`) are
what the Renderer compiles, together as `render` or one by one when timing stages.

Gradients flow to the sensor poses (through the rays and the SH view direction) and to the Gaussian
parameters (through eval3d and the colours); tiling and sorting are not differentiated.
Library functions are pure and never jit themselves; `nurec_jax.renderer.Renderer` owns the jit
boundary and grows capacities on overflow.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nurec_jax import ppisp as ppisp_lib
from nurec_jax.binning import Binning, bin_gaussians, depth_key  # noqa: F401 (public names)
from nurec_jax.cameras import Camera
from nurec_jax.compose import RenderOutput, compose_image, sky_color  # noqa: F401
from nurec_jax.compositing import composite_tiles, compositor  # noqa: F401
from nurec_jax.frames import ActorPoses, MergedGaussians, checked_actors, frame_pairs, merge_gaussians
from nurec_jax.poses import PosePair
from nurec_jax.ppisp import IspIndex, Ppisp
from nurec_jax.projection import project_gaussians, project_points, unscented_footprint  # noqa: F401
from nurec_jax.rays import camera_rays, effective_shutter, pixel_grid, shutter_tau, untile  # noqa: F401
from nurec_jax.render_options import RenderOptions, resolved_implementation, tile_size_for  # noqa: F401
from nurec_jax.types import SceneGaussians, Sky


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FramePrep:
    """Everything one frame needs before binning: rays, the merged Gaussians, their colours and tile
    rectangles (the output of the "projection" stage)."""

    rays: jax.Array  # [T, P, F, 6] per-pixel ray in every frame
    direction: jax.Array  # [T, P, 3] world ray directions (for the sky)
    gaussians: MergedGaussians
    colors: jax.Array  # [N, 3]
    rect_lo: jax.Array  # [N, 2] pixel rectangle of each Gaussian (no gradient)
    rect_hi: jax.Array
    ok: jax.Array  # [N] bool: projected, in front, opaque enough
    depth: jax.Array  # [N] sort key distance


def prepare_frame(
    gaussians: SceneGaussians,
    camera: Camera,
    sensor_pose: PosePair,
    actors: ActorPoses | None,
    options: RenderOptions = RenderOptions(),
) -> FramePrep:
    """Stages "rays" and "projection": rays, unscented-transform footprints, culling, depth keys, colours."""
    actors = checked_actors(gaussians, actors)
    dtype = gaussians.static.means.dtype
    shutter = effective_shutter(camera, options.disable_rolling_shutter)
    frames = frame_pairs(actors, dtype)
    g = merge_gaussians(gaussians, actors)
    with jax.named_scope("rays"):
        rays, direction = camera_rays(camera, sensor_pose, frames, shutter, tile_size_for(options))
    rect_lo, rect_hi, ok, depth, colors = project_gaussians(
        camera, sensor_pose, frames, g, shutter, options.rolling_shutter_iterations
    )
    return FramePrep(rays, direction, g, colors, rect_lo, rect_hi, ok, depth)


def bin_frame(prep: FramePrep, camera: Camera, options: RenderOptions = RenderOptions()) -> Binning:
    """Stage "binning": (tile, Gaussian) pairs, one sort, per-tile ranges."""
    tile = tile_size_for(options)
    _, _, tiles_x, tiles_y = pixel_grid(camera.width, camera.height, tile)
    sg = jax.lax.stop_gradient
    with jax.named_scope("bin"):
        return bin_gaussians(
            prep.rect_lo,
            prep.rect_hi,
            prep.ok,
            sg(prep.gaussians.opacities),
            prep.depth,
            tiles_x,
            tiles_y,
            options.pair_capacity,
            tile,
        )


def composite_frame(prep: FramePrep, binning: Binning, camera: Camera, options: RenderOptions = RenderOptions()):
    """Stage "compositing": per-tile eval3d + front-to-back compositing -> (rgb, T, hit) per tile pixel."""
    _, valid_np, _, _ = pixel_grid(camera.width, camera.height, tile_size_for(options))
    g = prep.gaussians
    with jax.named_scope("rasterize"):
        return composite_tiles(
            options.implementation,
            binning.pair_gids,
            binning.tile_start,
            binning.tile_counts,
            prep.rays,
            jnp.asarray(valid_np),
            g.means,
            g.quats,
            g.scales,
            g.opacities,
            prep.colors,
            g.frames,
            chunk=options.chunk,
            tile_batch=options.tile_batch,
        )


def compose_frame(
    sky: Sky,
    camera: Camera,
    prep: FramePrep,
    binning: Binning,
    rgb,
    trans,
    hit,
    ppisp: Ppisp | None = None,
    isp: IspIndex | None = None,
) -> RenderOutput:
    """Stage "compose": sky behind, alpha and depth, tiles -> image, then the scene's PPISP camera
    post-processing (when it has one) for the camera and frame `isp` names (None: neither)."""
    out = compose_image(sky, camera, prep.direction, rgb, trans, hit, binning.num_pairs, binning.max_tile_pairs)
    if ppisp is None:
        return out
    isp = IspIndex.of() if isp is None else isp
    with jax.named_scope("ppisp"):
        return dataclasses.replace(out, rgb=ppisp_lib.apply(ppisp, out.rgb, isp.camera, isp.frame))


def render(
    gaussians: SceneGaussians,
    camera: Camera,
    sensor_pose: PosePair,
    actors: ActorPoses | None = None,
    options: RenderOptions = RenderOptions(),
    isp: IspIndex | None = None,
) -> RenderOutput:
    """Renders one camera frame: `prepare_frame`, `bin_frame`, `composite_frame`, `compose_frame`.

    Args:
      gaussians: the scene (static layers in world, actors cuboid-local).
      camera: camera model at the output resolution.
      sensor_pose: camera -> world poses at the start and end of the exposure.
      actors: object -> world poses of each track (`gaussians.track_ids` order); None hides all actors.
      options: static configuration.
      isp: the camera and frame whose PPISP post-processing applies, for scenes that have one
        (`gaussians.ppisp`); None: neither (display gamma, no per-frame terms).

    Returns:
      RenderOutput; check `num_pairs` against `options.pair_capacity` (the Renderer does).

    Raises:
      ValueError: `actors` does not hold one entry per `gaussians.track_ids`.
    """
    prep = prepare_frame(gaussians, camera, sensor_pose, actors, options)
    binning = bin_frame(prep, camera, options)
    rgb, trans, hit = composite_frame(prep, binning, camera, options)
    return compose_frame(gaussians.sky, camera, prep, binning, rgb, trans, hit, gaussians.ppisp, isp)
