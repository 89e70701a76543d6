import os
import subprocess
import sys


def test_scene_info_cli_prints_summary():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "nurec_jax.cli.scene_info"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "clipgt-sample-street-0001" in out.stdout
    assert "camera_front_wide_120fov" in out.stdout and "dynamic_rigids" in out.stdout


def test_scene_info_cli_reports_bad_file(tmp_path):
    bad = tmp_path / "broken.usdz"
    bad.write_bytes(b"nope")
    out = subprocess.run([sys.executable, "-m", "nurec_jax.cli.scene_info", f"--scene={bad}"],
                         capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert out.returncode == 1
    assert "broken.usdz: not a zip archive" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def _render_cli(*args):
    return subprocess.run([sys.executable, "-m", "nurec_jax.cli.render_frame", *args], capture_output=True,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)


def test_render_cli_rejects_unknown_camera_and_frame(tmp_path):
    out = _render_cli(f"--output_dir={tmp_path}", "--cameras=camera_nope")
    assert out.returncode != 0 and "unknown camera(s) ['camera_nope']" in out.stderr
    out = _render_cli(f"--output_dir={tmp_path}", "--cameras=camera_front_wide_120fov", "--frames=5000")
    assert out.returncode != 0 and "has frames 0..119, not 5000" in out.stderr
    assert not list(tmp_path.iterdir())  # nothing written
