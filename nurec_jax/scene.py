"""Loading NuRec scenes: `.usdz` (NuRec Volume + `.nurec` payload, driving side files), OpenUSD
`ParticleField3DGaussianSplat` stages and standard 3DGS `.ply` files.

Host-side parsing happens once (`load_host_scene`, numpy); `put_scene` is the only host -> device
step. Everything static ends up in the *world* frame of `rig_trajectories.json` (the frame of rig
poses, track poses and gRPC requests): static layers are mapped from the NRE frame with
`inverse(world_to_nre)` at load, so requests in world coordinates need no conversion.
Rigid actor Gaussians stay in their cuboid-local frames.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import Any, Mapping

import jax
import numpy as np

from nurec_jax import checkpoint, geometry, usd_stage
from nurec_jax import ppisp as ppisp_lib
from nurec_jax.archive import Archive
from nurec_jax.errors import SceneFormatError
from nurec_jax.metadata import RigDocument, SceneMetadata, metadata_lines, parse_rig_document, parse_sequence_tracks
from nurec_jax.payload import decode_payload
from nurec_jax.ply import read_ply_gaussians
from nurec_jax.types import Gaussians, HostLayer, SceneGaussians, Sky

_LOGGER = logging.getLogger(__name__)

# JSON side files: rig_trajectories.json of long clips runs to tens of MB, so 64 MiB leaves room; the json
# module holds ~3x the text while parsing, so the bound keeps a hostile one to ~200 MB, then released.
_SIDE_FILE_LIMIT = 64 << 20
# YAML side files (metadata.yaml, parsed_config.yaml) are kilobytes; PyYAML costs tens of bytes per input
# byte, so they get a tighter bound.
_YAML_LIMIT = 8 << 20


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """Limits and defaults for scene loading.

    Attributes:
      max_payload_bytes: largest decompressed `.nurec` payload accepted (zip and gzip bombs).
      max_member_bytes: largest archive member read (after zip inflation).
      max_total_bytes: most bytes inflated from one archive, all members together.
      max_inflation_ratio: largest inflated/compressed ratio of a zip member, or of a payload's gzip
        stream, once it passes `ratio_floor_bytes` (None: off); real payloads deflate about 1-3:1,
        zip and gzip bombs about 1000:1.
      ratio_floor_bytes: inflated size below which the ratio is not checked.
      max_side_file_bytes: largest JSON side member, checked (while inflating) before parsing.
      max_yaml_bytes: largest YAML side member (`metadata.yaml`, `parsed_config.yaml`), likewise.
      background_color: constant background used when the scene has no sky cubemap.
    """

    # Real payloads are 0.35-0.6 GB and checkpoints ~1.1 GB inflated: 2 GiB leaves room, 4 GiB total
    # covers a payload plus a checkpoint plus side files.
    max_payload_bytes: int = 2 << 30
    max_member_bytes: int = 2 << 30
    max_total_bytes: int = 4 << 30
    max_inflation_ratio: float | None = 200.0
    ratio_floor_bytes: int = 4 << 20
    max_side_file_bytes: int = _SIDE_FILE_LIMIT
    max_yaml_bytes: int = _YAML_LIMIT
    background_color: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    name: str
    rigid: bool
    count: int
    dropped: int
    sh_degree: int
    colour_convention: str
    approximation: str = ""


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What the loader found and decided.

    Attributes:
      payload_version: `nre_data.version` of the (first) payload, or "".
      sources: the Volume / ParticleField prims or members the Gaussians came from.
      layers: one summary per decoded layer.
      dropped_gaussians: total Gaussians dropped for non-finite or degenerate values.
      skipped_layers: layers not loaded (deformable actors).
      warnings: anything else worth telling the user.
      post_processing: what camera post-processing renders apply ("" for none).
      ppisp_per_frame: whether PPISP's per-frame terms (exposure, colour) are enabled.
    """

    payload_version: str
    sources: tuple[str, ...]
    layers: tuple[LayerSummary, ...]
    dropped_gaussians: int
    skipped_layers: tuple[str, ...]
    warnings: tuple[str, ...]
    post_processing: str = ""
    ppisp_per_frame: bool = False


@dataclasses.dataclass(frozen=True)
class HostScene:
    """A decoded scene on the host (numpy), before `put_scene`."""

    metadata: SceneMetadata
    static_layers: tuple[HostLayer, ...]  # world frame
    rigid_layers: tuple[HostLayer, ...]  # cuboid-local frames
    sky_cubemap: np.ndarray | None
    report: LoadReport
    ppisp: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)  # PPISP tensors by name


@dataclasses.dataclass(frozen=True)
class Scene:
    """A loaded scene: device arrays plus host metadata."""

    metadata: SceneMetadata
    gaussians: SceneGaussians
    report: LoadReport

    @property
    def scene_id(self) -> str:
        return self.metadata.scene_id


# --------------------------------------------------------------------------------------------
# Metadata


def _side_limit(archive: Archive) -> int:
    return getattr(archive, "max_side_file_bytes", _SIDE_FILE_LIMIT)


def _read_json(archive: Archive, member: str) -> Any:
    return archive.read_json(member, _side_limit(archive))  # size-checked first; nesting depth bounded


def _metadata_from_archive(archive: Archive, path: str) -> SceneMetadata:
    stem = os.path.splitext(os.path.basename(path))[0]
    meta_yaml: Mapping[str, Any] = {}
    if archive.has("metadata.yaml"):
        meta_yaml = archive.read_yaml("metadata.yaml", getattr(archive, "max_yaml_bytes", _YAML_LIMIT)) or {}
        if not isinstance(meta_yaml, Mapping):
            raise SceneFormatError(f"{archive.name}:metadata.yaml: top level must be a mapping")
    rig = RigDocument((), (), (), np.eye(4), None)
    if archive.has("rig_trajectories.json"):
        rig = parse_rig_document(_read_json(archive, "rig_trajectories.json"), f"{archive.name}:rig_trajectories.json")
    trajectory = rig.trajectories[0] if rig.trajectories else None
    tracks = {}
    if archive.has("sequence_tracks.json"):
        tracks = parse_sequence_tracks(
            _read_json(archive, "sequence_tracks.json"), f"{archive.name}:sequence_tracks.json"
        )
    scene_id = str(meta_yaml.get("scene_id") or _data_info_sequence_id(archive) or stem)
    time_range = None
    tr = meta_yaml.get("time_range")
    if isinstance(tr, Mapping) and "start" in tr and "end" in tr:
        try:
            time_range = (int(tr["start"]), int(tr["end"]))
        except (TypeError, ValueError):
            raise SceneFormatError(f"{archive.name}:metadata.yaml: time_range must hold integer µs") from None
    elif rig.trajectories:  # the union of every trajectory's range
        time_range = (
            min(t.time_range_us[0] for t in rig.trajectories),
            max(t.time_range_us[1] for t in rig.trajectories),
        )
    return SceneMetadata(
        scene_id=scene_id,
        source=path,
        cameras=RigDocument.first_of_each(rig.cameras),
        lidars=RigDocument.first_of_each(rig.lidars),
        trajectory=trajectory,
        tracks=tracks,
        world_to_nre=rig.world_to_nre,
        T_world_base=rig.T_world_base,
        time_range_us=time_range,
        yaml=dict(meta_yaml),
        members=archive.members,
        trajectories=rig.trajectories,
        camera_list=rig.cameras,
        lidar_list=rig.lidars,
    )


def _data_info_sequence_id(archive: Archive) -> str:
    """`data_info.json`'s `sequence_id` when it is a non-empty string, else "" (a member that is not
    valid JSON is a SceneFormatError; a missing member or other content is ignored)."""
    if not archive.has("data_info.json"):
        return ""
    info = _read_json(archive, "data_info.json")
    seq = info.get("sequence_id") if isinstance(info, Mapping) else None
    return seq.strip() if isinstance(seq, str) else ""


