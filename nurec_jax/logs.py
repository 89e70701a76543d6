"""One log format for every nurec-jax command: `time level module: message` on stderr, or one JSON object
per line (`--log-format=json`) for log collectors.

absl's `app.run` installs its own handler (a different line format) on the root logger; `configure`
replaces every root handler with ours, so the server's modules, absl, gRPC's Python logger and JAX all
write the same lines. JSON lines carry `time` (ISO 8601, UTC, milliseconds), `level`, `module` (the logger
name), `message`, and `exception` (the formatted traceback) when there is one.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "module": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def configure(fmt: str = "text", level: int = logging.INFO, stream=None) -> logging.Handler:
    """Routes every log record of the process to one handler on `stream` (default stderr) in `fmt`."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    try:  # absl logs through the standard logging module; keep it from adding its own handler back
        from absl import logging as absl_logging

        absl_logging.use_python_logging(quiet=True)
    except ImportError:  # pragma: no cover - absl is a dependency
        pass
    return handler
