"""Point-cloud files: binary PLY and a bird's-eye-view PNG of a lidar spin."""

from __future__ import annotations

import numpy as np
from PIL import Image


def write_ply(path: str, points: np.ndarray, intensities: np.ndarray | None = None,
              ring_ids: np.ndarray | None = None) -> None:
    """Binary little-endian PLY with float x, y, z, optional float intensity and ushort ring."""
    pts = np.asarray(points, np.float32).reshape(-1, 3)
    n = pts.shape[0]
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if intensities is not None:
        fields.append(("intensity", "<f4"))
    if ring_ids is not None:
        fields.append(("ring", "<u2"))
    rec = np.empty(n, dtype=fields)
    rec["x"], rec["y"], rec["z"] = pts[:, 0], pts[:, 1], pts[:, 2]
    if intensities is not None:
        rec["intensity"] = np.asarray(intensities, np.float32).reshape(-1)
    if ring_ids is not None:
        rec["ring"] = np.asarray(ring_ids).reshape(-1)
    types = {"<f4": "float", "<u2": "ushort"}
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property {types[t]} {name}" for name, t in fields]
    header.append("end_header")
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(rec.tobytes())


def read_ply_points(path: str) -> dict[str, np.ndarray]:
    """Reads what `write_ply` writes (vertex properties by name)."""
    with open(path, "rb") as f:
        data = f.read()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    lines = data[:end].decode("ascii").splitlines()
    n = next(int(l.split()[2]) for l in lines if l.startswith("element vertex"))
    types = {"float": "<f4", "ushort": "<u2", "uchar": "u1", "int": "<i4", "double": "<f8"}
    fields = [(l.split()[2], types[l.split()[1]]) for l in lines if l.startswith("property")]
    rec = np.frombuffer(data[end:], dtype=fields, count=n)
    return {name: rec[name] for name, _ in fields}


def _colormap(t: np.ndarray) -> np.ndarray:
    """t in [0, 1] -> RGB uint8 (blue - cyan - green - yellow - red)."""
    stops = np.array([[0.1, 0.2, 0.9], [0.0, 0.8, 0.9], [0.1, 0.85, 0.2], [0.95, 0.9, 0.1], [0.9, 0.15, 0.1]])
    x = np.clip(t, 0.0, 1.0) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    f = (x - i)[:, None]
    return ((stops[i] * (1 - f) + stops[i + 1] * f) * 255).astype(np.uint8)


def bev_image(points: np.ndarray, values: np.ndarray | None = None, *, range_m: float = 50.0, size: int = 800,
              value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Top view (x forward = up, y left = left) of points within +/- range_m, coloured by `values`
    (default: height z). Returns (size, size, 3) uint8; farther-up points are drawn last."""
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    vals = pts[:, 2] if values is None else np.asarray(values, np.float64).reshape(-1)
    lo, hi = value_range if value_range is not None else (
        (np.percentile(vals, 2), np.percentile(vals, 98)) if vals.size else (0.0, 1.0))
    t = (vals - lo) / max(hi - lo, 1e-9)
    col = (size / 2 - pts[:, 1] / range_m * size / 2).astype(int)
    row = (size / 2 - pts[:, 0] / range_m * size / 2).astype(int)
    ok = (row >= 0) & (row < size) & (col >= 0) & (col < size)
    order = np.argsort(pts[ok, 2], kind="stable")
    img = np.zeros((size, size, 3), np.uint8)
    img[row[ok][order], col[ok][order]] = _colormap(t[ok][order])
    c = size // 2
    img[c - 2:c + 3, c - 2:c + 3] = 255  # the sensor
    return img


def write_bev_png(path: str, points: np.ndarray, values: np.ndarray | None = None, **kw) -> None:
    Image.fromarray(bev_image(points, values, **kw), "RGB").save(path)
