"""Decoding of the NuRec `.nurec` payload: gzip -> msgpack -> `nre_data` -> Gaussian layers (numpy).

Host-only. See docs/scene_format.md#payload-encoding. Stored values are pre-activation; this module applies the
activations the layer config names and returns render-ready arrays (types.Gaussians conventions).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import zlib
from typing import Any, Mapping

import msgpack
import numpy as np

from nurec_jax import geometry, sh
from nurec_jax.errors import SceneFormatError, UnsupportedSceneError
from nurec_jax.types import HostLayer

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
class Payload:
    """A decoded NuRec model state (a `.nurec` payload or a `checkpoint.ckpt`).

    Attributes:
      version: `nre_data.version` (payloads) or the config's `version` (checkpoints), or "".
      config: the model config (`nre_data.config`, or `model` of `parsed_config.yaml`).
      layers: the decoded layers.
      sky_cubemap: (6, S, S, 3) float32, or None.
      skipped_layers: layers not loaded.
      notes: what was approximated or skipped, one sentence each (also logged).
      ppisp: the PPISP post-processing tensors by name (`exposure_params`, ...), empty when absent.
      ppisp_per_frame: whether the config enables PPISP's per-frame terms.
    """

    version: str
    config: Mapping[str, Any]
    layers: tuple[HostLayer, ...]
    sky_cubemap: np.ndarray | None  # (6, S, S, 3) float32
    skipped_layers: tuple[str, ...]
    notes: tuple[str, ...] = ()
    ppisp: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    ppisp_per_frame: bool = False


def gunzip_limited(data: bytes, limit: int, where: str, max_ratio: float | None = None, ratio_floor: int = 0) -> bytes:
    """Gunzips `data`, refusing to produce more than `limit` bytes, or (with `max_ratio`) more than
    `max_ratio` times the compressed size once past `ratio_floor` bytes (gzip bombs). A refused stream
    drops its partial output before raising, so a kept error holds no buffer."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = io.BytesIO()
    produced = 0
    pending, buf = data, b""
    ratio_cap = None if not max_ratio else max(ratio_floor, int(max_ratio * max(1, len(data))))
    problem = None
    try:
        while True:
            buf = d.decompress(pending, 1 << 20)
            produced += len(buf)
            if produced > limit:
                problem = (
                    f"{where}: decompressed payload exceeds the limit of {limit} bytes "
                    "(raise max_payload_bytes if the scene is genuine)"
                )
                break
            if ratio_cap is not None and produced > ratio_cap:
                problem = (
                    f"{where}: gzip stream inflates more than {max_ratio:.0f}:1 ({len(data)} compressed bytes "
                    f"gave {produced} and counting), over the inflation ratio limit (a gzip bomb?)"
                )
                break
            out.write(buf)
            if d.eof:
                break
            pending = d.unconsumed_tail
            if not pending and not buf:
                break
    except zlib.error as e:
        problem = f"{where}: not a valid gzip stream ({e})"
    if problem is None and not d.eof:
        problem = f"{where}: gzip stream is truncated"
    if problem is not None:
        del buf, pending
        out.close()
        raise SceneFormatError(problem)
    return out.getvalue()


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
            raise SceneFormatError(f"{where}: {key!r} holds {len(data)} bytes, which does not fit shape {shape}")
        dtype = np.dtype(table[itemsize])
    if len(data) != count * dtype.itemsize:
        raise SceneFormatError(
            f"{where}: {key!r} holds {len(data)} bytes but shape {shape} of {dtype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).reshape(shape).astype(dtype.newbyteorder("="))


class StateSource:
    """The tensors and plain values of one NuRec model state, under payload keys
    (`.gaussians_nodes.<layer>.<param>`, `._extra_state`, `.background.textures`, ...).

    `.nurec` payloads (raw bytes plus `.shape` siblings) and `checkpoint.ckpt` state dicts (tensors
    under `model.`-prefixed keys) both present themselves this way, so one decoder serves both.
    """

    def __init__(self, entries: Mapping[str, Any], where: str):
        self.entries = entries
        self.where = where

    def keys(self) -> list[str]:
        return [k for k in self.entries if isinstance(k, str) and not k.endswith(".shape")]

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def array(self, key: str) -> np.ndarray:
        return decode_tensor(self.entries, key, self.where)

    def value(self, key: str, default: Any = None) -> Any:
        return self.entries.get(key, default)


def _layer_names(config: Mapping[str, Any], state: StateSource) -> list[str]:
    names: list[str] = []
    layers_cfg = config.get("layers") if isinstance(config, Mapping) else None
    if isinstance(layers_cfg, Mapping):
        names.extend(str(n) for n in layers_cfg)
    for key in state.keys():
        if isinstance(key, str) and key.startswith(_LAYER_PREFIX):
            name = key[len(_LAYER_PREFIX) :].split(".", 1)[0]
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


def activated_layer(
    name: str,
    positions,
    rotations,
    log_scales,
    logits,
    coeffs,
    degree: int,
    *,
    colour_convention: str,
    rigid: bool = False,
    cuboid_ids=None,
    track_ids: tuple[str, ...] = (),
    where: str = "",
    lidar_intensity=None,
) -> HostLayer:
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


def config_number(cfg: Mapping[str, Any], key: str, where: str, kind=int, default=None):
    """cfg[key] as an int or float; a value that is not a number raises SceneFormatError naming `where.key`."""
    value = cfg.get(key, default) if isinstance(cfg, Mapping) else default
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SceneFormatError(f"{where}.{key}: expected a number, got {str(value)[:60]!r}")
    try:
        number = float(value)
        if not math.isfinite(number) or (kind is int and number != int(number)):
            raise ValueError
    except ValueError:
        raise SceneFormatError(
            f"{where}.{key}: expected {'an integer' if kind is int else 'a number'}, got {str(value)[:60]!r}"
        ) from None
    return kind(number)


def _active_degree(state: StateSource, pre: str, present: set[str], where: str) -> int | None:
    """The layer's active SH degree (`n_active_features`): a tensor of its own before NuRec
    26.4.111, an entry of the layer's `_extra_state` dict since."""
    extra = state.value(pre + "_extra_state")
    if isinstance(extra, Mapping) and "n_active_features" in extra:
        return config_number(extra, "n_active_features", f"{where} {pre}_extra_state")
    if "n_active_features" in present:
        return int(state.array(pre + "n_active_features").reshape(-1)[0])
    return None


_DEFORMABLE_NOTE = (
    "layer {name!r}: deformable actors rendered rigidly attached to their tracks "
    "(NuRec's deformation network is not evaluated)"
)


class _Skip(Exception):
    """A layer that cannot be loaded but must not fail the scene (deformable actors)."""


def _decode_layer(
    name: str,
    cfg: Mapping[str, Any],
    state: StateSource,
    obj_track_ids: Mapping[str, Any],
    where: str,
    config_where: str,
) -> HostLayer:
    pre = f"{_LAYER_PREFIX}{name}."
    wl = f"{where}: layer {name!r}"
    wc = f"{config_where}.layers.{name}"
    deformable = "deformable" in name or str(cfg.get("name", "")).startswith("deformable")
    present = {k[len(pre) :] for k in state.keys() if k.startswith(pre)}
    missing = [p for p in _REQUIRED if p not in present]
    if missing and deformable:
        raise _Skip(f"layer {name!r} skipped: deformable layer without tensors {missing}")
    if missing:
        raise SceneFormatError(f"{wl}: missing tensors {missing}")
    for field, allowed in _SUPPORTED_ACTIVATIONS.items():
        value = cfg.get(field, allowed[0])
        if value not in allowed:
            raise UnsupportedSceneError(f"{wl}: unsupported {field} {value!r} (supported: {list(allowed)})")
    if deformable and "gaussian_cuboid_ids" not in present:
        raise _Skip(f"layer {name!r} skipped: deformable layer without gaussian_cuboid_ids (cannot be placed)")
    raw_ids = obj_track_ids.get(name)
    if deformable and not isinstance(raw_ids, (list, tuple)):
        raise _Skip(f"layer {name!r} skipped: ._extra_state.obj_track_ids has no track list for it")

    t = lambda p: state.array(pre + p).astype(np.float64)  # noqa: E731
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
    if not isinstance(particle, Mapping):
        raise SceneFormatError(f"{wc}.particle: must be a map")
    degree_cfg = config_number(particle, "radiance_sph_degree", f"{wc}.particle")
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
    if degree_cfg is not None and degree_cfg != deg_stored:
        raise SceneFormatError(
            f"{wl}: config radiance_sph_degree={degree_cfg} but features_specular holds degree {deg_stored}"
        )
    degree = deg_stored
    active = _active_degree(state, pre, present, where)
    if active is not None:
        degree = max(0, min(degree, active))
    o0 = particle.get("radiance_sph_O0", False)
    if not isinstance(o0, (bool, int)):
        raise SceneFormatError(f"{wc}.particle.radiance_sph_O0: expected true or false, got {str(o0)[:60]!r}")
    if o0:
        # NuRec O0 layers: the DC coefficient *is* the radiance (no basis scaling, no +0.5).
        # Convert to the 3DGS convention, 0.5 + C0 * dc_3dgs = dc  =>  dc_3dgs = (dc - 0.5) / C0.
        dc = (dc - 0.5) / sh.C0
    coeffs = np.concatenate([dc[:, None, :], spec[:, : sh.num_coeffs(degree) - 1, :]], axis=1)

    cuboid_ids = None
    track_ids: tuple[str, ...] = ()
    rigid = "gaussian_cuboid_ids" in present
    if rigid:
        cuboid_ids = state.array(pre + "gaussian_cuboid_ids").reshape(-1).astype(np.int32)
        if cuboid_ids.shape != (n,):
            raise SceneFormatError(f"{wl}: gaussian_cuboid_ids has {cuboid_ids.size} entries for {n} Gaussians")
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
        sig = state.array(pre + "lidar_extra_signal")
        if sig.size:  # NRE: channel 0 is intensity, no activation (docs/scene_format.md#gaussian-layers)
            if sig.shape[0] != n:
                raise SceneFormatError(f"{wl}: lidar_extra_signal has shape {list(sig.shape)} for {n} Gaussians")
            lidar = sig.reshape(n, -1)[:, 0].astype(np.float32)
    layer = activated_layer(
        name,
        pos,
        rot,
        scl,
        dens,
        coeffs,
        degree,
        colour_convention="radiance_sph_O0" if o0 else "3dgs",
        rigid=rigid,
        cuboid_ids=cuboid_ids,
        track_ids=track_ids,
        where=wl,
        lidar_intensity=lidar,
    )
    if deformable:
        layer = dataclasses.replace(layer, approximation=_DEFORMABLE_NOTE.format(name=name))
    return layer


_PPISP_PARAMS = ("exposure_params", "vignetting_params", "color_params", "crf_params")


def _read_sky(state: StateSource, config: Mapping[str, Any], where: str, notes: list[str]) -> np.ndarray | None:
    background = config.get("background") if isinstance(config, Mapping) else None
    kind = background.get("envmap_type", "cubemap") if isinstance(background, Mapping) else "cubemap"
    if ".background.textures" not in state:
        return None
    tex = state.array(".background.textures")
    if str(kind) != "cubemap" or tex.ndim == 4 and tex.shape[0] == 1 and tex.shape[1] != 6:
        notes.append(
            f"sky: {kind!s} environment map of shape {list(tex.shape)} is not supported (only cubemaps "
            "[1, 6, S, S, 3]); the sky is rendered as the constant background colour"
        )
        return None
    if tex.ndim == 5 and tex.shape[0] == 1:
        tex = tex[0]
    if tex.ndim != 4 or tex.shape[0] != 6 or tex.shape[3] != 3 or tex.shape[1] != tex.shape[2]:
        raise SceneFormatError(
            f"{where}: .background.textures has shape {list(tex.shape)}, expected a cubemap [1, 6, S, S, 3]"
        )
    return np.nan_to_num(tex.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)


def _read_post_processing(
    state: StateSource, config: Mapping[str, Any], where: str, notes: list[str]
) -> tuple[dict[str, np.ndarray], bool]:
    """The first PPISP module's tensors (`.post_processings.<i>.ppisp.*`) and its per-frame flag."""
    prefixes = sorted(
        {k.split(".ppisp.")[0] for k in state.keys() if k.startswith(".post_processings.") and ".ppisp." in k}
    )
    arrays: dict[str, np.ndarray] = {}
    if prefixes:
        pre = prefixes[0] + ".ppisp."
        arrays = {p: state.array(pre + p).astype(np.float32) for p in _PPISP_PARAMS if pre + p in state}
        if len(prefixes) > 1:
            notes.append(f"post-processing: {len(prefixes)} PPISP modules; only {prefixes[0]} is applied")
    cfg = config.get("post_processing") if isinstance(config, Mapping) else None
    per_frame = False
    if isinstance(cfg, Mapping):
        for key, entry in sorted(cfg.items(), key=lambda kv: str(kv[0])):
            if not isinstance(entry, Mapping):
                continue
            if "ppisp" in str(entry.get("name", "")):
                per_frame = bool(entry.get("per_frame_ppisp_enabled", False))
            elif entry.get("name"):
                notes.append(
                    f"post-processing {key!s}: {str(entry.get('name'))[:60]!r} is not implemented; "
                    "colours will differ from NuRec's renders"
                )
    appearance = config.get("appearance_embedding") if isinstance(config, Mapping) else None
    app_name = appearance.get("name") if isinstance(appearance, Mapping) else appearance
    if app_name not in (None, "", "skip-appearance"):
        notes.append(
            f"appearance embedding {str(app_name)[:60]!r} is not applied; colours will differ from NuRec's renders"
        )
    return arrays, per_frame


def decode_state(
    state: StateSource, config: Mapping[str, Any], version: str, where: str, config_where: str | None = None
) -> Payload:
    """Decodes a NuRec model state (payload keys, see StateSource) into activated numpy layers.

    `where` names the state in messages; `config_where` the config's file and key path (default
    `<where>: config`, the payload's own `nre_data.config`)."""
    config_where = config_where or f"{where}: config"
    if not isinstance(config, Mapping):
        raise SceneFormatError(f"{where}: the model config must be a map")
    layers_cfg = config.get("layers") or {}
    if not isinstance(layers_cfg, Mapping):
        raise SceneFormatError(f"{config_where}.layers must be a map")
    extra = state.value("._extra_state") or {}
    obj_track_ids = (extra.get("obj_track_ids") or {}) if isinstance(extra, Mapping) else {}
    if not isinstance(obj_track_ids, Mapping):
        raise SceneFormatError(f"{where}: ._extra_state.obj_track_ids must be a map of layer -> track ids")
    layers: list[HostLayer] = []
    skipped: list[str] = []
    notes: list[str] = []
    for name in _layer_names(config, state):
        cfg = layers_cfg.get(name) or {}
        if not isinstance(cfg, Mapping):
            raise SceneFormatError(f"{config_where}.layers.{name} must be a map")
        try:
            layer = _decode_layer(name, cfg, state, obj_track_ids, where, config_where)
        except _Skip as e:
            notes.append(str(e))
            skipped.append(name)
            continue
        layers.append(layer)
        if layer.approximation:  # reported with the layer (LayerSummary), logged here
            _LOGGER.warning("%s: %s", where, layer.approximation)
    if not layers:
        raise SceneFormatError(f"{where}: no Gaussian layers (.gaussians_nodes.<layer>.*) in the model state")
    sky = _read_sky(state, config, where, notes)
    ppisp, per_frame = _read_post_processing(state, config, where, notes)
    for note in notes:
        _LOGGER.warning("%s: %s", where, note)
    return Payload(version, config, tuple(layers), sky, tuple(skipped), tuple(notes), ppisp, per_frame)


def decode_payload(
    data: bytes, where: str, max_bytes: int, max_ratio: float | None = None, ratio_floor: int = 0
) -> Payload:
    """Decodes one `.nurec` member into activated numpy layers and the sky cubemap (`max_ratio`,
    `ratio_floor`: the gzip layer's inflation ratio limit, see `gunzip_limited`)."""
    nre = unpack_nre_data(gunzip_limited(data, max_bytes, where, max_ratio, ratio_floor), where)
    config = nre.get("config") or {}
    if not isinstance(config, Mapping):
        raise SceneFormatError(f"{where}: nre_data.config must be a map")
    return decode_state(StateSource(nre["state_dict"], where), config, str(nre.get("version", "")), where)
