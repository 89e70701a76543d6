"""The lidar bird's-eye-view PNG's metre axes: ticks, labels, grid and scale bar where the metre mapping puts them."""

from __future__ import annotations

import numpy as np
import pytest

from nurec_jax import pointcloud

INK = np.array([235, 235, 235])


def _is_ink(px) -> bool:
    return bool(np.all(np.abs(px.astype(int) - INK) <= 1))


@pytest.mark.parametrize("range_m,size,step", [(50.0, 400, 10.0), (20.0, 200, 5.0)])
def test_ticks_labels_and_scale_bar_follow_the_metre_mapping(range_m, size, step):
    img, axes = pointcloud.bev_figure(np.zeros((0, 3)), range_m=range_m, size=size)
    assert axes.tick_m == step
    left, top = axes.left, axes.top
    px_per_m = size / (2 * range_m)
    bottom = top + size - 1
    ticks = np.arange(-range_m, range_m + step / 2, step)
    assert axes.ticks() == pytest.approx(list(ticks))
    for t in ticks:
        row = top + int(size / 2 - t * px_per_m)  # x (forward) ticks: up is forward
        col = left + int(size / 2 - t * px_per_m)  # y (left) ticks: left is left
        assert _is_ink(img[row, left - 4]), ("x tick", t)
        assert _is_ink(img[bottom + 4, col]), ("y tick", t)
        # A label beside each tick: ink left of the x tick, below the y tick.
        assert (img[row - 4 : row + 5, left - 40 : left - 9] > 128).any(), ("x label", t)
        assert (img[bottom + 10 : bottom + 24, col - 10 : col + 11] > 128).any(), ("y label", t)
    # No tick halfway between two.
    mid = top + int(size / 2 - step / 2 * px_per_m)
    assert not _is_ink(img[mid, left - 4])
    # Grid lines at the ticks inside the plot (where no point lies), none between them.
    inside = left + 3
    assert (img[top + int(size / 2 - step * px_per_m), inside] > 0).all()
    assert not img[mid, inside].any()
    # The scale bar: one bar of `step` metres, caps at both ends.
    rows = [r for r in range(top, bottom) if _is_ink(img[r, left + size - 12]) and _is_ink(img[r, left + size - 13])]
    assert rows, "no scale bar"
    bar_row = rows[-1]
    ink = np.flatnonzero([_is_ink(p) for p in img[bar_row, left : left + size]])
    length = ink.max() - ink.min()
    assert length == round(step * px_per_m)
    x0 = left + ink.min()
    assert _is_ink(img[bar_row - 4, x0]) and _is_ink(img[bar_row + 4, x0])


def test_points_land_where_the_axes_say():
    pts = np.array([[10.0, 0.0, 1.0], [0.0, -20.0, 1.0], [-30.0, 30.0, 1.0]])
    img, axes = pointcloud.bev_figure(pts, range_m=50.0, size=400, value_range=(0.0, 2.0))
    for x, y, _ in pts:
        row, col = axes.pixel(x, y)
        assert img[row, col].any() and not _is_ink(img[row, col]), (x, y)
    # The figure frames the plot: margins for the labels and the colour bar.
    assert img.shape[0] > 400 and img.shape[1] > 400 + axes.left


def test_write_bev_png_writes_the_figure(tmp_path):
    from PIL import Image

    path = tmp_path / "bev.png"
    pointcloud.write_bev_png(str(path), np.array([[5.0, 5.0, 0.0]]), value_label="intensity", value_range=(0, 1))
    with Image.open(path) as im:
        assert im.size == tuple(pointcloud.bev_figure(np.zeros((0, 3)))[0].shape[1::-1])
