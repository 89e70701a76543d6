import os
import subprocess
import sys


def test_scene_info_cli_prints_summary():
    # No JAX_PLATFORMS, as a user runs it: JAX probes for accelerators while the scene loads, and its
    # "Unable to initialize backend 'tpu'" line for each one it lacks stays out of the output.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run(
        [sys.executable, "-m", "nurec_jax.cli.scene_info"], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "clipgt-sample-street-0001" in out.stdout
    assert "camera_front_wide_120fov" in out.stdout and "dynamic_rigids" in out.stdout
    assert "Unable to initialize backend" not in out.stderr and out.stderr == "", out.stderr


def test_scene_info_cli_reports_bad_file(tmp_path):
    bad = tmp_path / "broken.usdz"
    bad.write_bytes(b"nope")
    out = subprocess.run(
        [sys.executable, "-m", "nurec_jax.cli.scene_info", f"--scene={bad}"],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=300,
    )
    assert out.returncode == 1
    assert "broken.usdz: not a zip archive" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def _render_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "nurec_jax.cli.render_frame", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=300,
    )


def test_render_cli_rejects_unknown_camera_and_frame(tmp_path):
    out = _render_cli(f"--output-dir={tmp_path}", "--cameras=camera_nope")
    assert out.returncode == 2 and out.stderr == (
        "nurec-render: unknown camera(s) ['camera_nope']; the scene has ['camera_front_wide_120fov', "
        "'camera_front_tele_30fov', 'camera_rear_pinhole_70fov', 'camera_left_fisheye_200fov']\n"
    )
    out = _render_cli(f"--output_dir={tmp_path}", "--cameras=camera_front_wide_120fov", "--frames=5000")
    assert out.returncode == 2 and out.stderr == "nurec-render: camera_front_wide_120fov has frames 0..119, not 5000\n"
    assert not list(tmp_path.iterdir())  # nothing written


def test_render_cli_refuses_a_directory_as_scene(tmp_path):
    out = _render_cli(f"--scene={tmp_path}", f"--output-dir={tmp_path / 'out'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr
