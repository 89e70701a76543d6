"""Host-side scene metadata: cameras, lidars, ego trajectory, actor tracks (no Gaussians).

Parses the driving-scene side files of a NuRec `.usdz` (`rig_trajectories.json`,
`sequence_tracks.json`, `metadata.yaml`; see scene_format.md sections 4-6). Everything here is
plain Python / numpy: the server answers camera and trajectory queries from it without touching
the device.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Mapping

import numpy as np

from nurec_jax import geometry
from nurec_jax.errors import SceneFormatError, UnsupportedSceneError


class ShutterType(enum.IntEnum):
    """Shutter types, with the integers of NCore and the gRPC `ShutterType` enum."""

    UNKNOWN = 0
    ROLLING_TOP_TO_BOTTOM = 1
    ROLLING_LEFT_TO_RIGHT = 2
    ROLLING_BOTTOM_TO_TOP = 3
    ROLLING_RIGHT_TO_LEFT = 4
    GLOBAL = 5


class PolynomialType(enum.IntEnum):
    """Which FTheta polynomial is authoritative (integers of NCore and the gRPC enum)."""

    UNKNOWN = 0
    PIXELDIST_TO_ANGLE = 1
    ANGLE_TO_PIXELDIST = 2


@dataclasses.dataclass(frozen=True)
class FThetaIntrinsics:
    """NVIDIA FTheta camera, as calibrated (native resolution).

    `principal_point` is in the pixel-centre convention of NCore/NuRec files (the centre of pixel 0
    is at 0.0); renderers add 0.5 to reach continuous image coordinates.
    Polynomials hold 6 coefficients c0..c5 (zero-padded); an empty tuple means "absent".
    """

    resolution: tuple[int, int]  # (width, height)
    shutter_type: ShutterType
    principal_point: tuple[float, float]
    reference_poly: PolynomialType
    pixeldist_to_angle_poly: tuple[float, ...]
    angle_to_pixeldist_poly: tuple[float, ...]
    max_angle: float
    linear_cde: tuple[float, float, float] = (1.0, 0.0, 0.0)
    model: str = "ftheta"


@dataclasses.dataclass(frozen=True)
class OpenCVPinholeIntrinsics:
    """OpenCV pinhole with rational radial (k1..k6), tangential (p1, p2) and thin-prism (s1..s4) terms.

    `principal_point` is in OpenCV's convention (no half-pixel offset).
    """

    resolution: tuple[int, int]
    shutter_type: ShutterType
    principal_point: tuple[float, float]
    focal_length: tuple[float, float]
    radial_coeffs: tuple[float, ...] = (0.0,) * 6
    tangential_coeffs: tuple[float, ...] = (0.0,) * 2
    thin_prism_coeffs: tuple[float, ...] = (0.0,) * 4
    model: str = "opencv-pinhole"


@dataclasses.dataclass(frozen=True)
class OpenCVFisheyeIntrinsics:
    """OpenCV fisheye (equidistant with k1..k4) camera."""

    resolution: tuple[int, int]
    shutter_type: ShutterType
    principal_point: tuple[float, float]
    focal_length: tuple[float, float]
    radial_coeffs: tuple[float, ...] = (0.0,) * 4
    max_angle: float = math.pi / 2
    model: str = "opencv-fisheye"


CameraIntrinsics = FThetaIntrinsics | OpenCVPinholeIntrinsics | OpenCVFisheyeIntrinsics


@dataclasses.dataclass(frozen=True)
class CameraCalibration:
    """One camera of the ego rig.

    Attributes:
      logical_id: e.g. `camera_front_wide_120fov` (the key without its `@sequence` suffix).
      key: the full key in `rig_trajectories.json`.
      T_sensor_rig: (4, 4) camera -> rig, OpenCV camera axes (x right, y down, z forward).
      intrinsics: the camera model at its native resolution.
      frame_timestamps_us: (F, 2) int64 [start, end] exposure windows of the recorded frames.
      unique_sensor_idx: NRE's sensor index, or -1.
    """

    logical_id: str
    key: str
    T_sensor_rig: np.ndarray
    intrinsics: CameraIntrinsics
    frame_timestamps_us: np.ndarray
    unique_sensor_idx: int = -1


@dataclasses.dataclass(frozen=True)
class LidarCalibration:
    """One lidar of the ego rig (`row-offset-spinning` model of NCore).

    Attributes:
      logical_id: e.g. `lidar_top_360fov`.
      T_sensor_rig: (4, 4) lidar -> rig.
      model: the lidar model type string.
      parameters: the model parameters as stored (elevations, azimuths, spin rate, ...).
      frame_timestamps_us: (F, 2) int64 spin windows, possibly empty.
    """

    logical_id: str
    key: str
    T_sensor_rig: np.ndarray
    model: str
    parameters: Mapping[str, Any]
    frame_timestamps_us: np.ndarray


@dataclasses.dataclass(frozen=True)
class RigTrajectory:
    """The recorded ego trajectory.

    Attributes:
      timestamps_us: (T,) int64, increasing.
      T_rig_world: (T, 4, 4) rig -> world poses.
      sequence_id: the clip id.
      rig_bbox: {"centroid": [x, y, z], "dim": [L, W, H], "rot": [r, p, y]} in the rig frame, or None.
    """

    timestamps_us: np.ndarray
    T_rig_world: np.ndarray
    sequence_id: str = ""
    rig_bbox: Mapping[str, Any] | None = None

    def pose_at(self, t_us) -> np.ndarray:
        """Rig -> world at `t_us` (lerp + slerp between samples, clamped at the ends)."""
        return geometry.interpolate_poses(self.timestamps_us, self.T_rig_world, t_us)


@dataclasses.dataclass(frozen=True)
class Track:
    """A tracked actor from `sequence_tracks.json`.

    Attributes:
      track_id: clean id (any `@suffix` removed).
      label: class label, e.g. `automobile`.
      flags: flag string, e.g. `DYNAMIC|CONTROLLABLE`.
      timestamps_us: (K,) int64.
      T_object_world: (K, 4, 4) cuboid-centre -> world poses.
      dims: (3,) cuboid [length, width, height], metres.
    """

    track_id: str
    label: str
    flags: str
    timestamps_us: np.ndarray
    T_object_world: np.ndarray
    dims: np.ndarray

    @property
    def is_controllable(self) -> bool:
        return "CONTROLLABLE" in self.flags

    @property
    def time_range_us(self) -> tuple[int, int]:
        return int(self.timestamps_us[0]), int(self.timestamps_us[-1])

    def pose_at(self, t_us) -> np.ndarray:
        return geometry.interpolate_poses(self.timestamps_us, self.T_object_world, t_us)

    def is_present(self, t_us) -> np.ndarray:
        """Whether the actor exists at `t_us` (no extrapolation outside its samples)."""
        t = np.asarray(t_us)
        return (t >= self.timestamps_us[0]) & (t <= self.timestamps_us[-1])


@dataclasses.dataclass(frozen=True)
class SceneMetadata:
    """Everything about a scene except its Gaussians.

    Attributes:
      scene_id: `metadata.yaml` scene_id, else the file stem.
      source: path of the scene file.
      cameras: logical id -> calibration, in file order.
      lidars: logical id -> calibration.
      trajectory: the ego trajectory, or None for a plain Gaussian scene.
      tracks: clean track id -> track.
      world_to_nre: (4, 4) world -> NRE/scene frame of the static Gaussians (identity when absent).
      T_world_base: (4, 4) world -> ECEF, or None.
      time_range_us: (start, end) from metadata.yaml, else from the trajectory, or None.
      yaml: the raw metadata.yaml mapping (empty when absent).
      members: names of the archive members.
    """

    scene_id: str
    source: str
    cameras: Mapping[str, CameraCalibration]
    lidars: Mapping[str, LidarCalibration]
    trajectory: RigTrajectory | None
    tracks: Mapping[str, Track]
    world_to_nre: np.ndarray
    T_world_base: np.ndarray | None
    time_range_us: tuple[int, int] | None
    yaml: Mapping[str, Any]
    members: tuple[str, ...]


def clean_track_id(track_id: Any) -> str:
    """NRE track ids may carry an `@<source>` suffix; the clean id is the part before it."""
    return str(track_id).split("@")[0]


# --------------------------------------------------------------------------------------------
# Parsing helpers. Every error names the member and the key path.


def _matrix(value: Any, where: str) -> np.ndarray:
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise SceneFormatError(f"{where}: not a numeric 4x4 matrix ({e})") from None
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise SceneFormatError(f"{where}: expected a finite 4x4 matrix, got shape {m.shape}")
    return m


def _rigid(value: Any, where: str) -> np.ndarray:
    m = _matrix(value, where)
    if not np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-3) or not np.allclose(
        m[3], [0, 0, 0, 1]
    ):
        raise SceneFormatError(f"{where}: not a rigid transform (rotation + translation)")
    # Re-orthonormalise: JSON round trips leave ~1e-7 drift that slerp would amplify.
    u, _, vt = np.linalg.svd(m[:3, :3])
    m = m.copy()
    m[:3, :3] = u @ vt
    return m


def parse_floats(value: Any, where: str, length: int | None = None, pad: int | None = None,
                 error: type[Exception] = SceneFormatError) -> tuple[float, ...]:
    """A list of finite numbers: exactly `length` of them, or at most `pad`, zero-padded to `pad`.

    `error` is the exception raised (scene files: SceneFormatError; gRPC requests: ValueError).
    """
    if value is None:
        return ()
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise error(f"{where}: expected a list of numbers, got {value!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise error(f"{where}: non-finite value in {list(out)}")
    if length is not None and len(out) != length:
        raise error(f"{where}: expected {length} numbers, got {len(out)}")
    if pad is not None:
        if len(out) > pad:
            raise error(f"{where}: expected at most {pad} numbers, got {len(out)}")
        out = out + (0.0,) * (pad - len(out))
    return out


def parse_poly(value: Any, where: str, error: type[Exception] = SceneFormatError) -> tuple[float, ...]:
    """An FTheta polynomial: () when absent or empty, else 6 coefficients (zero-padded)."""
    if value is None or len(value) == 0:
        return ()
    return parse_floats(value, where, pad=6, error=error)


def parse_max_angle(value: Any, default: float, where: str, error: type[Exception] = SceneFormatError) -> float:
    """A maximum ray angle in (0, pi]; absent (None) means `default`."""
    angle = default if value is None else float(value)
    if not (math.isfinite(angle) and 0 < angle <= math.pi):
        raise error(f"{where}: {value} not in (0, pi]")
    return angle


def _enum(enum_cls, value: Any, where: str, default=None):
    if value is None and default is not None:
        return default
    try:
        if isinstance(value, str):
            return enum_cls[value.upper()]
        return enum_cls(int(value))
    except (KeyError, ValueError, TypeError):
        names = ", ".join(e.name for e in enum_cls)
        raise SceneFormatError(f"{where}: unknown value {value!r} (expected one of {names})") from None


def _resolution(params: Mapping[str, Any], where: str) -> tuple[int, int]:
    res = params.get("resolution")
    try:
        w, h = (int(v) for v in res)
    except (TypeError, ValueError):
        raise SceneFormatError(f"{where}.resolution: expected [width, height], got {res!r}") from None
    if w <= 0 or h <= 0:
        raise SceneFormatError(f"{where}.resolution: must be positive, got {[w, h]}")
    return w, h


def parse_camera_model(model: Any, where: str) -> CameraIntrinsics:
    """Parses a `camera_model` entry {type, parameters} of `rig_trajectories.json`."""
    if not isinstance(model, Mapping) or "type" not in model:
        raise SceneFormatError(f"{where}: expected {{type, parameters}}, got {model!r}")
    kind = str(model["type"]).lower()
    p = model.get("parameters") or {}
    res = _resolution(p, f"{where}.parameters")
    shutter = _enum(ShutterType, p.get("shutter_type"), f"{where}.parameters.shutter_type", ShutterType.GLOBAL)
    pp = parse_floats(p.get("principal_point"), f"{where}.parameters.principal_point", 2)
    if kind == "ftheta":
        ref = _enum(PolynomialType, p.get("reference_poly"), f"{where}.parameters.reference_poly",
                    PolynomialType.PIXELDIST_TO_ANGLE)
        bw = parse_poly(p.get("pixeldist_to_angle_poly"), f"{where}.parameters.pixeldist_to_angle_poly")
        fw = parse_poly(p.get("angle_to_pixeldist_poly"), f"{where}.parameters.angle_to_pixeldist_poly")
        if (ref == PolynomialType.PIXELDIST_TO_ANGLE and not bw) or (
            ref == PolynomialType.ANGLE_TO_PIXELDIST and not fw
        ):
            raise SceneFormatError(f"{where}.parameters: reference polynomial {ref.name} is missing")
        cde = parse_floats(p.get("linear_cde", (1.0, 0.0, 0.0)), f"{where}.parameters.linear_cde", 3)
        max_angle = parse_max_angle(p.get("max_angle"), math.pi, f"{where}.parameters.max_angle")
        return FThetaIntrinsics(res, shutter, pp, ref, bw, fw, max_angle, cde)  # type: ignore[arg-type]
    fl = parse_floats(p.get("focal_length"), f"{where}.parameters.focal_length", 2)
    if fl[0] <= 0 or fl[1] <= 0:
        raise SceneFormatError(f"{where}.parameters.focal_length: must be positive, got {list(fl)}")
    if kind in ("opencv-pinhole", "opencv_pinhole", "pinhole"):
        return OpenCVPinholeIntrinsics(
            res, shutter, pp, fl,  # type: ignore[arg-type]
            parse_floats(p.get("radial_coeffs", ()), f"{where}.parameters.radial_coeffs", pad=6),
            parse_floats(p.get("tangential_coeffs", ()), f"{where}.parameters.tangential_coeffs", pad=2),
            parse_floats(p.get("thin_prism_coeffs", ()), f"{where}.parameters.thin_prism_coeffs", pad=4),
        )
    if kind in ("opencv-fisheye", "opencv_fisheye", "fisheye"):
        max_angle = parse_max_angle(p.get("max_angle"), math.pi / 2, f"{where}.parameters.max_angle")
        return OpenCVFisheyeIntrinsics(
            res, shutter, pp, fl,  # type: ignore[arg-type]
            parse_floats(p.get("radial_coeffs", ()), f"{where}.parameters.radial_coeffs", pad=4),
            max_angle,
        )
    raise UnsupportedSceneError(f"{where}.type: unsupported camera model {model['type']!r}")


def _frame_windows(value: Any, where: str) -> np.ndarray:
    if value is None:
        return np.zeros((0, 2), np.int64)
    try:
        w = np.asarray(value, dtype=np.int64)
    except (TypeError, ValueError):
        raise SceneFormatError(f"{where}: expected [[start_us, end_us], ...]") from None
    if w.size == 0:
        return np.zeros((0, 2), np.int64)
    if w.ndim != 2 or w.shape[1] != 2:
        raise SceneFormatError(f"{where}: expected [[start_us, end_us], ...], got shape {w.shape}")
    if np.any(w[:, 1] <= w[:, 0]):
        raise SceneFormatError(f"{where}: a frame window has end <= start")
    return w


def parse_rig_trajectories(doc: Any, member: str = "rig_trajectories.json"):
    """Parses `rig_trajectories.json`.

    Returns:
      (cameras, lidars, trajectory, world_to_nre, T_world_base).
    """
    if not isinstance(doc, Mapping):
        raise SceneFormatError(f"{member}: top level must be an object")
    w2n = doc.get("world_to_nre", doc.get("world_to_scene"))
    if w2n is None:
        world_to_nre = np.eye(4)
    else:
        mat = w2n.get("matrix") if isinstance(w2n, Mapping) else w2n
        world_to_nre = _matrix(mat, f"{member}: world_to_nre.matrix")
        try:
            geometry.decompose_similarity(world_to_nre)
        except ValueError as e:
            raise SceneFormatError(f"{member}: world_to_nre: {e}") from None
    t_world_base = doc.get("T_world_base")
    t_world_base = None if t_world_base is None else _matrix(t_world_base, f"{member}: T_world_base")

    trajs = doc.get("rig_trajectories") or []
    if not isinstance(trajs, list):
        raise SceneFormatError(f"{member}: rig_trajectories must be a list")
    trajectory = None
    cam_windows: Mapping[str, Any] = {}
    lidar_windows: Mapping[str, Any] = {}
    if trajs:
        t0 = trajs[0]
        where = f"{member}: rig_trajectories[0]"
        ts = np.asarray(t0.get("T_rig_world_timestamps_us", []), dtype=np.int64)
        poses = t0.get("T_rig_worlds", [])
        if ts.ndim != 1 or len(ts) == 0 or len(poses) != len(ts):
            raise SceneFormatError(
                f"{where}: T_rig_world_timestamps_us ({ts.size}) and T_rig_worlds ({len(poses)}) "
                "must be non-empty lists of equal length"
            )
        if np.any(np.diff(ts) <= 0):
            raise SceneFormatError(f"{where}.T_rig_world_timestamps_us: not strictly increasing")
        mats = np.stack([_rigid(p, f"{where}.T_rig_worlds[{i}]") for i, p in enumerate(poses)])
        trajectory = RigTrajectory(ts, mats, str(t0.get("sequence_id", "")), t0.get("rig_bbox"))
        cam_windows = t0.get("cameras_frame_timestamps_us") or {}
        lidar_windows = t0.get("lidars_frame_timestamps_us") or {}

    cameras: dict[str, CameraCalibration] = {}
    for key, cal in (doc.get("camera_calibrations") or {}).items():
        where = f"{member}: camera_calibrations[{key!r}]"
        if not isinstance(cal, Mapping):
            raise SceneFormatError(f"{where}: must be an object")
        logical = str(cal.get("logical_sensor_name") or key.split("@")[0])
        cameras[logical] = CameraCalibration(
            logical_id=logical,
            key=key,
            T_sensor_rig=_rigid(cal.get("T_sensor_rig"), f"{where}.T_sensor_rig"),
            intrinsics=parse_camera_model(cal.get("camera_model"), f"{where}.camera_model"),
            frame_timestamps_us=_frame_windows(
                cam_windows.get(key, cam_windows.get(logical)), f"{member}: cameras_frame_timestamps_us[{key!r}]"
            ),
            unique_sensor_idx=int(cal.get("unique_sensor_idx", -1)),
        )
    lidars: dict[str, LidarCalibration] = {}
    for key, cal in (doc.get("lidar_calibrations") or {}).items():
        where = f"{member}: lidar_calibrations[{key!r}]"
        if not isinstance(cal, Mapping):
            raise SceneFormatError(f"{where}: must be an object")
        logical = str(cal.get("logical_sensor_name") or key.split("@")[0])
        model = cal.get("lidar_model") or {}
        lidars[logical] = LidarCalibration(
            logical_id=logical,
            key=key,
            T_sensor_rig=_rigid(cal.get("T_sensor_rig"), f"{where}.T_sensor_rig"),
            model=str(model.get("type", "")),
            parameters=dict(model.get("parameters") or {}),
            frame_timestamps_us=_frame_windows(
                lidar_windows.get(key, lidar_windows.get(logical)), f"{member}: lidars_frame_timestamps_us[{key!r}]"
            ),
        )
    return cameras, lidars, trajectory, world_to_nre, t_world_base


def _flags_str(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "|".join(str(v) for v in value)
    return str(value)


def parse_sequence_tracks(doc: Any, member: str = "sequence_tracks.json") -> dict[str, Track]:
    """Parses `sequence_tracks.json` (exactly one sequence; its key is ignored)."""
    if not isinstance(doc, Mapping):
        raise SceneFormatError(f"{member}: top level must be an object")
    if len(doc) == 0:
        return {}
    if len(doc) != 1:
        raise SceneFormatError(f"{member}: expected exactly one sequence, found {len(doc)}: {list(doc)}")
    (seq_key, seq), = doc.items()
    where = f"{member}: [{seq_key!r}]"
    td = (seq or {}).get("tracks_data")
    if not isinstance(td, Mapping):
        raise SceneFormatError(f"{where}.tracks_data: missing")
    ids = td.get("tracks_id") or []
    dims = ((seq.get("cuboidtracks_data") or {}).get("cuboids_dims")) or []
    lists = {
        "tracks_label_class": td.get("tracks_label_class") or [],
        "tracks_flags": td.get("tracks_flags") or [],
        "tracks_timestamps_us": td.get("tracks_timestamps_us") or [],
        "tracks_poses": td.get("tracks_poses") or [],
        "cuboidtracks_data.cuboids_dims": dims,
    }
    for name, lst in lists.items():
        if len(lst) != len(ids):
            raise SceneFormatError(f"{where}.{name}: {len(lst)} entries for {len(ids)} tracks_id")
    tracks: dict[str, Track] = {}
    for i, raw_id in enumerate(ids):
        tid = clean_track_id(raw_id)
        w = f"{where} track {tid!r}"
        ts = np.asarray(lists["tracks_timestamps_us"][i], dtype=np.int64).reshape(-1)
        poses = np.asarray(lists["tracks_poses"][i], dtype=np.float64)
        if ts.size == 0 or poses.shape != (ts.size, 7):
            raise SceneFormatError(f"{w}: tracks_poses must be [{ts.size}, 7], got {poses.shape}")
        if not np.all(np.isfinite(poses)):
            raise SceneFormatError(f"{w}: tracks_poses has non-finite values")
        if np.any(np.diff(ts) < 0):
            raise SceneFormatError(f"{w}: tracks_timestamps_us not increasing")
        try:
            mats = geometry.pose7_xyzw_to_matrix(poses)
        except ValueError:
            raise SceneFormatError(f"{w}: tracks_poses has a zero quaternion") from None
        d = np.asarray(lists["cuboidtracks_data.cuboids_dims"][i], dtype=np.float64).reshape(-1)
        if d.shape != (3,):
            raise SceneFormatError(f"{w}: cuboids_dims must have 3 values, got {d.shape}")
        if tid in tracks:
            raise SceneFormatError(f"{w}: duplicate track id")
        tracks[tid] = Track(
            tid, str(lists["tracks_label_class"][i]), _flags_str(lists["tracks_flags"][i]), ts, mats, d
        )
    return tracks
