"""Host-side scene metadata: cameras, lidars, ego trajectory, actor tracks (no Gaussians).

Parses the driving-scene side files of a NuRec `.usdz` (`rig_trajectories.json`,
`sequence_tracks.json`, `metadata.yaml`; see docs/scene_format.md#rig-trajectories, #sequence-tracks, #scene-identity). Everything here is
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


@dataclasses.dataclass(frozen=True, eq=False)  # identity equality: `==` on its arrays would be ambiguous
class CameraCalibration:
    """One camera of the ego rig.

    Attributes:
      logical_id: e.g. `camera_front_wide_120fov` (the key without its `@sequence` suffix).
      key: the full key in `rig_trajectories.json`.
      T_sensor_rig: (4, 4) camera -> rig, OpenCV camera axes (x right, y down, z forward).
      intrinsics: the camera model at its native resolution.
      frame_timestamps_us: (F, 2) int64 [start, end] exposure windows of the recorded frames.
      unique_sensor_idx: NRE's sensor index, or -1.
      trajectory_idx: index (file order) of the rig trajectory the camera was recorded in.
      sequence_id: the sequence (clip) id of that trajectory.
      frame_T_rig_world: (F, 2, 4, 4) recorded rig -> world at each frame's start and end
        (`cameras_frame_T_rig_worlds`), or None when the file has none for this camera.
      linear_start_frame_index: index of the camera's first frame in the file's linear numbering of
        all frames of all trajectories and cameras (`cameras_linear_start_frame_indices`), or -1.
    """

    logical_id: str
    key: str
    T_sensor_rig: np.ndarray
    intrinsics: CameraIntrinsics
    frame_timestamps_us: np.ndarray
    unique_sensor_idx: int = -1
    trajectory_idx: int = 0
    sequence_id: str = ""
    frame_T_rig_world: np.ndarray | None = None
    linear_start_frame_index: int = -1

    def recorded_frame(self, start_us: int, end_us: int) -> int | None:
        """The index of the recorded frame whose window is exactly [start_us, end_us], or None."""
        w = self.frame_timestamps_us
        if len(w) == 0:
            return None
        hit = np.flatnonzero((w[:, 0] == int(start_us)) & (w[:, 1] == int(end_us)))
        return int(hit[0]) if hit.size else None


@dataclasses.dataclass(frozen=True, eq=False)  # identity equality, as CameraCalibration
class LidarCalibration:
    """One lidar of the ego rig (`row-offset-spinning` model of NCore).

    Attributes:
      logical_id: e.g. `lidar_top_360fov`.
      T_sensor_rig: (4, 4) lidar -> rig.
      model: the lidar model type string; "" when the file has none (`"lidar_model": null`).
      parameters: the model parameters as stored (elevations, azimuths, spin rate, ...).
      frame_timestamps_us: (F, 2) int64 spin windows, possibly empty.
      trajectory_idx, sequence_id, linear_start_frame_index, unique_sensor_idx: as for cameras.
    """

    logical_id: str
    key: str
    T_sensor_rig: np.ndarray
    model: str
    parameters: Mapping[str, Any]
    frame_timestamps_us: np.ndarray
    trajectory_idx: int = 0
    sequence_id: str = ""
    linear_start_frame_index: int = -1
    unique_sensor_idx: int = -1


@dataclasses.dataclass(frozen=True)
class RigTrajectory:
    """The recorded ego trajectory.

    Attributes:
      timestamps_us: (T,) int64, increasing.
      T_rig_world: (T, 4, 4) rig -> world poses.
      sequence_id: the clip id.
      rig_bbox: {"centroid": [x, y, z], "dim": [L, W, H], "rot": [r, p, y]} in the rig frame, or None.
      trajectory_idx: its index in the file's `rig_trajectories` list (the gRPC trajectory_idx).
    """

    timestamps_us: np.ndarray
    T_rig_world: np.ndarray
    sequence_id: str = ""
    rig_bbox: Mapping[str, Any] | None = None
    trajectory_idx: int = 0

    @property
    def time_range_us(self) -> tuple[int, int]:
        return int(self.timestamps_us[0]), int(self.timestamps_us[-1])

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
      cameras: logical id -> calibration, in file order (the first calibration of each logical id
        when several trajectories hold the same camera; `camera_list` has them all).
      lidars: logical id -> calibration (likewise the first of each logical id).
      trajectory: the ego trajectory (the file's first), or None for a plain Gaussian scene.
      tracks: clean track id -> track.
      world_to_nre: (4, 4) world -> NRE/scene frame of the static Gaussians (identity when absent).
      T_world_base: (4, 4) world -> ECEF, or None.
      time_range_us: (start, end) from metadata.yaml, else from the trajectory, or None.
      yaml: the raw metadata.yaml mapping (empty when absent).
      members: names of the archive members.
      trajectories: every rig trajectory, in file order (`trajectories[i].trajectory_idx == i`).
      camera_list: every camera calibration, in file order (a logical id may repeat, one per trajectory).
      lidar_list: every lidar calibration, in file order.

    Metadata built without the last three (older callers) gets them from `trajectory`, `cameras` and
    `lidars`.
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
    trajectories: tuple[RigTrajectory, ...] = ()
    camera_list: tuple[CameraCalibration, ...] = ()
    lidar_list: tuple[LidarCalibration, ...] = ()

    def __post_init__(self):
        if not self.trajectories and self.trajectory is not None:
            object.__setattr__(self, "trajectories", (self.trajectory,))
        if not self.camera_list and self.cameras:
            object.__setattr__(self, "camera_list", tuple(self.cameras.values()))
        if not self.lidar_list and self.lidars:
            object.__setattr__(self, "lidar_list", tuple(self.lidars.values()))

    def camera(self, logical_id: str, trajectory_idx: int | None = None) -> CameraCalibration:
        """The calibration of camera `logical_id`: in trajectory `trajectory_idx`, or (None) the first
        one in file order (`cameras[logical_id]`). Raises KeyError naming what is missing."""
        if trajectory_idx is None:
            if logical_id not in self.cameras:
                raise KeyError(
                    f"scene {self.scene_id!r} has no camera {logical_id!r} "
                    f"(cameras: {', '.join(self.cameras) or 'none'})"
                )
            return self.cameras[logical_id]
        for cal in self.camera_list:
            if cal.logical_id == logical_id and cal.trajectory_idx == trajectory_idx:
                return cal
        held = sorted({c.trajectory_idx for c in self.camera_list if c.logical_id == logical_id})
        raise KeyError(
            f"scene {self.scene_id!r} has no camera {logical_id!r} in trajectory {trajectory_idx} "
            f"(it is in trajectories {held or 'none'})"
        )

    def trajectory_of(self, sensor: CameraCalibration | LidarCalibration) -> RigTrajectory | None:
        """The rig trajectory a sensor calibration belongs to (`trajectory` when its index names none)."""
        if self.trajectory is None:
            return None
        if 0 <= sensor.trajectory_idx < len(self.trajectories):
            return self.trajectories[sensor.trajectory_idx]
        return self.trajectory


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
    """One rigid 4x4 transform (see `_rigid_stack`)."""
    m = _matrix(value, where)
    return _rigid_stack(m, (), where)


def parse_floats(
    value: Any, where: str, length: int | None = None, pad: int | None = None, error: type[Exception] = SceneFormatError
) -> tuple[float, ...]:
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


CAMERA_MODELS = ("ftheta", "opencv-pinhole", "opencv-fisheye")


def build_intrinsics(
    kind: str,
    where: str,
    *,
    resolution: tuple[int, int],
    shutter: ShutterType,
    principal_point: Any,
    focal_length: Any = None,
    focal_field: str = "focal_length",
    reference_poly: PolynomialType = PolynomialType.PIXELDIST_TO_ANGLE,
    pixeldist_to_angle_poly: Any = None,
    angle_to_pixeldist_poly: Any = None,
    linear_cde: Any = None,
    radial_coeffs: Any = None,
    tangential_coeffs: Any = None,
    thin_prism_coeffs: Any = None,
    max_angle: float | None = None,
    error: type[Exception] = SceneFormatError,
) -> CameraIntrinsics:
    """The one validated constructor of camera intrinsics, for scene files (`parse_camera_model`) and
    gRPC CameraSpecs (`server/convert.py`) alike.

    `kind` is one of CAMERA_MODELS; values are raw (lists, tuples, None for absent) and every one is
    checked: finite numbers, lengths, positive focal lengths, a present reference polynomial, a
    non-singular FTheta linear term, a max angle in (0, pi]. Errors are `error` (SceneFormatError for
    files, ValueError for requests) with a message naming `<where>.<field>`."""
    pp = parse_floats(principal_point, f"{where}.principal_point", 2, error=error)
    if kind == "ftheta":
        bw = parse_poly(pixeldist_to_angle_poly, f"{where}.pixeldist_to_angle_poly", error=error)
        fw = parse_poly(angle_to_pixeldist_poly, f"{where}.angle_to_pixeldist_poly", error=error)
        if (reference_poly == PolynomialType.PIXELDIST_TO_ANGLE and not bw) or (
            reference_poly == PolynomialType.ANGLE_TO_PIXELDIST and not fw
        ):
            raise error(f"{where}: the reference polynomial ({reference_poly.name}) is missing or empty")
        cde = parse_floats((1.0, 0.0, 0.0) if linear_cde is None else linear_cde, f"{where}.linear_cde", 3, error=error)
        if abs(cde[0] - cde[1] * cde[2]) < 1e-9:
            raise error(f"{where}.linear_cde: singular (c - d*e = 0)")
        angle = parse_max_angle(max_angle, math.pi, f"{where}.max_angle", error=error)
        return FThetaIntrinsics(resolution, shutter, pp, reference_poly, bw, fw, angle, cde)  # type: ignore[arg-type]
    fl = parse_floats(focal_length, f"{where}.{focal_field}", 2, error=error)
    if fl[0] <= 0 or fl[1] <= 0:
        raise error(f"{where}.{focal_field}: must be positive, got {list(fl)}")
    if kind == "opencv-pinhole":
        return OpenCVPinholeIntrinsics(
            resolution,
            shutter,
            pp,
            fl,  # type: ignore[arg-type]
            parse_floats(radial_coeffs or (), f"{where}.radial_coeffs", pad=6, error=error),
            parse_floats(tangential_coeffs or (), f"{where}.tangential_coeffs", pad=2, error=error),
            parse_floats(thin_prism_coeffs or (), f"{where}.thin_prism_coeffs", pad=4, error=error),
        )
    if kind == "opencv-fisheye":
        return OpenCVFisheyeIntrinsics(
            resolution,
            shutter,
            pp,
            fl,  # type: ignore[arg-type]
            parse_floats(radial_coeffs or (), f"{where}.radial_coeffs", pad=4, error=error),
            parse_max_angle(max_angle, math.pi / 2, f"{where}.max_angle", error=error),
        )
    raise ValueError(f"unknown camera model kind {kind!r} (expected one of {', '.join(CAMERA_MODELS)})")


_MODEL_KINDS = {
    "ftheta": "ftheta",
    "opencv-pinhole": "opencv-pinhole",
    "opencv_pinhole": "opencv-pinhole",
    "pinhole": "opencv-pinhole",
    "opencv-fisheye": "opencv-fisheye",
    "opencv_fisheye": "opencv-fisheye",
    "fisheye": "opencv-fisheye",
}


def parse_camera_model(model: Any, where: str) -> CameraIntrinsics:
    """Parses a `camera_model` entry {type, parameters} of `rig_trajectories.json`."""
    if not isinstance(model, Mapping) or "type" not in model:
        raise SceneFormatError(f"{where}: expected {{type, parameters}}, got {model!r}")
    kind = _MODEL_KINDS.get(str(model["type"]).lower())
    if kind is None:
        raise UnsupportedSceneError(f"{where}.type: unsupported camera model {model['type']!r}")
    p = model.get("parameters") or {}
    at = f"{where}.parameters"
    return build_intrinsics(
        kind,
        at,
        resolution=_resolution(p, at),
        shutter=_enum(ShutterType, p.get("shutter_type"), f"{at}.shutter_type", ShutterType.GLOBAL),
        principal_point=p.get("principal_point"),
        focal_length=p.get("focal_length"),
        reference_poly=_enum(
            PolynomialType, p.get("reference_poly"), f"{at}.reference_poly", PolynomialType.PIXELDIST_TO_ANGLE
        ),
        pixeldist_to_angle_poly=p.get("pixeldist_to_angle_poly"),
        angle_to_pixeldist_poly=p.get("angle_to_pixeldist_poly"),
        linear_cde=p.get("linear_cde"),
        radial_coeffs=p.get("radial_coeffs"),
        tangential_coeffs=p.get("tangential_coeffs"),
        thin_prism_coeffs=p.get("thin_prism_coeffs"),
        max_angle=p.get("max_angle"),
    )


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


def _rigid_stack(value: Any, shape: tuple[int, ...], where: str) -> np.ndarray:
    """An array of rigid 4x4 transforms of `shape` + (4, 4): rotation rows orthonormal within 1e-3 and
    the bottom row (0, 0, 0, 1), then re-orthonormalised (JSON round trips leave ~1e-7 drift that
    slerp would amplify). Errors name the first bad entry's index."""
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise SceneFormatError(f"{where}: not numeric 4x4 matrices ({e})") from None
    if m.shape != shape + (4, 4):
        raise SceneFormatError(f"{where}: expected shape {list(shape + (4, 4))}, got {list(m.shape)}")
    if not np.all(np.isfinite(m)):
        raise SceneFormatError(f"{where}: non-finite value")
    flat = m.reshape(-1, 4, 4)
    r = flat[:, :3, :3]
    ortho = ~np.isclose(r @ np.swapaxes(r, 1, 2), np.eye(3), atol=1e-3).all(axis=(1, 2))
    bottom = ~np.isclose(flat[:, 3], [0, 0, 0, 1]).all(axis=1)
    bad = np.flatnonzero(ortho | bottom)
    if bad.size:
        idx = "".join(f"[{int(i)}]" for i in np.unravel_index(int(bad[0]), shape))
        raise SceneFormatError(f"{where}{idx}: not a rigid transform (rotation + translation)")
    u, _, vt = np.linalg.svd(r)
    flat = flat.copy()
    flat[:, :3, :3] = u @ vt
    return flat.reshape(m.shape)


