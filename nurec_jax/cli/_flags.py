"""NuRec-style command lines on absl flags.

NuRec's CLIs spell flags with dashes (`--artifact-glob`), negate booleans with `--no-x` and give
tuple flags as separate words (`--difix-resolution 576 1024`). Deployments (AlpaSim, CARLA) pass
exactly that, so `normalize_argv` rewrites such arguments into absl's spelling (`--artifact_glob`,
`--nox`, `--difix_resolution=576,1024`) before absl parses them; absl's own spelling works too.

`run` is what each command's `main()` calls: it answers `--help`/`-h` with the command's own flags in
groups (`_help.py`), checks values when the flags are read (ranges, required flags) and turns every
usage error into one line on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence

from absl import app, flags

from nurec_jax import logs

USAGE_EXIT = 2  # as argparse: the command line was wrong
_HELP_ARGS = ("-h", "--help", "-?", "--helpshort")


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
                values = argv[i + 1 : i + 1 + n]
                arg = f"--{under}={','.join(values)}"
                i += n
            else:
                arg = f"--{under}{eq}{value}"
        out.append(arg)
        i += 1
    return out


def _dash(name: str) -> str:
    return "--" + name.replace("_", "-")


def dash_spelling(message: str, flag_values=flags.FLAGS) -> str:
    """Rewrites absl's `--flag_name` in a message to NuRec's `--flag-name` (known flags only)."""

    def repl(m):
        return "--" + m.group(1).replace("_", "-") if m.group(1) in flag_values else m.group(0)

    return re.sub(r"--([A-Za-z][A-Za-z0-9_]*)", repl, message)


def _error_part(text: str) -> str:
    """One of absl's error lines in our words (see `flag_error_line`)."""
    m = re.match(r"flag --(\w+)=(.*?): (.*)$", text)
    if m:
        name, value, reason = m.groups()
        if reason.startswith((_dash(name), "--" + name)):  # our checks name the flag themselves
            return reason if value in ("None", "", "[]") else f"{reason}, got {value}"
        return f"--{name}={value}: {reason}"
    m = re.match(r"Unknown command line flag '(\w+)'(?:\. Did you mean: (.*?) \?)?$", text)
    if m:
        guesses = ", ".join(_dash(g.strip()) for g in (m.group(2) or "").split(",") if g.strip())
        return f"unknown flag {_dash(m.group(1))}" + (f" (did you mean {guesses}?)" if guesses else "")
    return text


def flag_error_line(prog: str, error: Exception, flag_values=flags.FLAGS) -> str:
    """One line for an absl flags.Error: `prog: --height must be in 1..65535, got -5 (see prog --help)`.

    absl words a failed check as "flag --name=value: reason" and puts each failed check on a line of
    its own; the lines are joined with "; ", in NuRec's dash spelling."""
    parts = [_error_part(" ".join(line.split())) for line in str(error).splitlines() if line.strip()]
    return f"{prog}: {dash_spelling('; '.join(parts), flag_values)} (see {prog} --help)"


def parser(multi: dict[str, int] | None = None, *, prog: str | None = None, help_text: Callable[[], str] | None = None):
    """An `app.run(flags_parser=...)` that accepts NuRec's spelling.

    With `help_text`, `--help`, `-h`, `-?` and `--helpshort` print it and exit 0 (absl's own help
    lists only "Try --helpfull" for a console script and exits 1); `--helpfull` prints absl's list of
    every flag and exits 0. A bad flag ends the program with one line on stderr (exit status 2)."""

    def parse(argv):
        name = prog or os.path.basename(argv[0])
        args = normalize_argv(argv, flags.FLAGS, multi)
        head = args[1 : args.index("--")] if "--" in args else args[1:]
        if help_text is not None and any(a in _HELP_ARGS for a in head):
            print(help_text())
            sys.exit(0)
        if "--helpfull" in head:
            app.usage(shorthelp=False, writeto_stdout=True)
            sys.exit(0)
        try:
            return flags.FLAGS(args)
        except flags.Error as e:
            print(flag_error_line(name, e), file=sys.stderr)
            sys.exit(USAGE_EXIT)

    return parse


# ----------------------------------------------------------------------------------------
# Checks run when the flags are read


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed values of a numeric flag; None (an unset optional flag) always passes.

    Attributes:
        lo: smallest value allowed (None: no bound).
        hi: largest value allowed (None: no bound).
        lo_open: `lo` itself is refused (a value must be > lo), e.g. a frame rate or a timeout.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def ok(self, value) -> bool:
        if value is None:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or value <= self.hi

    def words(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {self.lo}..{self.hi}"
        if self.lo is not None:
            return f"> {self.lo}" if self.lo_open else f">= {self.lo}"
        return f"<= {self.hi}"


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, lo_open=True)
FRACTION = Range(0, 1)
PORT = Range(0, 65535)


