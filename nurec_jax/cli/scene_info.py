"""`nurec-scene-info`: load a NuRec scene and print its summary.

nurec-scene-info                       # the bundled sample scene
nurec-scene-info --scene=/path/scene.usdz [--metadata-only]
"""

from __future__ import annotations

import time

from absl import app, flags

from nurec_jax.cli import _flags, _help
from nurec_jax.cli.scene_errors import one_line_scene_errors

_SCENE = flags.DEFINE_string("scene", None, "Scene file (.usdz, .ply, .usd*); default: the bundled sample.")
_METADATA_ONLY = flags.DEFINE_bool("metadata_only", False, "Read metadata only; do not decode Gaussians.")
_MAX_PAYLOAD_MB = flags.DEFINE_integer("max_payload_mb", 8192, "Largest decompressed payload accepted (MiB).")


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from nurec_jax import data, scene
    from nurec_jax.metadata import metadata_lines

    path = _SCENE.value or data.sample_scene_path()
    options = scene.LoadOptions(
        max_payload_bytes=_MAX_PAYLOAD_MB.value << 20, max_member_bytes=_MAX_PAYLOAD_MB.value << 20
    )
    start = time.perf_counter()
    if _METADATA_ONLY.value:
        meta = scene.read_scene_metadata(path, options)
        print(
            f"scene {meta.scene_id!r}: {len(meta.camera_list)} cameras, {len(meta.lidar_list)} lidars, "
            f"{len(meta.tracks)} tracks, trajectories: {len(meta.trajectories)}"
        )
        for line in metadata_lines(meta):
            print(line)
    else:
        loaded = scene.load_scene(path, options)
        print(scene.describe(loaded))
    print(f"loaded in {time.perf_counter() - start:.2f} s from {path}")


def main():
    _flags.run(
        one_line_scene_errors(_main, "nurec-scene-info"),
        prog="nurec-scene-info",
        module_globals=globals(),
        groups=_help.SCENE_INFO,
        ranges={"max_payload_mb": _flags.AT_LEAST_1},
    )


if __name__ == "__main__":
    main()
