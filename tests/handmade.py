"""A minimal NuRec `.usdz` writer written from scene_format.md alone (independent of the generator).

Tests use it to build small scenes, and malformed ones, by hand.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
import zipfile

import msgpack
import numpy as np

VOLUME_USDA = """#usda 1.0
(
    defaultPrim = "World"
    metersPerUnit = 1
    upAxis = "Z"
)

def Xform "World"
{{
    def Volume "{name}"
    {{
        {xform}
        custom bool omni:nurec:isNuRecVolume = 1
        custom bool omni:nurec:useProxyTransform = 0
        custom rel field:density = </World/{name}/density_field>
        custom rel field:emissiveColor = </World/{name}/emissive_color_field>

        def OmniNuRecFieldAsset "density_field"
        {{
            custom asset filePath = @./{payload}@
            custom token fieldName = "density"
        }}

        def OmniNuRecFieldAsset "emissive_color_field"
        {{
            custom asset filePath = @./{payload}@
            custom token fieldName = "emissiveColor"
        }}
    }}
}}
"""

DEFAULT_USDA = """#usda 1.0
(
    defaultPrim = "World"
)

def Xform "World"
{{
    over "{stem}" (
        prepend references = @./{stem}.usda@
    )
    {{
    }}
}}
"""


def volume_usda(name="volume", payload="volume.nurec", matrix_rows=None) -> bytes:
    """A Volume prim; `matrix_rows` is a USD (row-vector) 4x4 matrix for its xformOp."""
    xform = ""
    if matrix_rows is not None:
        rows = ", ".join("(" + ", ".join(repr(float(v)) for v in r) + ")" for r in matrix_rows)
        xform = f'matrix4d xformOp:transform = ({rows})\n        uniform token[] xformOpOrder = ["xformOp:transform"]'
    return VOLUME_USDA.format(name=name, payload=payload, xform=xform).encode()


def default_usda(stem="volume") -> bytes:
    return DEFAULT_USDA.format(stem=stem).encode()


def tensor(state: dict, key: str, array, dtype=np.float16) -> None:
    a = np.ascontiguousarray(np.asarray(array, dtype=dtype))
    state[key] = a.astype(a.dtype.newbyteorder("<")).tobytes()
    state[key + ".shape"] = list(a.shape)


def gaussian_layer(state: dict, layer: str, n: int, rng, *, fourier=None, degree=3, positions=None,
                   cuboid_ids=None, albedo=None, specular=None, rotations=None, densities=None, scales=None):
    p = f".gaussians_nodes.{layer}."
    pos = rng.uniform(-5, 5, (n, 3)) if positions is None else positions
    tensor(state, p + "positions", pos)
    rot = rng.normal(size=(n, 4)) * 3.0 if rotations is None else rotations
    tensor(state, p + "rotations", rot)
    scl = np.log(rng.uniform(0.02, 0.2, (n, 3))) if scales is None else scales
    tensor(state, p + "scales", scl)
    dens = rng.normal(0, 2, (n, 1)) if densities is None else densities
    tensor(state, p + "densities", dens)
    if albedo is None:
        albedo = rng.uniform(0, 1, (n, 3) if fourier is None else (n, fourier, 3))
    tensor(state, p + "features_albedo", albedo)
    k = (degree + 1) ** 2 - 1
    if k:
        spec = rng.normal(0, 0.1, (n, 3 * k)) if specular is None else specular
        tensor(state, p + "features_specular", spec)
    tensor(state, p + "n_active_features", np.array(degree), np.int64)
    if cuboid_ids is not None:
        tensor(state, p + "gaussian_cuboid_ids", cuboid_ids, np.int32)
    return dict(positions=pos, rotations=rot, scales=scl, densities=dens, albedo=albedo)


def layer_config(o0=True, degree=3, **over):
    cfg = {"density_activation": "sigmoid", "scale_activation": "exp", "rotation_activation": "normalize",
           "particle": {"radiance_sph_degree": degree, "radiance_sph_O0": o0}}
    cfg.update(over)
    return cfg


def payload(state: dict, config: dict, level: int = 0) -> bytes:
    doc = {"nre_data": {"version": "26.4.0", "model": "nre", "config": config, "state_dict": state}}
    return gzip.compress(msgpack.packb(doc, use_bin_type=True), compresslevel=level)


def usdz(path, members, pad64=False, compression=zipfile.ZIP_STORED) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            if pad64:
                pad = (-(buf.tell() + 30 + len(name))) % 64
                if pad and pad < 4:
                    pad += 64
                if pad:
                    info.extra = struct.pack("<HH", 0x1986, pad - 4) + b"\0" * (pad - 4)
            z.writestr(info, data)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def jbytes(obj) -> bytes:
    return json.dumps(obj).encode()
