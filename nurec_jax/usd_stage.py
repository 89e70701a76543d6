"""Reading the USD side of a scene with usd-core: NuRec Volume prims and ParticleField Gaussians.

Volumes are found by traversal (`omni:nurec:isNuRecVolume`), never by a fixed prim path.
Matrices are returned in column-vector form (`p_stage = T @ p_local`); USD stores row vectors.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath

import numpy as np

from nurec_jax import geometry, sh
from nurec_jax.errors import SceneFormatError, UnsupportedSceneError
from nurec_jax.payload import valid_gaussians
from nurec_jax.types import HostLayer

_LOGGER = logging.getLogger(__name__)

PARTICLE_FIELD_TYPE = "ParticleField3DGaussianSplat"


@dataclasses.dataclass(frozen=True)
class VolumeRef:
    """A NuRec Volume prim: where it sits and which payload member it reads."""

    prim_path: str
    T_stage_volume: np.ndarray  # (4, 4)
    payload_member: str
    payload_path_as_written: str


def _usd():
    from pxr import Usd, UsdGeom  # deferred: importing pxr costs ~0.3 s

    return Usd, UsdGeom


def open_stage(root_layer_path: str, where: str):
    Usd, _ = _usd()
    try:
        stage = Usd.Stage.Open(root_layer_path)
    except Exception as e:  # pxr raises Tf.ErrorException
        raise SceneFormatError(f"{where}: USD layer cannot be opened ({str(e).strip().splitlines()[-1]})") from None
    if stage is None:
        raise SceneFormatError(f"{where}: USD layer cannot be opened")
    return stage


def _local_to_world(prim) -> np.ndarray:
    Usd, UsdGeom = _usd()
    xf = UsdGeom.Xformable(prim)
    if not xf:
        # Not xformable itself: compose the nearest xformable ancestor.
        parent = prim.GetParent()
        return _local_to_world(parent) if parent and parent.GetPath().pathString != "/" else np.eye(4)
    m = xf.ComputeLocalToWorldTransform(Usd.TimeCode.Default())
    return np.array(m, dtype=np.float64).T  # USD matrices are row-vector form


def _member_of_asset(attr, extract_root: str) -> tuple[str, str]:
    value = attr.Get()
    written = getattr(value, "path", None) or str(value or "")
    layer_dir = ""
    stack = attr.GetPropertyStack()
    if stack:
        real = stack[0].layer.realPath
        if real:
            rel = os.path.relpath(os.path.dirname(real), extract_root)
            layer_dir = "" if rel == "." else rel.replace(os.sep, "/")
    path = written[2:] if written.startswith("./") else written
    return posixpath.normpath(posixpath.join(layer_dir, path)), written


def find_nurec_volumes(stage, extract_root: str, where: str) -> list[VolumeRef]:
    """All NuRec Volumes of the composed stage with their payload members."""
    volumes: list[VolumeRef] = []
    Usd, _ = _usd()
    for prim in stage.Traverse(Usd.TraverseInstanceProxies()):
        attr = prim.GetAttribute("omni:nurec:isNuRecVolume")
        if not attr or not attr.Get():
            continue
        path = prim.GetPath().pathString
        members: list[tuple[str, str]] = []
        for rel in prim.GetRelationships():
            if not rel.GetName().startswith("field:"):
                continue
            for target in rel.GetTargets():
                field = stage.GetPrimAtPath(target)
                fattr = field.GetAttribute("filePath") if field else None
                if fattr and fattr.HasAuthoredValue():
                    members.append(_member_of_asset(fattr, extract_root))
        # Field prims may also simply be children of the Volume.
        if not members:
            for child in prim.GetChildren():
                fattr = child.GetAttribute("filePath")
                if fattr and fattr.HasAuthoredValue():
                    members.append(_member_of_asset(fattr, extract_root))
        distinct = sorted(set(members))
        if not distinct:
            raise SceneFormatError(f"{where}: NuRec volume {path} has no field asset with a filePath")
        if len({m for m, _ in distinct}) > 1:
            raise UnsupportedSceneError(f"{where}: NuRec volume {path} references several payloads {distinct}")
        member, written = distinct[0]
        volumes.append(VolumeRef(path, _local_to_world(prim), member, written))
    return volumes


def _first_attr(prim, names: tuple[str, ...]):
    for name in names:
        attr = prim.GetAttribute(name)
        if attr and attr.HasAuthoredValue():
            value = attr.Get()
            if value is not None:
                return np.asarray(value, dtype=np.float64)
    return None


def _fit(arr, n: int, shape: tuple[int, ...], default) -> np.ndarray:
    """Schema rule: too long -> truncated; too short -> ignored (defaults apply)."""
    if arr is None or arr.shape[0] < n:
        return np.broadcast_to(np.asarray(default, np.float64), (n, *shape)).copy()
    return arr[:n].reshape(n, *shape)


def read_particle_fields(stage, where: str) -> list[HostLayer]:
    """Reads every `ParticleField3DGaussianSplat` prim (post-activation values) into world-frame layers."""
    Usd, _ = _usd()
    layers: list[HostLayer] = []
    for prim in stage.Traverse(Usd.TraverseInstanceProxies()):
        if prim.GetTypeName() != PARTICLE_FIELD_TYPE:
            continue
        path = prim.GetPath().pathString
        pos = _first_attr(prim, ("positions", "positionsh"))
        if pos is None or pos.size == 0:
            _LOGGER.warning("%s: %s has no positions; skipped", where, path)
            continue
        pos = pos.reshape(-1, 3)
        n = pos.shape[0]
        quat = _first_attr(prim, ("orientations", "orientationsh"))
        if quat is not None:
            # Vt quaternion arrays expose Gf's memory layout (i, j, k, real) to numpy; reorder to wxyz.
            quat = quat.reshape(-1, 4)[:, [3, 0, 1, 2]]
        quat = _fit(quat, n, (4,), [1.0, 0.0, 0.0, 0.0])
        scales = _fit(_first_attr(prim, ("scales", "scalesh")), n, (3,), [1.0, 1.0, 1.0])
        opac = _fit(_first_attr(prim, ("opacities", "opacitiesh")), n, (), 1.0)
        deg_attr = prim.GetAttribute("radiance:sphericalHarmonicsDegree")
        degree = int(deg_attr.Get()) if deg_attr and deg_attr.HasAuthoredValue() else 3
        if not 0 <= degree <= sh.MAX_DEGREE:
            raise UnsupportedSceneError(f"{where}: {path} radiance:sphericalHarmonicsDegree={degree} (max 3)")
        k = sh.num_coeffs(degree)
        coeffs = _first_attr(
            prim, ("radiance:sphericalHarmonicsCoefficients", "radiance:sphericalHarmonicsCoefficientsh")
        )
        if coeffs is None or coeffs.reshape(-1, 3).shape[0] < n * k:
            coeffs = np.zeros((n, k, 3))  # DC 0 in the 3DGS convention is colour 0.5
        else:
            coeffs = coeffs.reshape(-1, 3)[: n * k].reshape(n, k, 3)
        valid = valid_gaussians(pos, quat, scales, opac, coeffs)
        t = _local_to_world(prim)
        means, quats, scl, coeffs_w = transform_gaussians(
            t, pos[valid], geometry.normalize_quat(quat[valid]), scales[valid], coeffs[valid], degree, where
        )
        layers.append(
            HostLayer(
                name=path,
                rigid=False,
                means=means.astype(np.float32),
                quats=quats.astype(np.float32),
                scales=scl.astype(np.float32),
                opacities=np.clip(opac[valid], 0.0, 1.0).astype(np.float32),
                sh=coeffs_w.astype(np.float32),
                sh_degree=degree,
                cuboid_ids=None,
                track_ids=(),
                dropped=int(n - valid.sum()),
                colour_convention="3dgs",
            )
        )
    return layers


def transform_gaussians(T: np.ndarray, means, quats_wxyz, scales, coeffs, degree: int, where: str):
    """Applies a similarity transform (rotation or reflection, uniform scale, translation) to Gaussians.

    Returns (means, quats, scales, sh) in the outer frame. The SH coefficients are rotated so that
    colours seen from the outer frame match those seen in the inner frame.
    """
    if np.allclose(T, np.eye(4), atol=1e-12):
        return means, quats_wxyz, scales, coeffs
    try:
        q, s, t = geometry.decompose_similarity(T)
    except ValueError as e:
        raise UnsupportedSceneError(f"{where}: transform cannot be applied to Gaussians: {e}") from None
    means = s * means @ q.T + t
    scales = s * scales
    if np.linalg.det(q) > 0:
        quats = geometry.quat_multiply_wxyz(geometry.matrix_to_quat_wxyz(q), quats_wxyz)
    else:
        # Reflection Q: Q R F (F = diag(1, 1, -1)) is a rotation with the same covariance;
        # Q R F = (-Q) R (-F), and -F is the half turn about z, quaternion (0, 0, 0, 1).
        qn = geometry.matrix_to_quat_wxyz(-q)
        quats = geometry.quat_multiply_wxyz(geometry.quat_multiply_wxyz(qn, quats_wxyz), np.array([0.0, 0.0, 0.0, 1.0]))
    if degree > 0:
        m = sh.rotation_matrix_for_sh(q, degree)
        coeffs = np.einsum("kj,njc->nkc", m, coeffs)
    return means, geometry.normalize_quat(quats), scales, coeffs