@dataclasses.dataclass(frozen=True)
class RigDocument:
    """Everything `rig_trajectories.json` holds (see `parse_rig_document`).

    Attributes:
      trajectories: every rig trajectory, in file order (`trajectory_idx` = list index).
      cameras: every camera calibration, in file order (unique sensor ids; logical ids may repeat).
      lidars: every lidar calibration, in file order.
      world_to_nre: (4, 4) world -> NRE frame (identity when absent).
      T_world_base: (4, 4) world -> ECEF, or None.
    """

    trajectories: tuple[RigTrajectory, ...]
    cameras: tuple[CameraCalibration, ...]
    lidars: tuple[LidarCalibration, ...]
    world_to_nre: np.ndarray
    T_world_base: np.ndarray | None

    @staticmethod
    def first_of_each(cals) -> dict[str, Any]:
        """logical id -> the first calibration of that id (file order)."""
        out: dict[str, Any] = {}
        for cal in cals:
            out.setdefault(cal.logical_id, cal)
        return out


def _parse_trajectory(t: Any, i: int, member: str) -> RigTrajectory:
    where = f"{member}: rig_trajectories[{i}]"
    if not isinstance(t, Mapping):
        raise SceneFormatError(f"{where}: must be an object")
    try:
        ts = np.asarray(t.get("T_rig_world_timestamps_us", []), dtype=np.int64)
    except (TypeError, ValueError):
        raise SceneFormatError(f"{where}.T_rig_world_timestamps_us: expected a list of integers") from None
    poses = t.get("T_rig_worlds") or []
    if ts.ndim != 1 or len(ts) == 0 or len(poses) != len(ts):
        raise SceneFormatError(
            f"{where}: T_rig_world_timestamps_us ({ts.size}) and T_rig_worlds ({len(poses)}) "
            "must be non-empty lists of equal length"
        )
    if np.any(np.diff(ts) <= 0):
        raise SceneFormatError(f"{where}.T_rig_world_timestamps_us: not strictly increasing")
    mats = _rigid_stack(poses, (len(ts),), f"{where}.T_rig_worlds")
    return RigTrajectory(ts, mats, str(t.get("sequence_id") or ""), t.get("rig_bbox"), i)


