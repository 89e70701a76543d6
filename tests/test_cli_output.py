"""render-grpc's animations (MP4 and GIF at the recorded rate) and its progress output."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageSequence

from nurec_jax.cli import _progress, _video


def _frames(n=5, h=24, w=42):
    """Frames whose k-th has a white bar at columns 8k .. 8k+7, so their order can be read back."""
    out = []
    for k in range(n):
        f = np.full((h, w, 3), 40, np.uint8)
        f[:, 8 * k : 8 * k + 8] = 255
        out.append(f)
    return out


def test_implied_fps_follows_the_frame_step():
    recorded = 1_700_000_000_000_000 + np.arange(120) * 100_000  # a 10 Hz camera
    assert _video.implied_fps(recorded) == pytest.approx(10.0)
    assert _video.implied_fps(recorded[::30]) == pytest.approx(1 / 3)  # every 30th: 3 s apart
    assert _video.implied_fps(recorded[::50][::-1]) == pytest.approx(0.2)
    assert _video.implied_fps(recorded[:1]) is None and _video.implied_fps([5, 5]) is None


@pytest.mark.parametrize("h,w", [(24, 42), (25, 43)])
def test_mp4_is_written_and_decodes(tmp_path, h, w):
    import imageio.v3 as iio

    frames = _frames(h=h, w=w)
    path = str(tmp_path / "cam.mp4")
    _video.write_mp4(frames, path, fps=0.2)
    back = iio.imread(path, plugin="FFMPEG")
    assert back.shape == (5, h + h % 2, w + w % 2, 3)  # odd sides padded to even for yuv420p
    for k, f in enumerate(back):
        bright = np.flatnonzero(f[h // 2, :w, :].mean(axis=1) > 150)
        assert bright.min() >= 8 * k - 1 and bright.max() <= 8 * k + 8, k  # frame order kept
    assert iio.immeta(path, plugin="FFMPEG")["fps"] == pytest.approx(0.2, abs=0.01)


@pytest.mark.parametrize("fps,ms", [(1 / 3, 3000), (0.2, 5000), (10.0, 100), (4.0, 250)])
def test_gif_durations_follow_the_rate(tmp_path, fps, ms):
    path = str(tmp_path / "cam.gif")
    _video.write_gif(_frames(), path, fps)
    with Image.open(path) as gif:
        durations = [f.info["duration"] for f in ImageSequence.Iterator(gif)]
    assert durations == [ms] * 5


def test_write_animations_writes_each_format(tmp_path):
    paths = []
    for k, f in enumerate(_frames(3)):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.fromarray(f).save(paths[-1])
    out = _video.write_animations(paths, str(tmp_path / "cam"), ["mp4", "gif"], fps=2.0)
    assert out == [str(tmp_path / "cam.mp4"), str(tmp_path / "cam.gif")]
    assert _video.write_animations(paths, str(tmp_path / "x"), [], fps=2.0) == []


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_messages_print_above_the_bar_not_inside_it():
    term = _Terminal()
    with _progress.Progress(3, file=term) as progress:
        assert progress.has_bar
        progress.started("camera_a frame 1/3")
        progress.say(
            "camera_a: compiling 64x36 images on the server unless it already has (first request of this size)"
        )
        progress.finished("camera_a frame 1/3", 2.0)
    text = term.getvalue()
    assert "camera_a frame 1/3" in text  # the bar named the frame in flight
    lines = [l for l in text.split("\n") if "compiling" in l]
    assert len(lines) == 1
    # A carriage return cleared the bar before the message, so the terminal shows the message alone on its line.
    assert lines[0].split("\r")[-1] == (
        "camera_a: compiling 64x36 images on the server unless it already has (first request of this size)"
    )


def test_plain_lines_off_a_terminal():
    out = io.StringIO()
    with _progress.Progress(2, file=out) as progress:
        assert not progress.has_bar
        progress.started("lidar spin 1/2")
        progress.say("note")
        progress.finished("lidar spin 1/2", 1.25)
        progress.finished("lidar spin 2/2", 0.0, ok=False)
    assert out.getvalue().splitlines() == ["note", "[1/2] lidar spin 1/2 (1.2 s)", "[2/2] lidar spin 2/2 (failed)"]
