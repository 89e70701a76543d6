"""Animations of the frames render-grpc wrote: an MP4 and a GIF per camera.

Both play at the rate the frames were recorded at: frames rendered every `--frame-step`-th recorded
frame of a 10 Hz camera, 3 s apart with a step of 30, play one per 3 s (`implied_fps`), unless
`--video-fps` says otherwise. The MP4 is H.264 (yuv420p, which most players need) written by the
ffmpeg binary that the imageio-ffmpeg wheel ships, so no system ffmpeg is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

FORMATS = ("mp4", "gif")
DEFAULT_FPS = 10.0  # when the frames carry no rate (a single frame)


def implied_fps(end_us: Sequence[int]) -> float | None:
    """Frames per second of frames that end at these timestamps (µs): one over their median spacing.

    None for fewer than two frames or timestamps that do not increase."""
    ends = np.sort(np.asarray(end_us, np.int64))
    if ends.size < 2:
        return None
    gap_us = float(np.median(np.diff(ends)))
    return 1e6 / gap_us if gap_us > 0 else None


def read_frames(paths: Sequence[str]) -> list[np.ndarray]:
    """The images at `paths` as (H, W, 3) uint8 RGB arrays."""
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def _even(frame: np.ndarray) -> np.ndarray:
    """yuv420p stores colour per 2x2 block, so H.264 needs even sides: repeat the last row/column."""
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def write_mp4(frames: Sequence[np.ndarray], path: str, fps: float) -> None:
    """H.264 MP4 of (H, W, 3) uint8 frames, odd sides padded to even (see `_even`)."""
    import imageio.v3 as iio

    stack = np.stack([_even(f) for f in frames])
    # macro_block_size=2: imageio-ffmpeg would otherwise rescale to multiples of 16 (and warn).
    iio.imwrite(
        path,
        stack,
        plugin="FFMPEG",
        extension=".mp4",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=2,
        quality=8,
    )


def gif_frame_ms(fps: float) -> int:
    """Per-frame display time of a GIF at `fps`, in ms. GIFs count in 1/100 s, so it is rounded to 10 ms
    (at least 20 ms: browsers play shorter delays at 100 ms)."""
    return max(20, round(100.0 / fps) * 10)


def write_gif(frames: Sequence[np.ndarray], path: str, fps: float) -> None:
    """Looping GIF of (H, W, 3) uint8 frames, each shown for `gif_frame_ms(fps)`."""
    from PIL import Image

    images = [Image.fromarray(f, "RGB") for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=gif_frame_ms(fps), loop=0)


def write_animations(paths: Sequence[str], stem: str, formats: Sequence[str], fps: float) -> list[str]:
    """Writes `<stem>.<format>` for each of `formats` from the images at `paths`; returns the files written."""
    if not paths or not formats:
        return []
    frames = read_frames(paths)
    written = []
    for fmt in formats:
        out = f"{stem}.{fmt}"
        (write_mp4 if fmt == "mp4" else write_gif)(frames, out, fps)
        written.append(out)
    return written
