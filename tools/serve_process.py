"""`serve-grpc` in a process of its own, as a user runs it, for the demo, the load test and the tests.

    proc, port = start_serve_grpc("--artifact-glob=scene.usdz", "--test-scenes-are-valid")

The server binds port 0 on 127.0.0.1 unless the flags say otherwise; the port it got is read from its
"listening on host:port" line. By default nothing more is read, so the caller may `communicate()` with it
(its stderr log, say); a long-running server should be started with `drain=True`, which keeps reading both
pipes in the background (a full pipe would block the server) and copies stdout to `echo` if given.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import threading

_LISTENING = re.compile(r"listening on [^\s:]+:(\d+)")


class ServerDidNotStart(RuntimeError):
    """serve-grpc exited or did not listen in time; the message ends with its last stderr lines."""


def serve_grpc_env(jax_platforms: str | None = "cpu") -> dict[str, str]:
    """This environment with JAX_PLATFORMS set (None: unset, so JAX probes for accelerators itself)."""
    env = dict(os.environ)
    env.pop("JAX_PLATFORMS", None)
    if jax_platforms is not None:
        env["JAX_PLATFORMS"] = jax_platforms
    return env


def start_serve_grpc(
    *flags: str,
    env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
    drain: bool = False,
    echo=None,
    inherit_stderr: bool = False,
) -> tuple[subprocess.Popen, int]:
    """Starts `python -m nurec_jax.cli.serve_grpc --host=127.0.0.1 --port=0 *flags` (later flags override
    earlier ones); returns (process, port) once it listens.

    Args:
      env: the process environment (default: this one with JAX_PLATFORMS=cpu).
      timeout_s: how long to wait for the listening line.
      drain: keep reading stdout and stderr in the background after the listening line.
      echo: with `drain`, a text stream stdout lines are copied to (e.g. sys.stdout).
      inherit_stderr: the server's log goes to this process's stderr instead of a pipe.

    Raises:
      ServerDidNotStart: it exited or did not listen within `timeout_s` (the process is killed).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "nurec_jax.cli.serve_grpc", "--host=127.0.0.1", "--port=0", *flags],
        stdout=subprocess.PIPE,
        stderr=None if inherit_stderr else subprocess.PIPE,
        text=True,
        env=env if env is not None else serve_grpc_env(),
    )
    listening = threading.Event()
    found: dict[str, int] = {}
    errors: collections.deque[str] = collections.deque(maxlen=30)

    def read_stdout():
        for line in proc.stdout:
            if echo is not None:
                echo.write(line)
            m = _LISTENING.search(line)
            if m and "port" not in found:
                found["port"] = int(m.group(1))
                listening.set()
                if not drain:
                    return
        listening.set()  # stdout closed: the process ended

    threading.Thread(target=read_stdout, daemon=True).start()
    if drain and not inherit_stderr:
        threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
    listening.wait(timeout_s)
    if "port" not in found:
        proc.kill()
        proc.wait(30)
        err = "(see its log above)" if inherit_stderr else "".join(errors) if drain else proc.stderr.read()
        raise ServerDidNotStart(f"serve-grpc did not start:\n{(err or '')[-3000:]}")
    return proc, found["port"]
