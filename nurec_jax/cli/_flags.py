"""NuRec-style command lines on absl flags.

NuRec's CLIs spell flags with dashes (`--artifact-glob`), negate booleans with `--no-x` and give
tuple flags as separate words (`--difix-resolution 576 1024`). Deployments (AlpaSim, CARLA) pass
exactly that, so `normalize_argv` rewrites such arguments into absl's spelling (`--artifact_glob`,
`--nox`, `--difix_resolution=576,1024`) before absl parses them; absl's own spelling works too.
"""

from __future__ import annotations

from absl import app, flags


def normalize_argv(argv: list[str], flag_values=flags.FLAGS, multi: dict[str, int] | None = None) -> list[str]:
    multi = multi or {}
    out = list(argv[:1])
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out.extend(argv[i:])
            break
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            under = name.replace("-", "_")
            if under.startswith("no_") and under[3:] in flag_values and flag_values[under[3:]].boolean:
                under = "no" + under[3:]
            if under in multi and not eq:
                n = multi[under]
                values = argv[i + 1:i + 1 + n]
                arg = f"--{under}={','.join(values)}"
                i += n
            else:
                arg = f"--{under}{eq}{value}"
        out.append(arg)
        i += 1
    return out


def parser(multi: dict[str, int] | None = None):
    """An `app.run(flags_parser=...)` that accepts NuRec's spelling."""

    def parse(argv):
        return app.parse_flags_with_usage(normalize_argv(argv, flags.FLAGS, multi))

    return parse


def height_width(values: list[str], flag: str) -> tuple[int, int]:
    """A two-word `H W` list flag (e.g. `--difix-resolution 576 1024`) -> (H, W); app.UsageError otherwise."""
    try:
        hw = tuple(int(v) for v in values)
    except ValueError:
        raise app.UsageError(f"--{flag} takes two integers H W, got {values}") from None
    if len(hw) != 2:
        raise app.UsageError(f"--{flag} takes two integers H W, got {values}")
    return hw
