"""The README's Python snippets and its health-check one-liner run as written (a server on another port
stands in for localhost:8080)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def _block(marker: str) -> str:
    found = [b for b in PYTHON_BLOCKS if marker in b]
    assert len(found) == 1, f"one README python block with {marker!r}"
    return found[0]


def _python(code: str, timeout=600):
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )


def test_every_python_block_is_covered():
    markers = ("insecure_channel(", "read_scene_metadata(", "jax.grad(")
    assert len(PYTHON_BLOCKS) == len(markers) and all(any(m in b for b in PYTHON_BLOCKS) for m in markers)


def test_loader_snippet_runs():
    out = _python(_block("read_scene_metadata("))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "clipgt-sample-street-0001" in out.stdout


def test_rendering_and_gradient_snippet_runs():
    """The render runs as written; the gradient line is traced, not compiled (`jax.eval_shape`): its numbers
    are checked against finite differences in tests/test_render_grad.py, and compiling the backward pass
    here again would cost half a minute of the suite."""
    code = _block("jax.grad(")
    grad_line = "jax.grad(loss)(jax.numpy.zeros(6))"
    assert grad_line in code
    code = code.replace(grad_line, "print('grad', jax.eval_shape(jax.grad(loss), jax.numpy.zeros(6)).shape)")
    out = _python(code + "\nprint('ok', out.rgb.shape)\n")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok (180, 320, 3)" in out.stdout and "grad (6,)" in out.stdout


@pytest.fixture
def server(tmp_path):
    from tools.serve_process import start_serve_grpc
    from tools.thin_scene import write_thin_scene

    scene = write_thin_scene(tmp_path / "thin.usdz", keep_every=200, scene_id="thin-street")
    proc, port = start_serve_grpc(
        f"--artifact-glob={scene}",
        "--test-scenes-are-valid",
        "--no-warmup-compiles",
        "--compilation-cache-dir=",
        drain=True,
    )
    try:
        yield port
    finally:
        proc.kill()
        proc.wait(60)


@pytest.mark.xdist_group("grpc")
def test_grpc_snippets_run_against_a_server(server):
    code = _block("insecure_channel(").replace("localhost:8080", f"127.0.0.1:{server}")
    out = _python(code + "\nprint(scene_id, sorted(c.logical_id for c in cams.available_cameras)[0])\n")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["thin-street", "camera_front_tele_30fov"]
    # The health one-liner, as printed; the server reports SERVING once its scene is loaded.
    with grpc.insecure_channel(f"127.0.0.1:{server}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
        assert any(reply.status == health_pb2.HealthCheckResponse.SERVING for reply in watch)
        watch.cancel()
    line = next(l for l in README.splitlines() if l.startswith('python -c "import grpc; from grpc_health'))
    code = line[len('python -c "') : -1].replace("localhost:8080", f"127.0.0.1:{server}")
    out = _python(code, timeout=60)
    assert out.stdout.strip() == "SERVING", out.stdout + out.stderr[-2000:]
    # grpcurl is not installed here; its commands name services the server lists through reflection.
    listed = _python(
        "import grpc\nfrom grpc_reflection.v1alpha import reflection_pb2 as r, reflection_pb2_grpc as g\n"
        f"ch = grpc.insecure_channel('127.0.0.1:{server}')\n"
        "reply = next(g.ServerReflectionStub(ch).ServerReflectionInfo(iter([r.ServerReflectionRequest("
        "list_services='')]), timeout=10))\n"
        "print(' '.join(s.name for s in reply.list_services_response.service))\n",
        timeout=60,
    )
    services = set(listed.stdout.split())
    for method in re.findall(r"^grpcurl .*? ([\w.]+)/(\w+)$", README, flags=re.MULTILINE):
        assert method[0] in services, method
