"""Lidar sensor models as data: beam elevations, per-beam azimuth offsets, column azimuths (firing
order), spin rate and range limits (docs/rendering.md#lidar-beam-model, docs/wire.md#lidar-requests).

Ray (row i, column j): elevation a = E[i], azimuth b = B[j] + D[i], direction in the lidar frame
(x forward, y left, z up) = (cos b cos a, sin b cos a, sin a). Columns fire in table order over the
spin: column j at relative time j / (C - 1) of [frame_start, frame_end).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from nurec_jax.metadata import LidarCalibration, parse_floats


@dataclasses.dataclass(frozen=True)
class LidarModel:
    """A row-offset spinning (or scanning) lidar.

    Attributes:
      name: device or calibration name.
      elevations_rad: (R,) beam elevations, in ring (row id) order.
      row_azimuth_offsets_rad: (R,) per-beam azimuth offsets.
      column_azimuths_rad: (C,) column azimuths in firing order (uniform step, either sign).
      spin_frequency_hz: spins (or scans) per second.
      min_range_m, max_range_m: returns outside are dropped.
    """

    name: str
    elevations_rad: np.ndarray
    row_azimuth_offsets_rad: np.ndarray
    column_azimuths_rad: np.ndarray
    spin_frequency_hz: float = 10.0
    min_range_m: float = 0.3
    max_range_m: float = 200.0

    def __post_init__(self):
        e = np.asarray(self.elevations_rad, np.float64)
        off = np.asarray(self.row_azimuth_offsets_rad, np.float64)
        az = np.asarray(self.column_azimuths_rad, np.float64)
        if e.ndim != 1 or e.size == 0 or off.shape != e.shape:
            raise ValueError(f"lidar {self.name}: {e.size} elevations but {off.size} row azimuth offsets")
        if az.ndim != 1 or az.size < 2:
            raise ValueError(f"lidar {self.name}: needs at least 2 column azimuths")
        steps = np.diff(az)
        step = (az[-1] - az[0]) / (az.size - 1)
        if step == 0 or np.max(np.abs(steps - step)) > 0.25 * abs(step):
            raise ValueError(f"lidar {self.name}: column azimuths must have a uniform step")
        if not (0 <= self.min_range_m < self.max_range_m):
            raise ValueError(f"lidar {self.name}: bad range [{self.min_range_m}, {self.max_range_m}]")
        object.__setattr__(self, "elevations_rad", e)
        object.__setattr__(self, "row_azimuth_offsets_rad", off)
        object.__setattr__(self, "column_azimuths_rad", az)

    @property
    def rows(self) -> int:
        return int(self.elevations_rad.size)

    @property
    def columns(self) -> int:
        return int(self.column_azimuths_rad.size)

    @property
    def azimuth_step(self) -> float:
        az = self.column_azimuths_rad
        return float((az[-1] - az[0]) / (az.size - 1))

    @property
    def full_circle(self) -> bool:
        """Whether the columns cover 360 degrees (azimuth wraps)."""
        return abs(self.azimuth_step) * self.columns >= 2 * math.pi - 1e-6

    @property
    def rays_per_spin(self) -> int:
        return self.rows * self.columns

    def static_key(self) -> tuple:
        """What a compiled ray caster depends on besides array values."""
        return (self.name, self.rows, self.columns, self.full_circle)


def pandar128_elevations_deg() -> np.ndarray:
    """Pandar128-like beam elevations, +14.44 .. -25.02 deg (the published span), dense near the
    horizon (~0.12 deg) and ~0.5 deg toward the ends. The per-beam table is not public: plausible."""
    u = np.linspace(0.0, 1.0, 128)
    f = u + 0.1 * np.sin(2 * np.pi * u)
    return 14.44 - 39.46 * f


def pandar128() -> LidarModel:
    """Hesai Pandar128: 128 beams, 360 deg at 0.1 deg (3600 columns), 10 Hz, clockwise, 0.3-200 m.
    Per-beam azimuth offsets: a plausible +/-0.65 / +/-1.95 deg pattern (the calibration is per unit)."""
    return LidarModel(
        "PANDAR128",
        np.radians(pandar128_elevations_deg()),
        np.radians(np.tile([1.3, -1.3, 3.9, -3.9], 32) * 0.5),
        np.linspace(math.pi, -math.pi, 3600, endpoint=False),  # clockwise seen from above
        10.0,
        0.3,
        200.0,
    )


def at128() -> LidarModel:
    """Hesai AT128: 128 beams over +12.9 .. -12.5 deg (0.2 deg), 120 deg HFOV at 0.1 deg (1200 columns),
    10 Hz, scanning left to right, 0.5-200 m. Per-beam azimuth offsets are not public: zero."""
    return LidarModel(
        "AT128",
        np.radians(np.linspace(12.9, -12.5, 128)),
        np.zeros(128),
        np.radians(np.linspace(60.0, -60.0, 1200, endpoint=False)),
        10.0,
        0.5,
        200.0,
    )


DEVICES = {"PANDAR128": pandar128, "AT128": at128}


def from_parameters(name: str, params: Mapping[str, Any]) -> LidarModel:
    """A `row-offset-spinning` calibration's parameters -> LidarModel (ValueError naming the key)."""
    where = f"lidar {name}"
    try:
        elev = parse_floats(params["row_elevations_rad"], f"{where}.row_elevations_rad", error=ValueError)
        az = parse_floats(params["column_azimuths_rad"], f"{where}.column_azimuths_rad", error=ValueError)
    except KeyError as e:
        raise ValueError(f"{where}: missing parameter {e.args[0]!r}") from None
    offsets = params.get("row_azimuth_offsets_rad")
    offsets = (
        (0.0,) * len(elev)
        if offsets is None
        else parse_floats(offsets, f"{where}.row_azimuth_offsets_rad", error=ValueError)
    )
    return LidarModel(
        name,
        np.asarray(elev),
        np.asarray(offsets),
        np.asarray(az),
        float(params.get("spinning_frequency_hz", 10.0)),
        float(params.get("min_range_m", 0.3)),
        float(params.get("max_range_m", 200.0)),
    )


def from_calibration(cal: LidarCalibration) -> LidarModel:
    if not cal.model:
        raise ValueError(f"lidar {cal.logical_id}: the scene file has no lidar model for it (lidar_model is null)")
    if cal.model != "row-offset-spinning":
        raise ValueError(f"lidar {cal.logical_id}: model {cal.model!r} is not supported (row-offset-spinning only)")
    return from_parameters(cal.logical_id, cal.parameters)
