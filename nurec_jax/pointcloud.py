"""Point-cloud files: binary PLY and a bird's-eye-view PNG of a lidar spin.

The BEV PNG (`bev_figure`) is the top view of `bev_image` framed by metre axes: ticks and labels on
the left (x, forward) and bottom (y, left) edges, a faint grid at the ticks, a scale bar and a colour
bar with the colour scale's end values. `BevAxes` is the metre <-> pixel mapping of a figure.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def write_ply(
    path: str, points: np.ndarray, intensities: np.ndarray | None = None, ring_ids: np.ndarray | None = None
) -> None:
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


def bev_image(
    points: np.ndarray,
    values: np.ndarray | None = None,
    *,
    range_m: float = 50.0,
    size: int = 800,
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Top view (x forward = up, y left = left) of points within +/- range_m, coloured by `values`
    (default: height z). Returns (size, size, 3) uint8; farther-up points are drawn last."""
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    vals = pts[:, 2] if values is None else np.asarray(values, np.float64).reshape(-1)
    lo, hi = (
        value_range
        if value_range is not None
        else ((np.percentile(vals, 2), np.percentile(vals, 98)) if vals.size else (0.0, 1.0))
    )
    t = (vals - lo) / max(hi - lo, 1e-9)
    col = (size / 2 - pts[:, 1] / range_m * size / 2).astype(int)
    row = (size / 2 - pts[:, 0] / range_m * size / 2).astype(int)
    ok = (row >= 0) & (row < size) & (col >= 0) & (col < size)
    order = np.argsort(pts[ok, 2], kind="stable")
    img = np.zeros((size, size, 3), np.uint8)
    img[row[ok][order], col[ok][order]] = _colormap(t[ok][order])
    c = size // 2
    img[c - 2 : c + 3, c - 2 : c + 3] = 255  # the sensor
    return img


@dataclasses.dataclass(frozen=True)
class BevAxes:
    """Where the plot of a `bev_figure` lies and how metres map to its pixels.

    Attributes:
        left: first column of the plot in the figure.
        top: first row of the plot in the figure.
        size: the plot's side, pixels (it spans -range_m .. +range_m both ways).
        range_m: half the side, metres.
        tick_m: spacing of the ticks, grid lines and the length of the scale bar, metres.
    """

    left: int
    top: int
    size: int
    range_m: float
    tick_m: float

    def pixel(self, x_m: float, y_m: float) -> tuple[int, int]:
        """(row, col) in the figure of the sensor-frame point (x forward, y left), as `bev_image` places it."""
        half = self.size / 2
        return (self.top + int(half - x_m / self.range_m * half), self.left + int(half - y_m / self.range_m * half))

    def ticks(self) -> list[float]:
        """Tick values in metres, -range_m .. +range_m (0 included)."""
        n = int(np.floor(self.range_m / self.tick_m + 1e-9))
        return [k * self.tick_m for k in range(-n, n + 1)]


_INK = (235, 235, 235)
_GRID = (55, 55, 55)
_MARGIN = {"left": 52, "top": 30, "right": 84, "bottom": 44}


def tick_spacing(range_m: float) -> float:
    """A round tick spacing (1, 2 or 5 x 10^k metres) giving 2 to 5 ticks on each side of the sensor."""
    for k in range(-2, 6):
        for m in (1, 2, 5):
            step = m * 10.0**k
            if range_m / step <= 5:
                return step
    return 10.0**6


def _label(v: float) -> str:
    return f"{v:g}"