def _plain_metadata(path: str) -> SceneMetadata:
    return SceneMetadata(
        scene_id=os.path.splitext(os.path.basename(path))[0],
        source=path,
        cameras={},
        lidars={},
        trajectory=None,
        tracks={},
        world_to_nre=np.eye(4),
        T_world_base=None,
        time_range_us=None,
        yaml={},
        members=(),
        trajectories=(),
        camera_list=(),
        lidar_list=(),
    )


def _open_archive(path: str, options: LoadOptions) -> Archive:
    archive = Archive(
        path,
        options.max_member_bytes,
        max_total_bytes=options.max_total_bytes,
        max_ratio=options.max_inflation_ratio,
        ratio_floor_bytes=options.ratio_floor_bytes,
    )
    archive.max_side_file_bytes = options.max_side_file_bytes
    archive.max_yaml_bytes = options.max_yaml_bytes
    return archive


def read_scene_metadata(path: str | os.PathLike, options: LoadOptions = LoadOptions()) -> SceneMetadata:
    """Reads a scene's metadata (ids, cameras, trajectory, tracks) without decoding its Gaussians."""
    path = os.fspath(path)
    if path.lower().endswith(".usdz"):
        with _open_archive(path, options) as archive:
            return _metadata_from_archive(archive, path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scene file not found: {path}")
    return _plain_metadata(path)


# --------------------------------------------------------------------------------------------
# Gaussians


def _transform_layer(layer: HostLayer, T: np.ndarray, where: str) -> HostLayer:
    means, quats, scales, coeffs = usd_stage.transform_gaussians(
        T,
        layer.means.astype(np.float64),
        layer.quats.astype(np.float64),
        layer.scales.astype(np.float64),
        layer.sh.astype(np.float64),
        layer.sh_degree,
        where,
    )
    return dataclasses.replace(
        layer,
        means=means.astype(np.float32),
        quats=quats.astype(np.float32),
        scales=scales.astype(np.float32),
        sh=coeffs.astype(np.float32),
    )


def _merge_same_name(layers: list[HostLayer]) -> list[HostLayer]:
    """Joins layers of the same name (partitioned exports) into one."""
    out: dict[str, list[HostLayer]] = {}
    for layer in layers:
        out.setdefault(layer.name, []).append(layer)
    merged = []
    for name, parts in out.items():
        if len(parts) == 1:
            merged.append(parts[0])
            continue
        g = Gaussians.concatenate([_as_gaussians(p) for p in parts])
        if any(p.rigid for p in parts):
            raise SceneFormatError(f"rigid layer {name!r} appears in several payloads")
        merged.append(
            dataclasses.replace(
                parts[0],
                means=g.means,
                quats=g.quats,
                scales=g.scales,
                opacities=g.opacities,
                sh=g.sh,
                sh_degree=g.sh_degree,
                dropped=sum(p.dropped for p in parts),
                lidar_intensity=_joined_intensity(parts),
            )
        )
    return merged


def _joined_intensity(layers) -> np.ndarray | None:
    """Concatenated lidar intensities; NaN for layers without one; None when none has one."""
    if all(l.lidar_intensity is None for l in layers):
        return None
    return np.concatenate(
        [np.full(l.count, np.nan, np.float32) if l.lidar_intensity is None else l.lidar_intensity for l in layers]
        + [np.zeros(0, np.float32)]
    )


def _as_gaussians(layer: HostLayer) -> Gaussians:
    return Gaussians(layer.means, layer.quats, layer.scales, layer.opacities, layer.sh, layer.sh_degree)


def _load_usdz_gaussians(archive: Archive, meta: SceneMetadata, options: LoadOptions):
    warnings: list[str] = []
    volumes: list[usd_stage.VolumeRef] = []
    particle_layers: list[HostLayer] = []
    usd_members = archive.usd_layers()
    if usd_members:
        with tempfile.TemporaryDirectory(prefix="nurec_usd_") as tmp:
            archive.extract(usd_members, tmp)
            root = os.path.join(tmp, *usd_members[0].split("/"))
            try:
                stage = usd_stage.open_stage(root, f"{archive.name}:{usd_members[0]}")
                volumes = usd_stage.find_nurec_volumes(stage, tmp, f"{archive.name}:{usd_members[0]}")
                particle_layers = usd_stage.read_particle_fields(stage, f"{archive.name}:{usd_members[0]}")
                del stage
            except SceneFormatError as e:
                if "cannot be opened" not in str(e):
                    raise
                warnings.append(f"{e}; USD layers ignored, payload found by member name")
                _LOGGER.warning("%s", warnings[-1])
    sources: list[str] = []
    payload_refs: list[tuple[str, np.ndarray]] = []
    for vol in volumes:
        if not archive.has(vol.payload_member):
            raise SceneFormatError(
                f"{archive.name}: NuRec volume {vol.prim_path} points at payload {vol.payload_path_as_written!r}, "
                "which is missing from the archive"
            )
        payload_refs.append((vol.payload_member, vol.T_stage_volume))
        sources.append(f"{vol.prim_path} -> {vol.payload_member}")
    if not volumes and not particle_layers:
        nurec = [m for m in archive.members if m.lower().endswith(".nurec")]
        if "volume.nurec" in nurec:
            nurec = ["volume.nurec"]
        if not nurec and archive.has(checkpoint.CHECKPOINT_MEMBER):
            # NuRec training's default artifact: the model state only as a Lightning checkpoint.
            nurec = [checkpoint.CHECKPOINT_MEMBER]
        if not nurec:
            raise SceneFormatError(
                f"{archive.name}: no NuRec volume (no prim with omni:nurec:isNuRecVolume, no "
                f"{usd_stage.PARTICLE_FIELD_TYPE} prim, no .nurec member and no {checkpoint.CHECKPOINT_MEMBER})"
            )
        if usd_members and nurec != [checkpoint.CHECKPOINT_MEMBER]:
            warnings.append(f"no NuRec Volume prim in the USD layers; using payload member(s) {nurec}")
        payload_refs = [(m, np.eye(4)) for m in nurec]
        sources = list(nurec)
    for layer in particle_layers:
        sources.append(layer.name)

    try:
        nre_to_world = np.linalg.inv(meta.world_to_nre)
    except np.linalg.LinAlgError:
        raise SceneFormatError(f"{archive.name}: world_to_nre is singular") from None
    static: list[HostLayer] = []
    rigid: list[HostLayer] = []
    sky = None
    version = ""
    skipped: list[str] = []
    decoded: dict[str, Any] = {}
    post = None
    for member, t_stage_volume in payload_refs:
        where = f"{archive.name}:{member}"
        if member not in decoded:
            if member == checkpoint.CHECKPOINT_MEMBER:
                decoded[member] = checkpoint.decode_checkpoint(archive, options.max_payload_bytes)
            else:
                decoded[member] = decode_payload(
                    archive.read(member, options.max_payload_bytes),
                    where,
                    options.max_payload_bytes,
                    max_ratio=options.max_inflation_ratio,
                    ratio_floor=options.ratio_floor_bytes,
                )
            warnings.extend(decoded[member].notes)
        payload = decoded[member]
        version = version or payload.version
        skipped.extend(payload.skipped_layers)
        if sky is None:
            sky = payload.sky_cubemap
        if post is None and payload.ppisp:
            post = (payload.ppisp, payload.ppisp_per_frame, where)
        t_world_payload = nre_to_world @ t_stage_volume
        for layer in payload.layers:
            if layer.rigid:
                rigid.append(layer)
            else:
                static.append(_transform_layer(layer, t_world_payload, f"{where}: layer {layer.name!r}"))
    # ParticleField prims are already in stage (= world) coordinates.
    static.extend(particle_layers)
    return static, rigid, sky, version, sources, skipped, warnings, post


def load_host_scene(path: str | os.PathLike, options: LoadOptions = LoadOptions()) -> HostScene:
    """Decodes a scene file into numpy arrays (host only; nothing touches a device)."""
    path = os.fspath(path)
    lower = path.lower()
    warnings: list[str] = []
    skipped: list[str] = []
    version = ""
    sky = None
    rigid: list[HostLayer] = []
    post = None
    if lower.endswith(".usdz"):
        with _open_archive(path, options) as archive:
            meta = _metadata_from_archive(archive, path)
            static, rigid, sky, version, sources, skipped, warnings, post = _load_usdz_gaussians(archive, meta, options)
    elif lower.endswith(".ply"):
        meta = read_scene_metadata(path, options)
        static, sources = [read_ply_gaussians(path, options.max_member_bytes)], [os.path.basename(path)]
    elif lower.endswith((".usd", ".usda", ".usdc")):
        meta = read_scene_metadata(path, options)
        stage = usd_stage.open_stage(path, os.path.basename(path))
        static = usd_stage.read_particle_fields(stage, os.path.basename(path))
        if not static:
            raise SceneFormatError(f"{os.path.basename(path)}: no {usd_stage.PARTICLE_FIELD_TYPE} prim")
        sources = [layer.name for layer in static]
    else:
        raise SceneFormatError(f"{os.path.basename(path)}: unknown scene file type (expected .usdz, .ply or .usd*)")

    static = _merge_same_name(static)
    rigid = _merge_same_name(rigid)
    if not static and not rigid:
        raise SceneFormatError(f"{os.path.basename(path)}: the scene holds no Gaussians")
    for layer in rigid:
        unknown = sorted(set(layer.track_ids) - set(meta.tracks))
        if unknown and meta.tracks:
            warnings.append(f"layer {layer.name!r}: tracks {unknown} have Gaussians but no sequence_tracks entry")
    layers = static + rigid
    ppisp_arrays, per_frame, post_text = {}, False, ""
    if post is not None:
        arrays, per_frame, where = post
        ppisp_arrays = ppisp_lib.checked_state(arrays, where)  # refused at load, not at put_scene
        n_cam = ppisp_arrays["crf_params"].shape[0]
        post_text = f"PPISP: per-camera vignetting and response curve ({n_cam} cameras)" + (
            ", per-frame exposure and colour" if per_frame else "; per-frame terms off"
        )
    report = LoadReport(
        payload_version=version,
        sources=tuple(sources),
        layers=tuple(
            LayerSummary(l.name, l.rigid, l.count, l.dropped, l.sh_degree, l.colour_convention, l.approximation)
            for l in layers
        ),
        dropped_gaussians=sum(l.dropped for l in layers),
        skipped_layers=tuple(skipped),
        warnings=tuple(warnings),
        post_processing=post_text,
        ppisp_per_frame=per_frame,
    )
    return HostScene(meta, tuple(static), tuple(rigid), sky, report, ppisp_arrays)


def _empty_gaussians(degree: int) -> Gaussians:
    k = (degree + 1) ** 2
    return Gaussians(
        np.zeros((0, 3), np.float32),
        np.zeros((0, 4), np.float32),
        np.zeros((0, 3), np.float32),
        np.zeros((0,), np.float32),
        np.zeros((0, k, 3), np.float32),
        degree,
    )


def put_scene(host: HostScene, device: jax.Device | None = None, options: LoadOptions = LoadOptions()) -> Scene:
    """Moves a decoded scene onto a device (the default device when None)."""
    degree = max((l.sh_degree for l in host.static_layers + host.rigid_layers), default=0)
    static = Gaussians.concatenate([_as_gaussians(l) for l in host.static_layers] + [_empty_gaussians(degree)])
    static_layer = np.concatenate(
        [np.full(l.count, i, np.int32) for i, l in enumerate(host.static_layers)] + [np.zeros(0, np.int32)]
    )
    track_ids: list[str] = []
    parts, dyn_track = [], []
    for layer in host.rigid_layers:
        remap = []
        for tid in layer.track_ids:
            if tid not in track_ids:
                track_ids.append(tid)
            remap.append(track_ids.index(tid))
        parts.append(_as_gaussians(layer))
        dyn_track.append(np.asarray(remap, np.int32)[layer.cuboid_ids] if layer.count else np.zeros(0, np.int32))
    dynamic = Gaussians.concatenate(parts + [_empty_gaussians(degree)])
    dynamic_track = np.concatenate(dyn_track + [np.zeros(0, np.int32)])
    r_world_to_sky, _, _ = geometry.decompose_similarity(host.metadata.world_to_nre)
    sky = Sky(
        cubemap=None if host.sky_cubemap is None else host.sky_cubemap,
        color=np.asarray(options.background_color, np.float32),
        rotation_world_to_sky=r_world_to_sky.astype(np.float32),
    )
    tree = SceneGaussians(
        static=static,
        static_layer=static_layer,
        dynamic=dynamic,
        dynamic_track=dynamic_track,
        sky=sky,
        static_layer_names=tuple(l.name for l in host.static_layers),
        track_ids=tuple(track_ids),
        static_intensity=_joined_intensity(host.static_layers),
        dynamic_intensity=_joined_intensity(host.rigid_layers),
        ppisp=ppisp_lib.Ppisp.from_state(host.ppisp, host.metadata.source) if host.ppisp else None,
    )
    tree = jax.device_put(tree, device)
    return Scene(host.metadata, tree, host.report)


def load_scene(
    path: str | os.PathLike, options: LoadOptions = LoadOptions(), device: jax.Device | None = None
) -> Scene:
    """Loads a scene file onto a device: `put_scene(load_host_scene(path))`."""
    return put_scene(load_host_scene(path, options), device, options)


def describe(scene: Scene | HostScene) -> str:
    """A human-readable multi-line summary."""
    m, r = scene.metadata, scene.report
    lines = [f"scene {m.scene_id!r} ({os.path.basename(m.source)})"]
    if r.payload_version:
        lines.append(f"  payload version {r.payload_version}; sources: {', '.join(r.sources)}")
    total = sum(l.count for l in r.layers)
    lines.append(f"  {total} Gaussians in {len(r.layers)} layers ({r.dropped_gaussians} dropped as non-finite)")
    for l in r.layers:
        kind = "rigid actors, cuboid-local" if l.rigid else "static, world frame"
        lines.append(f"    {l.name:<16} {l.count:>9}  SH degree {l.sh_degree}  [{kind}; colour {l.colour_convention}]")
        if l.approximation:
            lines.append(f"      approximated: {l.approximation}")
    if r.skipped_layers:
        lines.append(f"  skipped layers: {', '.join(r.skipped_layers)}")
    if r.post_processing:
        lines.append(f"  post-processing: {r.post_processing}")
    cube = scene.sky_cubemap if isinstance(scene, HostScene) else scene.gaussians.sky.cubemap
    lines.append(f"  sky: {'constant colour' if cube is None else f'cubemap {tuple(cube.shape[1:3])}'}")
    lines.extend(metadata_lines(m))  # trajectories, cameras (with trajectory idx), lidars
    if m.tracks:
        labels: dict[str, int] = {}
        for t in m.tracks.values():
            labels[t.label] = labels.get(t.label, 0) + 1
        with_gaussians = (
            set(scene.gaussians.track_ids)
            if isinstance(scene, Scene)
            else {t for l in scene.rigid_layers for t in l.track_ids}
        )
        lines.append(
            f"  tracks: {len(m.tracks)} ({', '.join(f'{v} {k}' for k, v in sorted(labels.items()))}); "
            f"{len(with_gaussians & set(m.tracks))} with Gaussians"
        )
    if np.any(m.world_to_nre != np.eye(4)):
        lines.append(f"  world_to_nre translation {np.round(m.world_to_nre[:3, 3], 3).tolist()}")
    for w in r.warnings:
        lines.append(f"  warning: {w}")
    return "\n".join(lines)