def check_range(name: str, allowed: Range, flag_values=flags.FLAGS) -> None:
    """Refuses values of flag `name` outside `allowed` when the flags are parsed."""
    flag_values[name]  # a KeyError here names a table entry without a flag
    flags.register_validator(
        name, allowed.ok, flag_values=flag_values, message=f"{_dash(name)} must be {allowed.words()}"
    )


def check_required(name: str, why: str, flag_values=flags.FLAGS) -> None:
    """Refuses a command line without flag `name` (or with it empty); `why` says what it is."""
    flags.register_validator(
        name, lambda v: bool(v), flag_values=flag_values, message=f"{_dash(name)} is required ({why})"
    )


def height_width(values: list[str], flag: str) -> tuple[int, int]:
    """A two-word `H W` list flag (e.g. `--difix-resolution 576 1024`) -> (H, W); app.UsageError otherwise."""
    try:
        hw = tuple(int(v) for v in values)
    except ValueError:
        raise app.UsageError(f"--{flag} takes two integers H W, got {values}") from None
    if len(hw) != 2:
        raise app.UsageError(f"--{flag} takes two integers H W, got {values}")
    if min(hw) < 1:
        raise app.UsageError(f"--{flag} takes two positive integers H W, got {values}")
    return hw


# ----------------------------------------------------------------------------------------
# Quiet start-up


def quiet_jax_platform_probe() -> None:
    """Hides JAX's "Unable to initialize backend 'tpu'" line (and its kin for other absent
    platforms), which JAX logs at INFO on every first use of a device while it probes for
    accelerators. Warnings and errors of the same logger still show, e.g. "An NVIDIA GPU may be
    present on this machine, but a CUDA-enabled jaxlib is not installed", and a platform named in
    JAX_PLATFORMS that fails to start still raises."""
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


# Every command's log flags (defined here once; each CLI module imports them, so its --help lists them).
LOG_FORMAT = flags.DEFINE_enum(
    "log_format",
    "text",
    list(logs.FORMATS),
    "Log lines on stderr: text ('time level module: message') or json (one object "
    "per line: time, level, module, message, exception) for log collectors.",
)
LOG_LEVEL = flags.DEFINE_enum(
    "log_level", "INFO", ["DEBUG", "INFO", "WARNING", "ERROR"], "Least severe log level shown."
)


def own_flags(module_globals: Mapping[str, object]) -> list[str]:
    """Names of the flags a CLI module defines (its module-level FlagHolders), in definition order, then the
    log flags every command shares."""
    names = [v.name for v in module_globals.values() if isinstance(v, flags.FlagHolder)]
    return names + [h.name for h in (LOG_FORMAT, LOG_LEVEL) if h.name not in names]


def run(
    main: Callable[[list[str]], int | None],
    *,
    prog: str,
    module_globals: Mapping[str, object],
    groups: Sequence[tuple[str, Sequence[str]]],
    multi: dict[str, int] | None = None,
    ranges: Mapping[str, Range] | None = None,
    required: Mapping[str, str] | None = None,
) -> None:
    """Runs a command's `main(argv)` the NuRec way (the console-script entry of each CLI).

    Args:
        main: the absl main; an app.UsageError it raises becomes one line on stderr (exit status 2).
        prog: the command's name, used in help and error lines (`serve-grpc`).
        module_globals: the CLI module's globals(), whose FlagHolders are the flags `--help` lists.
        groups: (title, flag names) in the order `--help` shows them; flags in no group are listed
            last under "Other flags".
        multi: tuple flags given as separate words, name -> count (see `normalize_argv`).
        ranges: flag name -> allowed values, checked when the flags are read.
        required: flag name -> what it is, for flags the command cannot run without.
    """
    from nurec_jax.cli import _help

    quiet_jax_platform_probe()
    for name, allowed in (ranges or {}).items():
        check_range(name, allowed)
    for name, why in (required or {}).items():
        check_required(name, why)
    names = own_flags(module_globals)
    doc = str(module_globals.get("__doc__") or "")

    def usage_errors_in_one_line(argv):
        logs.configure(LOG_FORMAT.value, getattr(logging, LOG_LEVEL.value))  # one format for every command
        try:
            return main(argv)
        except app.UsageError as e:
            print(f"{prog}: {dash_spelling(str(e))}", file=sys.stderr)
            return USAGE_EXIT

    app.run(
        usage_errors_in_one_line,
        flags_parser=parser(multi, prog=prog, help_text=lambda: _help.format_help(prog, doc, groups, names, multi)),
    )