def _owner(key: str, cal: Mapping[str, Any], trajectories: tuple[RigTrajectory, ...], where: str) -> int:
    """The trajectory a calibration belongs to: the one of its `sequence_id`, else of its key's `@`
    suffix, else the only one (0 when the file has none)."""
    seq_ids = [t.sequence_id for t in trajectories]
    for candidate in (cal.get("sequence_id"), key.split("@", 1)[1] if "@" in key else None):
        if candidate and str(candidate) in seq_ids:
            return seq_ids.index(str(candidate))
    if len(trajectories) <= 1:
        return 0
    raise SceneFormatError(
        f"{where}: belongs to no rig trajectory (sequence_id {cal.get('sequence_id')!r}, key {key!r}; "
        f"trajectories: {seq_ids})"
    )


def _per_sensor(traj_doc: Mapping[str, Any], name: str, key: str, logical: str) -> Any:
    """`traj_doc[name][key]` (the unique sensor id), falling back to the logical id."""
    table = traj_doc.get(name) or {}
    if not isinstance(table, Mapping):
        return None
    return table.get(key, table.get(logical))


def _linear_start(value: Any, where: str) -> int:
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise SceneFormatError(f"{where}: expected a non-negative integer, got {value!r}")
    return int(value)


def parse_rig_document(doc: Any, member: str = "rig_trajectories.json") -> RigDocument:
    """Parses `rig_trajectories.json`: every trajectory, and every calibration with the frame
    windows, recorded frame poses and linear frame index of its own trajectory."""
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

    traj_docs = doc.get("rig_trajectories") or []
    if not isinstance(traj_docs, list):
        raise SceneFormatError(f"{member}: rig_trajectories must be a list")
    trajectories = tuple(_parse_trajectory(t, i, member) for i, t in enumerate(traj_docs))

    def sensor_common(key, cal, kind, windows_name, starts_name):
        where = f"{member}: {kind}_calibrations[{key!r}]"
        if not isinstance(cal, Mapping):
            raise SceneFormatError(f"{where}: must be an object")
        logical = str(cal.get("logical_sensor_name") or key.split("@")[0])
        idx = _owner(key, cal, trajectories, where)
        tdoc = traj_docs[idx] if trajectories else {}
        tw = f"{member}: rig_trajectories[{idx}]"
        windows = _frame_windows(_per_sensor(tdoc, windows_name, key, logical), f"{tw}.{windows_name}[{key!r}]")
        start = _linear_start(_per_sensor(tdoc, starts_name, key, logical), f"{tw}.{starts_name}[{key!r}]")
        seq = trajectories[idx].sequence_id if trajectories else str(cal.get("sequence_id") or "")
        try:
            usi = int(cal.get("unique_sensor_idx", -1))
        except (TypeError, ValueError):
            raise SceneFormatError(f"{where}.unique_sensor_idx: expected an integer") from None
        return where, logical, idx, tdoc, tw, windows, start, seq, usi

    cameras: list[CameraCalibration] = []
    cals = doc.get("camera_calibrations") or {}
    if not isinstance(cals, Mapping):
        raise SceneFormatError(f"{member}: camera_calibrations must be an object")
    for key, cal in cals.items():
        where, logical, idx, tdoc, tw, windows, start, seq, usi = sensor_common(
            key, cal, "camera", "cameras_frame_timestamps_us", "cameras_linear_start_frame_indices"
        )
        recorded = _per_sensor(tdoc, "cameras_frame_T_rig_worlds", key, logical)
        frame_poses = None
        if recorded is not None and not isinstance(recorded, list):
            raise SceneFormatError(f"{tw}.cameras_frame_T_rig_worlds[{key!r}]: expected [[T_start, T_end], ...]")
        if recorded:
            frame_poses = _rigid_stack(recorded, (len(windows), 2), f"{tw}.cameras_frame_T_rig_worlds[{key!r}]")
        cameras.append(
            CameraCalibration(
                logical_id=logical,
                key=key,
                T_sensor_rig=_rigid(cal.get("T_sensor_rig"), f"{where}.T_sensor_rig"),
                intrinsics=parse_camera_model(cal.get("camera_model"), f"{where}.camera_model"),
                frame_timestamps_us=windows,
                unique_sensor_idx=usi,
                trajectory_idx=idx,
                sequence_id=seq,
                frame_T_rig_world=frame_poses,
                linear_start_frame_index=start,
            )
        )
    lidars: list[LidarCalibration] = []
    cals = doc.get("lidar_calibrations") or {}
    if not isinstance(cals, Mapping):
        raise SceneFormatError(f"{member}: lidar_calibrations must be an object")
    for key, cal in cals.items():
        where, logical, idx, tdoc, tw, windows, start, seq, usi = sensor_common(
            key, cal, "lidar", "lidars_frame_timestamps_us", "lidars_linear_start_frame_indices"
        )
        model = cal.get("lidar_model")
        if model is None:  # NuRec writes null for lidars it has no model of
            model = {}
        if not isinstance(model, Mapping):
            raise SceneFormatError(f"{where}.lidar_model: expected an object or null, got {model!r}")
        params = model.get("parameters")
        if params is not None and not isinstance(params, Mapping):
            raise SceneFormatError(f"{where}.lidar_model.parameters: expected an object, got {type(params).__name__}")
        lidars.append(
            LidarCalibration(
                logical_id=logical,
                key=key,
                T_sensor_rig=_rigid(cal.get("T_sensor_rig"), f"{where}.T_sensor_rig"),
                model=str(model.get("type") or ""),
                parameters=dict(params or {}),
                frame_timestamps_us=windows,
                trajectory_idx=idx,
                sequence_id=seq,
                linear_start_frame_index=start,
                unique_sensor_idx=usi,
            )
        )
    return RigDocument(trajectories, tuple(cameras), tuple(lidars), world_to_nre, t_world_base)


