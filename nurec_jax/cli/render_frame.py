"""`nurec-render`: render recorded camera frames of a scene to PNG files (no server).

    nurec-render --output-dir=out --cameras=camera_front_wide_120fov --frames=0,30,60 --width=480

Writes <output-dir>/<scene>_<camera>_<frame>.png (and _depth.png with --depth) for each camera and frame,
rendered in this process (JAX: the CPU, or a GPU after `make install EXTRAS=test,cuda12`).
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags

from nurec_jax.cli import _flags, _help
from nurec_jax.cli.scene_errors import one_line_scene_errors

_SCENE = flags.DEFINE_string("scene", None, "Scene file; default: the bundled sample scene.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "out", "Where PNG files are written.")
_CAMERAS = flags.DEFINE_list("cameras", None, "Camera logical ids (default: every camera of the scene).")
_FRAMES = flags.DEFINE_list("frames", ["0"], "Recorded frame indices of each camera, comma separated.")
_WIDTH = flags.DEFINE_integer("width", 480, "Output width; the height keeps the camera's aspect (NuRec's rule).")
_DISABLE_RS = flags.DEFINE_bool("disable_rolling_shutter", False, "Render every pixel at the start pose.")
_DEPTH = flags.DEFINE_bool("depth", False, "Also write a depth image (metres / 80 as grey levels).")
_TRAJECTORY = flags.DEFINE_integer(
    "trajectory_idx",
    None,
    "Rig trajectory (index in rig_trajectories.json) whose cameras to render; default: "
    "the first calibration of each camera.",
)


def _frame_indices(values: list[str]) -> bool:
    return bool(values) and all(v.strip().isdigit() for v in values)


flags.register_validator(
    "frames", _frame_indices, message="--frames takes recorded frame indices, integers >= 0 separated by commas"
)


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from PIL import Image

    from nurec_jax import cameras, data, renderer
    from nurec_jax import scene as scene_lib

    path = _SCENE.value or data.sample_scene_path()
    scene = scene_lib.load_scene(path)
    meta = scene.metadata
    if meta.trajectory is None:
        raise app.UsageError(f"scene {meta.scene_id!r} has no ego trajectory to take camera poses from")
    traj = _TRAJECTORY.value
    if traj is not None and not 0 <= traj < len(meta.trajectories):
        raise app.UsageError(f"--trajectory_idx={traj}: the scene has trajectories 0..{len(meta.trajectories) - 1}")
    known = list(meta.cameras) if traj is None else [c.logical_id for c in meta.camera_list if c.trajectory_idx == traj]
    cam_ids = _CAMERAS.value or known
    unknown = [c for c in cam_ids if c not in known]
    if unknown:
        raise app.UsageError(
            f"unknown camera(s) {unknown}; the scene has {known}" + ("" if traj is None else f" in trajectory {traj}")
        )
    os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
    r = renderer.Renderer()
    for cam_id in cam_ids:
        cal = meta.camera(cam_id, traj)
        cam = cameras.camera_at_resolution(cameras.camera_from_intrinsics(cal.intrinsics), _WIDTH.value, 0)
        for frame in (int(f) for f in _FRAMES.value):
            if not 0 <= frame < len(cal.frame_timestamps_us):
                raise app.UsageError(f"{cam_id} has frames 0..{len(cal.frame_timestamps_us) - 1}, not {frame}")
            s_us, e_us = (int(t) for t in cal.frame_timestamps_us[frame])
            pose = renderer.rig_camera_poses(meta, cam_id, s_us, e_us, trajectory_idx=traj)
            actors = renderer.track_actor_poses(meta, scene.gaussians.track_ids, s_us, e_us)
            start = time.perf_counter()
            isp = renderer.isp_index(meta, cam_id, e_us, per_frame=scene.report.ppisp_per_frame, trajectory_idx=traj)
            out = r.render(
                scene.gaussians,
                cam,
                pose,
                actors,
                disable_rolling_shutter=_DISABLE_RS.value,
                cache_key=(meta.scene_id,),
                isp=isp,
            )
            rgb = np.asarray(out.rgb)
            tag = "" if traj is None else f"_t{traj}"
            name = os.path.join(_OUTPUT_DIR.value, f"{meta.scene_id}_{cam_id}{tag}_{frame:04d}.png")
            Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)).save(name)
            if _DEPTH.value:
                d = np.clip(np.asarray(out.depth) / 80.0, 0, 1)
                Image.fromarray((d * 255).astype(np.uint8)).save(name.replace(".png", "_depth.png"))
            print(f"{name}  {cam.width}x{cam.height}  {time.perf_counter() - start:.1f} s")


def main():
    _flags.run(
        one_line_scene_errors(_main, "nurec-render"),
        prog="nurec-render",
        module_globals=globals(),
        groups=_help.RENDER_FRAME,
        ranges={"width": _flags.AT_LEAST_1, "trajectory_idx": _flags.NON_NEGATIVE},
    )


if __name__ == "__main__":
    main()
