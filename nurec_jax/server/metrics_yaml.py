"""NRE's `<--metrics-output-dir>/metrics.yaml`: render-time samples per method after the warm-up renders.

Written by hand (flat mappings and flow lists of floats), so the file reads the same under YAML 1.1 and 1.2
readers (PyYAML's 1.1 resolver would read a float dumped as "1e-05" as a string).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

METRICS_FILENAME = "metrics.yaml"


_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def _yaml_key(key: str) -> str:
    if _PLAIN_KEY.match(key) and key.lower() not in _YAML_WORDS:
        return key
    return json.dumps(key)  # a JSON string is a valid YAML double-quoted scalar


def _yaml_scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if math.isnan(v):
        return ".nan"
    if math.isinf(v):
        return ".inf" if v > 0 else "-.inf"
    # Fixed point: always a '.', never an exponent (PyYAML's YAML 1.1 resolver reads "1e-05" as a string).
    return f"{v:.4f}"


def metrics_yaml(metrics: dict[str, dict[str, Any]], warmup_renders: int) -> str:
    """metrics.yaml text for `TimingLog.metrics()`:

    # nurec-jax render metrics ...
    warmup_renders: 3
    render_rgb:
      count: 2
      warmup_skipped: 3
      mean_ms: 11.0000
      ...
      samples_ms: [10.0000, 12.0000]
      stage_mean_ms:
        render: 11.0000
    """
    lines = [
        "# nurec-jax render metrics (--metrics-output-dir): render-time samples in ms, per method,",
        f"# after the first {warmup_renders} renders of each method (warm-up).",
        f"warmup_renders: {warmup_renders}",
    ]
    for method, m in metrics.items():
        lines.append(f"{_yaml_key(method)}:")
        for key, v in m.items():
            if isinstance(v, dict):
                lines.append(f"  {key}:" + ("" if v else " {}"))
                lines.extend(f"    {_yaml_key(k)}: {_yaml_scalar(x)}" for k, x in v.items())
            elif isinstance(v, (list, tuple)):
                lines.append(f"  {key}: [{', '.join(_yaml_scalar(x) for x in v)}]")
            else:
                lines.append(f"  {key}: {_yaml_scalar(v)}")
    return "\n".join(lines) + "\n"
