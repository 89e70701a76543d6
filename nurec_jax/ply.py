"""The standard 3DGS `.ply` (Inria layout): binary little-endian vertices with pre-activation values.

Properties: x y z, [nx ny nz], f_dc_0..2, f_rest_0..(3K-1) (channel-major), opacity (logit),
scale_0..2 (log), rot_0..3 (w, x, y, z, unnormalised).
"""

from __future__ import annotations

import math
import os

import numpy as np

from nurec_jax import sh
from nurec_jax.errors import SceneFormatError
from nurec_jax.payload import activated_layer
from nurec_jax.types import HostLayer

_PLY_TYPES = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "i2",
    "int16": "i2",
    "ushort": "u2",
    "uint16": "u2",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
    "float": "f4",
    "float32": "f4",
    "double": "f8",
    "float64": "f8",
}


def _parse_header(data: bytes, where: str):
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply") or end < 0:
        raise SceneFormatError(f"{where}: not a PLY file (no 'ply' magic or 'end_header')")
    lines = data[:end].decode("ascii", errors="replace").splitlines()
    fmt = None
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []
    for line in lines[1:]:
        tok = line.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format":
            fmt = tok[1]
        elif tok[0] == "element":
            elements.append((tok[1], int(tok[2]), []))
        elif tok[0] == "property":
            if not elements:
                raise SceneFormatError(f"{where}: property before any element")
            if tok[1] == "list":
                raise SceneFormatError(f"{where}: list properties are not part of a 3DGS PLY")
            if tok[1] not in _PLY_TYPES:
                raise SceneFormatError(f"{where}: unknown PLY type {tok[1]!r}")
            elements[-1][2].append((tok[2], _PLY_TYPES[tok[1]]))
    if fmt != "binary_little_endian":
        raise SceneFormatError(f"{where}: PLY format {fmt!r} is not supported (binary_little_endian only)")
    return end + len(b"end_header\n"), elements


def read_ply_gaussians(path: str | os.PathLike, max_bytes: int = 8 << 30) -> HostLayer:
    """Reads a 3DGS `.ply` file into an activated layer (identity frame)."""
    where = os.path.basename(os.fspath(path))
    if os.path.getsize(path) > max_bytes:
        raise SceneFormatError(f"{where}: file exceeds the limit of {max_bytes} bytes")
    with open(path, "rb") as f:
        data = f.read()
    return parse_ply_gaussians(data, where)


def parse_ply_gaussians(data: bytes, where: str) -> HostLayer:
    offset, elements = _parse_header(data, where)
    if not elements or elements[0][0] != "vertex":
        raise SceneFormatError(f"{where}: first element must be 'vertex'")
    _, n, props = elements[0]
    dtype = np.dtype([(name, "<" + t) for name, t in props])
    if len(data) - offset < n * dtype.itemsize:
        raise SceneFormatError(f"{where}: truncated ({len(data) - offset} bytes for {n} vertices of {dtype.itemsize})")
    v = np.frombuffer(data, dtype=dtype, count=n, offset=offset)
    names = set(dtype.names or ())
    need = [
        "x",
        "y",
        "z",
        "f_dc_0",
        "f_dc_1",
        "f_dc_2",
        "opacity",
        "scale_0",
        "scale_1",
        "scale_2",
        "rot_0",
        "rot_1",
        "rot_2",
        "rot_3",
    ]
    missing = [p for p in need if p not in names]
    if missing:
        raise SceneFormatError(f"{where}: missing 3DGS vertex properties {missing}")
    col = lambda *ks: np.stack([v[k].astype(np.float64) for k in ks], -1)  # noqa: E731
    pos = col("x", "y", "z")
    dc = col("f_dc_0", "f_dc_1", "f_dc_2")
    rest_names = sorted((k for k in names if k.startswith("f_rest_")), key=lambda k: int(k[7:]))
    k_rest = len(rest_names) // 3
    degree = round(math.sqrt(k_rest + 1)) - 1
    if len(rest_names) % 3 or (degree + 1) ** 2 - 1 != k_rest or degree > sh.MAX_DEGREE:
        raise SceneFormatError(f"{where}: {len(rest_names)} f_rest properties is not 3*((d+1)^2-1), d<=3")
    # f_rest is channel-major: index = channel * K + coefficient.
    rest = col(*rest_names).reshape(n, 3, k_rest).transpose(0, 2, 1) if k_rest else np.zeros((n, 0, 3))
    coeffs = np.concatenate([dc[:, None, :], rest], axis=1)
    rot = col("rot_0", "rot_1", "rot_2", "rot_3")
    scl = col("scale_0", "scale_1", "scale_2")
    opa = v["opacity"].astype(np.float64)
    return activated_layer("gaussians", pos, rot, scl, opa, coeffs, degree, colour_convention="3dgs", where=where)


def write_ply_gaussians(path: str | os.PathLike, means, quats_wxyz, log_scales, opacity_logits, sh_coeffs) -> None:
    """Writes pre-activation Gaussians as a 3DGS `.ply` (sh_coeffs: (N, K, 3), DC first)."""
    with open(path, "wb") as f:
        f.write(ply_bytes(means, quats_wxyz, log_scales, opacity_logits, sh_coeffs))


def ply_bytes(means, quats_wxyz, log_scales, opacity_logits, sh_coeffs) -> bytes:
    """The bytes of a 3DGS `.ply` holding pre-activation Gaussians (sh_coeffs: (N, K, 3), DC first)."""
    sh_coeffs = np.asarray(sh_coeffs)
    n, k, _ = sh_coeffs.shape
    fields = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    fields += [f"f_rest_{i}" for i in range(3 * (k - 1))]
    fields += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    rest = np.asarray(sh_coeffs[:, 1:, :]).transpose(0, 2, 1).reshape(n, -1)
    cols = np.concatenate(
        [
            means,
            np.zeros((n, 3)),
            sh_coeffs[:, 0, :],
            rest,
            np.asarray(opacity_logits).reshape(n, 1),
            log_scales,
            quats_wxyz,
        ],
        axis=1,
    ).astype("<f4")
    header = "ply\nformat binary_little_endian 1.0\nelement vertex %d\n" % n
    header += "".join(f"property float {f}\n" for f in fields) + "end_header\n"
    return header.encode("ascii") + np.ascontiguousarray(cols).tobytes()