def bev_figure(
    points: np.ndarray,
    values: np.ndarray | None = None,
    *,
    range_m: float = 50.0,
    size: int = 800,
    value_range: tuple[float, float] | None = None,
    value_label: str = "height (m)",
) -> tuple[np.ndarray, BevAxes]:
    """`bev_image` with metre axes, a grid, a scale bar and a colour bar.

    Args:
        points: (N, 3) sensor-frame points, metres (x forward, y left, z up).
        values: (N,) colour values; default: height z.
        range_m: half the plot's side, metres.
        size: the plot's side, pixels.
        value_range: colour scale ends (default: the values' 2nd and 98th percentiles).
        value_label: what the colour bar shows.

    Returns:
        ((H, W, 3) uint8 figure, its BevAxes).
    """
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    vals = pts[:, 2] if values is None else np.asarray(values, np.float64).reshape(-1)
    lo, hi = (
        value_range
        if value_range is not None
        else ((float(np.percentile(vals, 2)), float(np.percentile(vals, 98))) if vals.size else (0.0, 1.0))
    )
    plot = bev_image(pts, vals, range_m=range_m, size=size, value_range=(lo, hi))
    axes = BevAxes(_MARGIN["left"], _MARGIN["top"], size, range_m, tick_spacing(range_m))
    fig = Image.new("RGB", (axes.left + size + _MARGIN["right"], axes.top + size + _MARGIN["bottom"]), (0, 0, 0))
    # Grid lines only where no point was drawn, so they never hide data.
    empty = ~plot.any(axis=2)
    for t in axes.ticks():
        row, col = (int(v) - o for v, o in zip(axes.pixel(t, t), (axes.top, axes.left)))
        if 0 <= row < size:
            plot[row, empty[row]] = _GRID
        if 0 <= col < size:
            plot[empty[:, col], col] = _GRID
    fig.paste(Image.fromarray(plot, "RGB"), (axes.left, axes.top))
    draw = ImageDraw.Draw(fig)
    font = ImageFont.load_default(size=12)
    right, bottom = axes.left + size - 1, axes.top + size - 1
    draw.rectangle((axes.left - 1, axes.top - 1, right + 1, bottom + 1), outline=_INK)
    for t in axes.ticks():
        row, col = axes.pixel(t, t)
        # +1: the far edge (-range_m) lies one pixel past the plot's last row / column.
        if axes.top <= row <= bottom + 1:  # x ticks on the left edge
            draw.line((axes.left - 7, row, axes.left - 2, row), fill=_INK)
            draw.text((axes.left - 10, row), _label(t), fill=_INK, font=font, anchor="rm")
        if axes.left <= col <= right + 1:  # y ticks on the bottom edge
            draw.line((col, bottom + 2, col, bottom + 7), fill=_INK)
            draw.text((col, bottom + 10), _label(t), fill=_INK, font=font, anchor="mt")
    draw.text((axes.left, axes.top - 8), "x forward (m)", fill=_INK, font=font, anchor="ls")
    draw.text((axes.left + size // 2, bottom + 27), "y left (m)", fill=_INK, font=font, anchor="mt")
    _scale_bar(draw, axes, font)
    _colour_bar(fig, draw, axes, font, lo, hi, value_label)
    return np.asarray(fig), axes


def _scale_bar(draw: ImageDraw.ImageDraw, axes: BevAxes, font) -> None:
    """A bar `tick_m` metres long in the plot's lower right corner, with end caps and its length."""
    length = round(axes.tick_m / axes.range_m * axes.size / 2)
    x1 = axes.left + axes.size - 12
    x0, y = x1 - length, axes.top + axes.size - 14
    draw.rectangle((x0 - 6, y - 20, x1 + 6, y + 6), fill=(0, 0, 0))
    draw.line((x0, y, x1, y), fill=_INK, width=1)
    draw.line((x0, y - 4, x0, y + 4), fill=_INK)
    draw.line((x1, y - 4, x1, y + 4), fill=_INK)
    draw.text(((x0 + x1) // 2, y - 6), f"{_label(axes.tick_m)} m", fill=_INK, font=font, anchor="mb")


def _colour_bar(
    fig: Image.Image, draw: ImageDraw.ImageDraw, axes: BevAxes, font, lo: float, hi: float, label: str
) -> None:
    """The colour scale, `hi` at the top, right of the plot."""
    x0, height = axes.left + axes.size + 14, axes.size // 2
    y0 = axes.top + (axes.size - height) // 2
    ramp = _colormap(np.linspace(1.0, 0.0, height))
    fig.paste(Image.fromarray(np.repeat(ramp[:, None], 12, axis=1), "RGB"), (x0, y0))
    draw.text((x0, y0 - 6), label, fill=_INK, font=font, anchor="ls")
    draw.text((x0 + 16, y0), f"{hi:.3g}", fill=_INK, font=font, anchor="lm")
    draw.text((x0 + 16, y0 + height - 1), f"{lo:.3g}", fill=_INK, font=font, anchor="lm")


def write_bev_png(path: str, points: np.ndarray, values: np.ndarray | None = None, **kw) -> None:
    """Writes `bev_figure(points, values, **kw)` as a PNG."""
    Image.fromarray(bev_figure(points, values, **kw)[0], "RGB").save(path)
