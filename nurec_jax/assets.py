"""A scene's asset bank (`external_assets/`) and fitting an asset's Gaussians to a cuboid size.

NuRec scenes may pack swappable actor assets: `external_assets/<id>/<id>.ply` (a 3DGS PLY in the
asset's cuboid-local frame: origin at the box centre, x forward, z up, like actor Gaussians) and an
optional `external_assets/metadata.yaml` with `assets: [{track_id, label_class, cuboids_dims}]`
(docs/scene_format.md#asset-bank, docs/wire.md#asset-editing). An asset without listed dims measures itself: the
extent of its Gaussians' centres.

Host-side (numpy) only: editing happens outside jit, before device upload.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath

import numpy as np
import yaml

from nurec_jax import geometry
from nurec_jax.archive import Archive
from nurec_jax.errors import SceneFormatError
from nurec_jax.ply import parse_ply_gaussians
from nurec_jax.types import Gaussians

ASSET_DIR = "external_assets"
ASSET_METADATA = f"{ASSET_DIR}/metadata.yaml"


@dataclasses.dataclass(frozen=True)
class Asset:
    """One asset: Gaussians in its cuboid-local frame, its size and class (None when not listed)."""

    asset_id: str
    gaussians: Gaussians  # numpy arrays
    dims: np.ndarray  # (3,) [length, width, height] metres: listed, else measured
    label: str | None
    dims_listed: bool


def bank_ids(members) -> list[str]:
    """Ids of the assets packed in a scene archive (`external_assets/<id>/<id>.ply`), sorted."""
    ids = set()
    for m in members:
        parts = m.split("/")
        if len(parts) == 3 and parts[0] == ASSET_DIR and parts[2] == f"{parts[1]}.ply":
            ids.add(parts[1])
    return sorted(ids)


def _bank_metadata(archive: Archive) -> dict[str, dict]:
    if not archive.has(ASSET_METADATA):
        return {}
    where = f"{archive.name}:{ASSET_METADATA}"
    try:
        doc = yaml.safe_load(archive.read(ASSET_METADATA, 16 << 20)) or {}
    except yaml.YAMLError as e:
        raise SceneFormatError(f"{where}: not valid YAML ({e})") from None
    entries = doc.get("assets") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise SceneFormatError(f"{where}: expected a mapping with an 'assets' list")
    out = {}
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "track_id" not in e:
            raise SceneFormatError(f"{where}: assets[{i}] needs a track_id")
        out[str(e["track_id"])] = e
    return out


def _dims_of(entry: dict | None, where: str) -> np.ndarray | None:
    if entry is None or entry.get("cuboids_dims") is None:
        return None
    d = np.asarray(entry["cuboids_dims"], np.float64).reshape(-1)
    if d.shape != (3,) or not np.all(np.isfinite(d)) or np.any(d <= 0):
        raise SceneFormatError(f"{where}: cuboids_dims must be 3 positive numbers, got {entry['cuboids_dims']}")
    return d


def _as_asset(asset_id: str, data: bytes, where: str, entry: dict | None) -> Asset:
    layer = parse_ply_gaussians(data, where)
    if layer.count == 0:
        raise SceneFormatError(f"{where}: the asset has no valid Gaussians")
    g = Gaussians(layer.means, layer.quats, layer.scales, layer.opacities, layer.sh, layer.sh_degree)
    dims = _dims_of(entry, f"{where} (metadata)")
    listed = dims is not None
    if dims is None:
        dims = np.maximum(layer.means.max(0) - layer.means.min(0), 1e-3).astype(np.float64)
    label = None if entry is None or entry.get("label_class") is None else str(entry["label_class"])
    return Asset(asset_id, g, dims, label, listed)


def load_bank_asset(scene_path: str, asset_id: str, max_bytes: int = 1 << 30) -> Asset:
    """Loads asset `asset_id` of the scene's bank. Raises KeyError when the bank has no such asset."""
    with Archive(scene_path, max_bytes) as archive:
        if asset_id not in bank_ids(archive.members):
            raise KeyError(asset_id)
        member = posixpath.join(ASSET_DIR, asset_id, f"{asset_id}.ply")
        return _as_asset(
            asset_id, archive.read(member), f"{archive.name}:{member}", _bank_metadata(archive).get(asset_id)
        )


def load_ply_asset(path: str, max_bytes: int = 1 << 30) -> Asset:
    """Loads a server-side `.ply` file as an asset (its dims are measured, never listed)."""
    if not path.lower().endswith(".ply"):
        raise ValueError(f"{path!r} is not a .ply file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    if os.path.getsize(path) > max_bytes:
        raise ValueError(f"{path}: larger than the limit of {max_bytes} bytes")
    with open(path, "rb") as f:
        return _as_asset(path, f.read(), os.path.basename(path), None)


def fit_to_size(g: Gaussians, native_dims, target_dims) -> Gaussians:
    """Scales cuboid-local Gaussians from `native_dims` to `target_dims` per axis (about the origin).

    An anisotropic scaling S turns a Gaussian's covariance R D^2 R^T into S R D^2 R^T S, which is
    re-factored exactly (eigen-decomposition) into a new rotation and new scales.
    """
    s = np.asarray(target_dims, np.float64) / np.asarray(native_dims, np.float64)
    if np.allclose(s, 1.0):
        return g
    rot = geometry.quat_wxyz_to_matrix(np.asarray(g.quats, np.float64))  # (N, 3, 3)
    var = np.asarray(g.scales, np.float64) ** 2
    cov = np.einsum("nij,nj,nkj->nik", rot, var, rot)
    cov = s[None, :, None] * cov * s[None, None, :]
    w, v = np.linalg.eigh(cov)
    det = np.linalg.det(v)
    v[:, :, 0] *= np.sign(det)[:, None]  # proper rotations only
    quats = geometry.matrix_to_quat_wxyz(v)
    return dataclasses.replace(
        g,
        means=(np.asarray(g.means) * s).astype(np.float32),
        quats=quats.astype(np.float32),
        scales=np.sqrt(np.maximum(w, 1e-12)).astype(np.float32),
    )