def parse_rig_trajectories(doc: Any, member: str = "rig_trajectories.json"):
    """Parses `rig_trajectories.json` (the single-trajectory view of `parse_rig_document`).

    Returns:
      (cameras, lidars, trajectory, world_to_nre, T_world_base): logical id -> the first calibration
      of that id, likewise for lidars, and the first trajectory (or None).
    """
    rig = parse_rig_document(doc, member)
    return (
        RigDocument.first_of_each(rig.cameras),
        RigDocument.first_of_each(rig.lidars),
        rig.trajectories[0] if rig.trajectories else None,
        rig.world_to_nre,
        rig.T_world_base,
    )


def _flags_str(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "|".join(str(v) for v in value)
    return str(value)


def parse_sequence_tracks(doc: Any, member: str = "sequence_tracks.json") -> dict[str, Track]:
    """Parses `sequence_tracks.json`: the tracks of every sequence, merged (one sequence per rig
    trajectory). A track id in two sequences must hold the same data there (it is kept once)."""
    if not isinstance(doc, Mapping):
        raise SceneFormatError(f"{member}: top level must be an object")
    tracks: dict[str, Track] = {}
    origin: dict[str, str] = {}
    for seq_key, seq in doc.items():
        for tid, track in _parse_sequence(seq_key, seq, member).items():
            if tid in tracks:
                if not _same_track(tracks[tid], track):
                    raise SceneFormatError(
                        f"{member}: track {tid!r} is in sequences {origin[tid]!r} and {seq_key!r} with different data"
                    )
                continue
            tracks[tid] = track
            origin[tid] = seq_key
    return tracks


def _same_track(a: Track, b: Track) -> bool:
    return (
        a.label == b.label
        and a.flags == b.flags
        and np.array_equal(a.timestamps_us, b.timestamps_us)
        and np.array_equal(a.T_object_world, b.T_object_world)
        and np.array_equal(a.dims, b.dims)
    )


def _parse_sequence(seq_key: str, seq: Any, member: str) -> dict[str, Track]:
    where = f"{member}: [{seq_key!r}]"
    if seq is not None and not isinstance(seq, Mapping):
        raise SceneFormatError(f"{where}: must be an object")
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
        tracks[tid] = Track(tid, str(lists["tracks_label_class"][i]), _flags_str(lists["tracks_flags"][i]), ts, mats, d)
    return tracks


def metadata_lines(meta: SceneMetadata) -> list[str]:
    """Human-readable lines (indented two spaces) on a scene's rig trajectories, cameras and lidars:
    each trajectory with its sequence id, poses and duration, each camera with its trajectory index
    and frame count (and whether the file recorded per-frame rig poses for it)."""
    lines = []
    trajectories = meta.trajectories if meta.trajectory is not None else ()
    if not trajectories:
        lines.append("  ego trajectory: none (any time interval is accepted)")
    for traj in trajectories:
        ts = traj.timestamps_us
        dist = float(np.sum(np.linalg.norm(np.diff(traj.T_rig_world[:, :3, 3], axis=0), axis=1)))
        label = "ego trajectory" if len(trajectories) == 1 else f"ego trajectory {traj.trajectory_idx}"
        lines.append(
            f"  {label}: {len(ts)} poses over {(ts[-1] - ts[0]) / 1e6:.2f} s, {dist:.1f} m "
            f"[{ts[0]} .. {ts[-1]} µs]" + (f" sequence {traj.sequence_id!r}" if traj.sequence_id else "")
        )
    for cam in meta.camera_list:
        intr = cam.intrinsics
        extra = ", recorded frame poses" if cam.frame_T_rig_world is not None else ""
        lines.append(
            f"  camera {cam.logical_id:<28} {intr.model:<15} {intr.resolution[0]}x{intr.resolution[1]} "
            f"{intr.shutter_type.name:<22} trajectory {cam.trajectory_idx}: {len(cam.frame_timestamps_us)} "
            f"frames{extra}"
        )
    for lid in meta.lidar_list:
        lines.append(
            f"  lidar  {lid.logical_id:<28} {lid.model or '(no lidar model)'} "
            f"trajectory {lid.trajectory_idx}: {len(lid.frame_timestamps_us)} spins"
        )
    return lines
