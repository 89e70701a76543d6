"""Decoding of the NuRec `.nurec` payload: gzip -> msgpack -> `nre_data` -> Gaussian layers (numpy).

Host-only. See scene_format.md section 3. Stored values are pre-activation; this module applies the
activations the layer config names and returns render-ready arrays (types.Gaussians conventions).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from typing import Any, Mapping

import msgpack
import numpy as np

from nurec_jax import geometry, sh
from nurec_jax.errors import SceneFormatError, UnsupportedSceneError

_LOGGER = logging.getLogger(__name__)

_LAYER_PREFIX = ".gaussians_nodes."
# Tensors whose dtype is not float (NRE stores every float tensor as float16, other dtypes as-is).
_INT_TENSORS = {
    "gaussian_cuboid_ids": np.int32,
    "n_active_features": np.int64,
    "time_embed.timestamps_us_ranges": np.int64,
}
_FLOAT_BY_ITEMSIZE = {2: np.float16, 4: np.float32, 8: np.float64}
_ANY_BY_ITEMSIZE = {1: np.uint8, 2: np.float16, 4: np.int32, 8: np.int64}
_REQUIRED = ("positions", "rotations", "scales", "densities", "features_albedo")
_SUPPORTED_ACTIVATIONS = {
    "density_activation": ("sigmoid",),
    "scale_activation": ("exp",),
    "rotation_activation": ("normalize",),
}


@dataclasses.dataclass(frozen=True)
class HostLayer:
    """One decoded Gaussian layer, activated, float32 numpy.

    Attributes:
      name: layer name (`background`, `road`, `dynamic_rigids`, `gaussians`, ...).
      rigid: True for rigid-actor layers (Gaussians in cuboid-local frames).
      means, quats, scales, opacities, sh: as in `types.Gaussians`.
      sh_degree: active degree.
      cuboid_ids: (N,) int32 index into `track_ids` (rigid layers), else None.
      track_ids: the layer's own clean track list (rigid layers), else ().
      dropped: number of Gaussians dropped for non-finite or degenerate values.
      colour_convention: "radiance_sph_O0" or "3dgs" (what the file stored; `sh` is always 3dgs).
    """

    name: str
    rigid: bool
    means: np.ndarray
    quats: np.ndarray
    scales: np.ndarray
    opacities: np.ndarray
    sh: np.ndarray
    sh_degree: int
    cuboid_ids: np.ndarray | None
    track_ids: tuple[str, ...]
    dropped: int
    colour_convention: str
    lidar_intensity: np.ndarray | None = None  # (N,) the layer's lidar feature (channel 0), if it has one

    @property
    def count(self) -> int:
        return int(self.means.shape[0])


@dataclasses.dataclass(frozen=True)
class Payload:
    """A decoded `.nurec` payload."""

    version: str
    config: Mapping[str, Any]
    layers: tuple[HostLayer, ...]
    sky_cubemap: np.ndarray | None  # (6, S, S, 3) float32
    skipped_layers: tuple[str, ...]


def gunzip_limited(data: bytes, limit: int, where: str) -> bytes:
    """Gunzips `data`, refusing to produce more than `limit` bytes (gzip bombs)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = bytearray()
    pending = data
    try:
        while True:
            buf = d.decompress(pending, 1 << 20)
            out += buf
            if len(out) > limit:
                raise SceneFormatError(
                    f"{where}: decompressed payload exceeds the limit of {limit} bytes "
                    "(raise max_payload_bytes if the scene is genuine)"
                )
            if d.eof:
                break
            pending = d.unconsumed_tail
            if not pending and not buf:
                break
    except zlib.error as e:
        raise SceneFormatError(f"{where}: not a valid gzip stream ({e})") from None
    if not d.eof:
        raise SceneFormatError(f"{where}: gzip stream is truncated")
    return bytes(out)


