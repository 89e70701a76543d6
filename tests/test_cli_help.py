"""`--help` / `-h` of the four commands: their own flags, grouped, NuRec's spelling, exit status 0."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

# command -> (module, the groups its help shows, in order)
CLIS = {
    "serve-grpc": (
        "serve_grpc",
        [
            "Server",
            "Scenes",
            "Rendering",
            "DiFix / post-processing",
            "Profiling and operations",
            "Security (who may call)",
            "Downloads (x-nre-scene-url)",
            "Accepted for NuRec compatibility",
        ],
    ),
    "render-grpc": (
        "render_grpc",
        [
            "Scene and output",
            "Server connection",
            "Security",
            "Cameras",
            "Actors",
            "Lidar",
            "Requests and progress",
            "Logging",
        ],
    ),
    "nurec-scene-info": ("scene_info", ["Scene", "Logging"]),
    "nurec-render": ("render_frame", ["Scene", "Cameras and frames", "Output", "Logging"]),
}


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", COLUMNS="100")


def _own_flags(module: str) -> dict[str, str]:
    """The flags a CLI module defines -> their help text, read in a process of its own (the four modules
    define some of the same names, so they cannot share absl's registry)."""
    code = (
        f"import json; from absl import flags; import nurec_jax.cli.{module} as m; "
        "from nurec_jax.cli import _flags; "
        "print(json.dumps({n: flags.FLAGS[n].help for n in _flags.own_flags(vars(m))}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _script(prog: str) -> str | None:
    return shutil.which(prog, path=os.path.dirname(sys.executable))


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_help_lists_every_flag_in_its_group(prog):
    module, groups = CLIS[prog]
    script = _script(prog)
    argv = [script] if script else [sys.executable, "-m", f"nurec_jax.cli.{module}"]
    out = subprocess.run(argv + ["--help"], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert text.startswith(f"usage: {prog} [flags]\n") and "Try --helpfull" not in text
    titles = re.findall(r"^(\S.*):$", text, flags=re.MULTILINE)
    assert titles == groups  # in NuRec's order, and no flag left over under "Other flags"
    own = _own_flags(module)
    listed = re.findall(r"^  --(?:\[no-\])?([a-z0-9-]+)", text, flags=re.MULTILINE)
    assert sorted(listed) == sorted(n.replace("_", "-") for n in own)
    flat = " ".join(text.split())
    for name, help_text in own.items():
        words = " ".join(re.sub(r"^<[^>]*>: ", "", help_text).split()[:4])
        assert words in flat, (name, words)


@pytest.mark.parametrize("prog", sorted(CLIS))
def test_short_help_and_module_form(prog):
    module, groups = CLIS[prog]
    out = subprocess.run(
        [sys.executable, "-m", f"nurec_jax.cli.{module}", "-h"], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert out.returncode == 0 and out.stdout.startswith(f"usage: {prog} [flags]"), out.stdout + out.stderr
    assert f"\n{groups[0]}:\n" in out.stdout


def test_help_shows_nuRec_spelling_defaults_and_choices():
    out = subprocess.run(
        [sys.executable, "-m", "nurec_jax.cli.serve_grpc", "--help"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    text = out.stdout
    assert re.search(r"^  --artifact-glob=GLOB +Recursive glob", text, flags=re.MULTILINE)
    assert re.search(r"^  --\[no-\]enable-editing-actors +Accept dynamic_objects", text, flags=re.MULTILINE)
    assert re.search(r"^  --difix-resolution H W +DiFix input H W\. \(default: 576,1024\)", text, flags=re.MULTILINE)
    assert "--timing-verbosity={NONE,SUMMARY,BASIC,DETAILS}" in text and "<NONE|" not in text
    assert re.search(r"^  --port=INT +gRPC port \(0 picks a free one\)\. \(default: 8080\)", text, flags=re.MULTILINE)
    # The security flags sit in their own section, after the operations ones.
    security = text.index("Security (who may call):")
    assert text.index("--tls-cert-file") > security > text.index("--metrics-port")
