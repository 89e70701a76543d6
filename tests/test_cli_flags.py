"""Flags of the four commands as a user types them: dashes or underscores, and bad values refused when the
flags are read, in one line on stderr, without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from absl import flags

from nurec_jax.cli import _flags

MODULES = {
    "serve-grpc": "serve_grpc",
    "render-grpc": "render_grpc",
    "nurec-scene-info": "scene_info",
    "nurec-render": "render_frame",
}


@pytest.fixture(scope="module")
def thin_scene_path(tmp_path_factory):
    from tools.thin_scene import write_thin_scene

    return write_thin_scene(tmp_path_factory.mktemp("scene") / "thin.usdz", keep_every=200, scene_id="thin-street")


def _run(prog, *args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", f"nurec_jax.cli.{MODULES[prog]}", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=timeout,
    )


def _one_line(out, prog, text):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
    assert out.stderr.startswith(f"{prog}: ") and text in out.stderr, out.stderr


@pytest.mark.parametrize(
    "prog,args,text",
    [
        (
            "render-grpc",
            ["--artifact-path=a.usdz", "--output-dir=o", "--height=-5"],
            "--height must be in 1..65535, got -5",
        ),
        ("render-grpc", ["--output-dir=o"], "--artifact-path is required"),
        ("render-grpc", ["--artifact-path=a.usdz"], "--output-dir is required"),
        (
            "render-grpc",
            ["--artifact-path=a.usdz", "--output-dir=o", "--frame-step=0"],
            "--frame-step must be >= 1, got 0",
        ),
        ("render-grpc", ["--artifact-path=a.usdz", "--output-dir=o", "--video-fps=0"], "--video-fps must be > 0"),
        (
            "render-grpc",
            ["--artifact-path=a.usdz", "--output-dir=o", "--connect-timeout-s=-1"],
            "--connect-timeout-s must be > 0",
        ),
        (
            "render-grpc",
            ["--artifact-path=a.usdz", "--output-dir=o", "--video-format=avi"],
            "--video-format takes mp4 and/or gif",
        ),
        (
            "render-grpc",
            ["--artifact-path=a.usdz", "--output-dir=o", "--lidar-raydrop-threshold=2"],
            "--lidar-raydrop-threshold must be in 0..1, got 2.0",
        ),
        (
            "render-grpc",
            ["--artifact-path=a.usdz", "--output-dir=o", "--heigth=3"],
            "unknown flag --heigth (did you mean --height?)",
        ),
        ("nurec-render", ["--width=-5"], "--width must be >= 1, got -5"),
        ("nurec-render", ["--frames=0,x"], "--frames takes recorded frame indices"),
        ("nurec-render", ["--trajectory-idx=-1"], "--trajectory-idx must be >= 0, got -1"),
        ("nurec-scene-info", ["--max-payload-mb=0"], "--max-payload-mb must be >= 1, got 0"),
        ("serve-grpc", ["--max-message-mb=0"], "--max-message-mb must be >= 1, got 0"),
        ("serve-grpc", ["--shutdown-grace-s=-1"], "--shutdown-grace-s must be >= 0, got -1.0"),
        ("serve-grpc", ["--difix-resolution", "0", "1024"], "--difix-resolution takes two positive integers H W"),
    ],
)
def test_bad_values_are_refused_in_one_line(prog, args, text):
    _one_line(_run(prog, *args), prog, text)


@pytest.mark.parametrize("spelling", ["--output-dir", "--output_dir"])
def test_nurec_render_takes_dashes_and_underscores(tmp_path, spelling):
    # The flags parse (a bad --width would be refused first), and the run stops at the missing scene.
    out = _run(
        "nurec-render",
        f"{spelling}={tmp_path}",
        f"--scene={tmp_path / 'nope.usdz'}",
        "--disable-rolling-shutter",
        "--trajectory_idx=0",
    )
    assert out.returncode == 1 and "scene file not found" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_scene_info_takes_dashes(thin_scene_path):
    out = _run("nurec-scene-info", f"--scene={thin_scene_path}", "--metadata-only", "--max-payload-mb=64")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "scene 'thin-street'" in out.stdout


def test_render_grpc_takes_dashes_and_underscores(thin_scene_path, tmp_path):
    # Nothing listens on port 1: the flags were read when it says so.
    out = _run(
        "render-grpc",
        f"--artifact_path={thin_scene_path}",
        f"--output-dir={tmp_path}",
        "--host=127.0.0.1",
        "--port=1",
        "--connect_timeout_s=1",
        "--no-progress",
        "--video_format=none",
    )
    assert out.returncode == 1 and "no server answered at 127.0.0.1:1 within 1 s" in out.stderr, out.stderr[-2000:]


# ---------------------------------------------------------------------------------------- in process


def test_flag_error_line_words():
    fv = flags.FlagValues()
    flags.DEFINE_integer("max_frames", None, "", flag_values=fv)
    flags.DEFINE_string("artifact_path", None, "", flag_values=fv)
    _flags.check_range("max_frames", _flags.AT_LEAST_1, flag_values=fv)
    _flags.check_required("artifact_path", "the scene", flag_values=fv)
    with pytest.raises(flags.Error) as info:
        fv(["x", "--max_frames=0"])
    assert (
        _flags.flag_error_line("render-grpc", info.value, fv)
        == "render-grpc: --max-frames must be >= 1, got 0; --artifact-path is required (the scene) "
        "(see render-grpc --help)"
    )
    fv.unparse_flags()
    fv(["x", "--artifact_path=a"])  # an unset optional flag passes its range check
    assert fv.max_frames is None


@pytest.mark.parametrize(
    "allowed,good,bad",
    [
        (_flags.AT_LEAST_1, [1, 7], [0, -3]),
        (_flags.POSITIVE, [1e-3, 30.0], [0.0, -1.0, float("nan"), float("inf")]),
        (_flags.FRACTION, [0.0, 0.5, 1.0], [-0.1, 1.1]),
        (_flags.PORT, [0, 65535], [-1, 65536]),
    ],
)
def test_range(allowed, good, bad):
    assert all(allowed.ok(v) for v in good) and not any(allowed.ok(v) for v in bad)
    assert allowed.ok(None)


def test_help_args_exit_zero_before_parsing(capsys):
    parse = _flags.parser(prog="x", help_text=lambda: "usage: x [flags]")
    for arg in ("-h", "--help", "-?", "--helpshort"):
        with pytest.raises(SystemExit) as info:
            parse(["x", "--port=nonsense", arg])  # help wins over a bad value, as with absl's --help
        assert info.value.code == 0
        assert capsys.readouterr().out == "usage: x [flags]\n"
