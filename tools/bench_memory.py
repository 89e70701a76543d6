"""Memory over a long run that keeps asking for new output sizes: process RSS after each frame.

    python tools/bench_memory.py [--heights=24,28,32,36,40] [--cycles=4] [--max_variants=2]
    python tools/bench_memory.py --mode=jit      # the old behaviour: one plain jax.jit, never freed

Renders one camera of a thinned copy of the sample scene (every 25th Gaussian, like the server tests)
through `Renderer`, cycling through `--heights` `--cycles` times, and prints the RSS after every frame
with the compiled-variant cache's size and evictions. With the bounded cache (`--mode=cache`, the
default) RSS levels off once the first `--max_variants` sizes are compiled; with `--mode=jit` every new
size adds its executable for good, so RSS climbs through the first cycle (later cycles reuse them).
Pick more heights than `--max_variants` + 3 to see the difference. Not run by the tests (minutes).

`--malloc_trim` (on by default, glibc only) hands freed heap pages back to the kernel after each frame,
so RSS shows what is live rather than what the allocator kept for later.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import tempfile
import time

import jax
from absl import app, flags

from nurec_jax import cameras, load_scene
from nurec_jax import renderer as RR

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from thin_scene import write_thin_scene  # noqa: E402

_HEIGHTS = flags.DEFINE_list("heights", ["24", "28", "32", "36", "40", "44"], "Output heights to cycle through.")
_CYCLES = flags.DEFINE_integer("cycles", 4, "How many times to go through --heights.")
_MAX = flags.DEFINE_integer("max_variants", 2, "Bound of the compiled-variant cache (--mode=cache).")
_MODE = flags.DEFINE_enum("mode", "cache", ["cache", "jit"], "cache: the bounded cache; jit: one plain jax.jit.")
_CAMERA = flags.DEFINE_string("camera", "camera_front_wide_120fov", "Camera of the sample scene.")
_FRAME = flags.DEFINE_integer("frame", 10, "Recorded frame index.")
_TRIM = flags.DEFINE_boolean("malloc_trim", True, "Call glibc's malloc_trim(0) after each frame.")


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _trimmer():
    if not _TRIM.value:
        return lambda: None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return lambda: None
    return lambda: libc.malloc_trim(0)


def _main(argv):
    del argv
    heights = [int(h) for h in _HEIGHTS.value]
    trim = _trimmer()
    print(
        f"JAX {jax.__version__}, backend {jax.default_backend()}, mode {_MODE.value}"
        + (f", max_variants {_MAX.value}" if _MODE.value == "cache" else "")
    )
    with tempfile.TemporaryDirectory() as tmp:
        scene = load_scene(write_thin_scene(os.path.join(tmp, "thin.usdz"), keep_every=25))
    meta = scene.metadata
    cal = meta.cameras[_CAMERA.value]
    start_us, end_us = (int(t) for t in cal.frame_timestamps_us[_FRAME.value])
    pose = RR.rig_camera_poses(meta, _CAMERA.value, start_us, end_us)
    actors = RR.track_actor_poses(meta, scene.gaussians.track_ids, start_us, end_us)
    base = cameras.camera_from_intrinsics(cal.intrinsics)
    renderer = RR.Renderer()
    RR.COMPILED.resize(_MAX.value)
    plain = {}
    if _MODE.value == "jit":
        from nurec_jax.render import render

        plain["fn"] = RR.counted_jit(render, [0], static_argnames=("options",))
    gc.collect()
    trim()
    print(f"start: RSS {rss_mb():.0f} MiB")
    for cycle in range(_CYCLES.value):
        for h in heights:
            cam = cameras.camera_at_resolution(base, 0, h)
            t0 = time.perf_counter()
            if plain:
                opts = renderer.options_for(cam, ("bench",), scene.gaussians.static.count)
                out = plain["fn"](scene.gaussians, cam, pose, actors, options=opts, isp=None)
            else:
                out = renderer.render(scene.gaussians, cam, pose, actors, cache_key=("bench",))
            jax.block_until_ready(out.rgb)
            del out
            gc.collect()
            trim()
            st = RR.COMPILED.stats()
            print(
                f"cycle {cycle} {cam.width}x{cam.height}: {time.perf_counter() - t0:6.1f} s, "
                f"RSS {rss_mb():7.0f} MiB, cached {st['entries']}, evictions {st['evictions']}",
                flush=True,
            )


if __name__ == "__main__":
    app.run(_main)