def unpack_nre_data(raw: bytes, where: str) -> Mapping[str, Any]:
    try:
        doc = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated exception types
        raise SceneFormatError(f"{where}: payload is not valid msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("nre_data"), Mapping):
        raise SceneFormatError(f"{where}: payload has no 'nre_data' map")
    nre = doc["nre_data"]
    if not isinstance(nre.get("state_dict"), Mapping):
        raise SceneFormatError(f"{where}: nre_data has no 'state_dict' map")
    return nre


def decode_tensor(state: Mapping[str, Any], key: str, where: str) -> np.ndarray:
    """Decodes state_dict[key] (raw little-endian bytes) using state_dict[key + '.shape']."""
    if key not in state:
        raise SceneFormatError(f"{where}: tensor {key!r} is missing")
    data = state[key]
    shape = state.get(key + ".shape")
    if not isinstance(data, (bytes, bytearray)):
        raise SceneFormatError(f"{where}: {key!r} is not a byte string")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise SceneFormatError(f"{where}: {key + '.shape'!r} missing or not a list of ints: {shape!r}")
    count = math.prod(shape)
    suffix = key.split(".", 3)[-1] if key.startswith(_LAYER_PREFIX) else key
    if suffix in _INT_TENSORS:
        dtype = np.dtype(_INT_TENSORS[suffix])
    elif count == 0:
        dtype = np.dtype(np.float16)
    else:
        itemsize, rem = divmod(len(data), count)
        table = _ANY_BY_ITEMSIZE if suffix.endswith("_extra_state") else _FLOAT_BY_ITEMSIZE
        if rem or itemsize not in table:
            raise SceneFormatError(
                f"{where}: {key!r} holds {len(data)} bytes, which does not fit shape {shape}"
            )
        dtype = np.dtype(table[itemsize])
    if len(data) != count * dtype.itemsize:
        raise SceneFormatError(
            f"{where}: {key!r} holds {len(data)} bytes but shape {shape} of {dtype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(shape).astype(dtype.newbyteorder("="))


def _layer_names(config: Mapping[str, Any], state: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    layers_cfg = config.get("layers") if isinstance(config, Mapping) else None
    if isinstance(layers_cfg, Mapping):
        names.extend(str(n) for n in layers_cfg)
    for key in state:
        if isinstance(key, str) and key.startswith(_LAYER_PREFIX):
            name = key[len(_LAYER_PREFIX):].split(".", 1)[0]
            if name not in names:
                names.append(name)
    return names


def valid_gaussians(means, quats, scales, opacities, coeffs) -> np.ndarray:
    """(N,) mask of Gaussians whose parameters are all finite and whose quaternion is not ~0."""
    return (
        np.all(np.isfinite(means), 1)
        & np.all(np.isfinite(quats), 1)
        & np.all(np.isfinite(scales), 1)
        & np.isfinite(opacities)
        & np.all(np.isfinite(coeffs), (1, 2))
        & (np.linalg.norm(quats, axis=1) > 1e-8)
    )


def activated_layer(name: str, positions, rotations, log_scales, logits, coeffs, degree: int, *,
                    colour_convention: str, rigid: bool = False, cuboid_ids=None,
                    track_ids: tuple[str, ...] = (), where: str = "", lidar_intensity=None) -> HostLayer:
    """Drops invalid Gaussians and applies the activations of pre-activation values
    (normalize, exp, sigmoid), as both `.nurec` payloads and 3DGS PLY files store them."""
    valid = valid_gaussians(positions, rotations, log_scales, logits, coeffs)
    if lidar_intensity is not None:
        valid &= np.isfinite(lidar_intensity)
    dropped = int(valid.size - valid.sum())
    if dropped:
        _LOGGER.warning("%s: dropped %d Gaussians with non-finite or degenerate values", where or name, dropped)
    return HostLayer(
        name=name,
        rigid=rigid,
        means=positions[valid].astype(np.float32),
        quats=geometry.normalize_quat(rotations[valid]).astype(np.float32),
        # Exponentials of huge log-scales overflow to inf; clamp to keep the arrays finite.
        scales=np.exp(np.clip(log_scales[valid], -30.0, 30.0)).astype(np.float32),
        opacities=(0.5 * (1.0 + np.tanh(0.5 * logits[valid]))).astype(np.float32),  # sigmoid
        sh=coeffs[valid].astype(np.float32),
        sh_degree=degree,
        cuboid_ids=None if cuboid_ids is None else cuboid_ids[valid],
        track_ids=track_ids,
        dropped=dropped,
        lidar_intensity=None if lidar_intensity is None else lidar_intensity[valid].astype(np.float32),
        colour_convention=colour_convention,
    )


def _decode_layer(
    name: str, cfg: Mapping[str, Any], state: Mapping[str, Any], obj_track_ids: Mapping[str, Any], where: str
) -> HostLayer | None:
    pre = f"{_LAYER_PREFIX}{name}."
    wl = f"{where}: layer {name!r}"
    present = {k[len(pre):] for k in state if isinstance(k, str) and k.startswith(pre)}
    missing = [p for p in _REQUIRED if p not in present]
    if missing and "deformable" in name:
        return None
    if missing:
        raise SceneFormatError(f"{wl}: missing tensors {missing}")
    for field, allowed in _SUPPORTED_ACTIVATIONS.items():
        value = cfg.get(field, allowed[0])
        if value not in allowed:
            raise UnsupportedSceneError(f"{wl}: unsupported {field} {value!r} (supported: {list(allowed)})")
    if "deformable" in name and "gaussian_cuboid_ids" not in present:
        return None  # deformable actors need a deformation model nurec-jax does not implement

    t = lambda p: decode_tensor(state, pre + p, where).astype(np.float64)  # noqa: E731
    pos, rot, scl = t("positions"), t("rotations"), t("scales")
    dens, alb = t("densities"), t("features_albedo")
    n = pos.shape[0]
    checks = {"positions": (pos, (n, 3)), "rotations": (rot, (n, 4)), "scales": (scl, (n, 3))}
    for p, (arr, shape) in checks.items():
        if arr.shape != shape:
            raise SceneFormatError(f"{wl}: {p} has shape {list(arr.shape)}, expected {list(shape)}")
    if dens.shape not in ((n,), (n, 1)):
        raise SceneFormatError(f"{wl}: densities has shape {list(dens.shape)}, expected [{n}] or [{n}, 1]")
    dens = dens.reshape(n)
    if alb.shape == (n, 3):
        alb = alb[:, None, :]
    if alb.ndim != 3 or alb.shape[0] != n or alb.shape[2] != 3 or alb.shape[1] < 1:
        raise SceneFormatError(f"{wl}: features_albedo has shape {list(alb.shape)}, expected [{n}, 3] or [{n}, F, 3]")
    # Time-varying albedo: the Fourier basis is not public; use the time-constant term (index 0).
    dc = alb[:, 0, :]

    particle = cfg.get("particle") or {}
    degree_cfg = particle.get("radiance_sph_degree")
    if "features_specular" in present:
        spec = t("features_specular")
        if spec.ndim != 2 or spec.shape[0] != n or spec.shape[1] % 3:
            raise SceneFormatError(f"{wl}: features_specular has shape {list(spec.shape)}, expected [{n}, K*3]")
        k = spec.shape[1] // 3
        deg_stored = round(math.sqrt(k + 1)) - 1
        if (deg_stored + 1) ** 2 - 1 != k or deg_stored > sh.MAX_DEGREE:
            raise SceneFormatError(f"{wl}: features_specular width {spec.shape[1]} is not 3*((d+1)^2-1), d<=3")
        # Coefficient-major: index = coefficient * 3 + channel.
        spec = spec.reshape(n, k, 3)
    else:
        deg_stored, spec = 0, np.zeros((n, 0, 3))
    if degree_cfg is not None and int(degree_cfg) != deg_stored:
        raise SceneFormatError(
            f"{wl}: config radiance_sph_degree={degree_cfg} but features_specular holds degree {deg_stored}"
        )
    degree = deg_stored
    if "n_active_features" in present:
        active = int(decode_tensor(state, pre + "n_active_features", where).reshape(-1)[0])
        degree = max(0, min(degree, active))
    o0 = bool(particle.get("radiance_sph_O0", False))
    if o0:
        # NuRec O0 layers: the DC coefficient *is* the radiance (no basis scaling, no +0.5).
        # Convert to the 3DGS convention, 0.5 + C0 * dc_3dgs = dc  =>  dc_3dgs = (dc - 0.5) / C0.
        dc = (dc - 0.5) / sh.C0
    coeffs = np.concatenate([dc[:, None, :], spec[:, : sh.num_coeffs(degree) - 1, :]], axis=1)

    cuboid_ids = None
    track_ids: tuple[str, ...] = ()
    rigid = "gaussian_cuboid_ids" in present
    if rigid:
        cuboid_ids = decode_tensor(state, pre + "gaussian_cuboid_ids", where).reshape(-1).astype(np.int32)
        if cuboid_ids.shape != (n,):
            raise SceneFormatError(f"{wl}: gaussian_cuboid_ids has {cuboid_ids.size} entries for {n} Gaussians")
        raw_ids = obj_track_ids.get(name)
        if not isinstance(raw_ids, (list, tuple)):
            raise SceneFormatError(f"{where}: ._extra_state.obj_track_ids has no track list for rigid layer {name!r}")
        track_ids = tuple(str(x).split("@")[0] for x in raw_ids)
        if n and (cuboid_ids.min() < 0 or cuboid_ids.max() >= len(track_ids)):
            raise SceneFormatError(
                f"{wl}: gaussian_cuboid_ids range [{cuboid_ids.min()}, {cuboid_ids.max()}] "
                f"outside its {len(track_ids)} tracks"
            )
    lidar = None
    if "lidar_extra_signal" in present:
        sig = decode_tensor(state, pre + "lidar_extra_signal", where)
        if sig.size:  # NRE: channel 0 is intensity, no activation (rendering.md 5.1)
            if sig.shape[0] != n:
                raise SceneFormatError(f"{wl}: lidar_extra_signal has shape {list(sig.shape)} for {n} Gaussians")
            lidar = sig.reshape(n, -1)[:, 0].astype(np.float32)
    return activated_layer(name, pos, rot, scl, dens, coeffs, degree,
                           colour_convention="radiance_sph_O0" if o0 else "3dgs", rigid=rigid,
                           cuboid_ids=cuboid_ids, track_ids=track_ids, where=wl, lidar_intensity=lidar)


def decode_payload(data: bytes, where: str, max_bytes: int) -> Payload:
    """Decodes one `.nurec` member into activated numpy layers and the sky cubemap."""
    nre = unpack_nre_data(gunzip_limited(data, max_bytes, where), where)
    state = nre["state_dict"]
    config = nre.get("config") or {}
    if not isinstance(config, Mapping):
        raise SceneFormatError(f"{where}: nre_data.config must be a map")
    layers_cfg = config.get("layers") or {}
    extra = state.get("._extra_state") or {}
    obj_track_ids = extra.get("obj_track_ids") or {} if isinstance(extra, Mapping) else {}
    layers: list[HostLayer] = []
    skipped: list[str] = []
    for name in _layer_names(config, state):
        cfg = layers_cfg.get(name) or {}
        if not isinstance(cfg, Mapping):
            raise SceneFormatError(f"{where}: config.layers.{name} must be a map")
        layer = _decode_layer(name, cfg, state, obj_track_ids, where)
        if layer is None:
            _LOGGER.warning("%s: layer %r skipped (deformable actors are not supported)", where, name)
            skipped.append(name)
        else:
            layers.append(layer)
    if not layers:
        raise SceneFormatError(f"{where}: no Gaussian layers (.gaussians_nodes.<layer>.*) in the payload")
    sky = None
    if ".background.textures" in state:
        tex = decode_tensor(state, ".background.textures", where)
        if tex.ndim == 5 and tex.shape[0] == 1:
            tex = tex[0]
        if tex.ndim != 4 or tex.shape[0] != 6 or tex.shape[3] != 3 or tex.shape[1] != tex.shape[2]:
            raise SceneFormatError(f"{where}: .background.textures has shape {list(tex.shape)}, expected [1, 6, S, S, 3]")
        sky = np.nan_to_num(tex.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return Payload(str(nre.get("version", "")), config, tuple(layers), sky, tuple(skipped))
