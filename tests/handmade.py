"""A minimal NuRec `.usdz` writer written from docs/scene_format.md alone (independent of the generator).

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


def gaussian_layer(
    state: dict,
    layer: str,
    n: int,
    rng,
    *,
    fourier=None,
    degree=3,
    positions=None,
    cuboid_ids=None,
    albedo=None,
    specular=None,
    rotations=None,
    densities=None,
    scales=None,
):
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
    cfg = {
        "density_activation": "sigmoid",
        "scale_activation": "exp",
        "rotation_activation": "normalize",
        "particle": {"radiance_sph_degree": degree, "radiance_sph_O0": o0},
    }
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


# ------------------------------------------------------------------------------------------------
# Multi-trajectory scenes: two sequences in one rig_trajectories.json.

TWO_SEQ = ("clipgt-seq-a", "clipgt-seq-b")
TWO_SEQ_T0 = (1_700_000_000_000_000, 1_700_000_005_000_000)  # trajectory B starts 5 s after A


def rig_pose(yaw_deg: float, xyz) -> np.ndarray:
    """Rig -> world: a yaw about z, then a translation."""
    a = np.radians(yaw_deg)
    m = np.eye(4)
    m[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    m[:3, 3] = xyz
    return m


def pinhole_calibration(seq: str | None, logical: str, idx: int, resolution, mount_x: float) -> dict:
    """A camera calibration (OpenCV pinhole, looking along rig +x); `seq` None omits its sequence_id."""
    t = np.eye(4)
    t[:3, :3] = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])  # OpenCV camera axes in the FLU rig
    t[:3, 3] = [mount_x, 0.0, 1.5]
    w, h = resolution
    cal = {
        "logical_sensor_name": logical,
        "unique_sensor_idx": idx,
        "T_sensor_rig": t.tolist(),
        "camera_model": {
            "type": "opencv-pinhole",
            "parameters": {
                "resolution": [w, h],
                "shutter_type": "GLOBAL",
                "principal_point": [w / 2, h / 2],
                "focal_length": [w / 2, w / 2],
            },
        },
    }
    if seq is not None:
        cal["sequence_id"] = seq
    return cal


def two_sequence_rig(recorded_offset=(0.0, 0.0, 0.5)) -> dict:
    """`rig_trajectories.json` with two trajectories (sequences TWO_SEQ):

    - `camera_front_wide_120fov` in both: 1920x1080 with 2 frames in A, 1600x1200 with 3 frames in B;
      B records per-frame rig poses (`cameras_frame_T_rig_worlds`): the interpolated rig pose moved by
      `recorded_offset` metres, so they differ from interpolation;
    - `camera_rear_b` only in B (no sequence_id: found by its key's `@` suffix), `camera_side_a` only in A;
    - `lidar_top_360fov` in A with `"lidar_model": null`;
    - linear start frame indices 0 (A front), 2 (A side), 3 (B front), 6 (B rear).
    """
    (sa, sb), (ta, tb) = TWO_SEQ, TWO_SEQ_T0
    ts_a = [ta, ta + 100_000, ta + 200_000]
    ts_b = [tb, tb + 100_000, tb + 200_000, tb + 300_000]
    poses_a = [rig_pose(0.0, [10.0 * i, 0.0, 0.0]) for i in range(3)]
    poses_b = [rig_pose(90.0 + 5 * i, [50.0, 10.0 * i, 0.0]) for i in range(4)]
    front_a, front_b, rear_b = (
        f"camera_front_wide_120fov@{sa}",
        f"camera_front_wide_120fov@{sb}",
        f"camera_rear_b@{sb}",
    )
    win_a = [[ta, ta + 30_000], [ta + 100_000, ta + 130_000]]
    win_b = [[tb + 50_000, tb + 80_000], [tb + 150_000, tb + 180_000], [tb + 250_000, tb + 280_000]]

    def lerp_pose(ts, poses, t):  # translation lerp + yaw lerp (the fixture's poses only yaw)
        i = min(max(int(np.searchsorted(ts, t, side="right")) - 1, 0), len(ts) - 2)
        f = (t - ts[i]) / (ts[i + 1] - ts[i])
        yaw = lambda m: np.degrees(np.arctan2(m[1, 0], m[0, 0]))  # noqa: E731
        return rig_pose(
            (1 - f) * yaw(poses[i]) + f * yaw(poses[i + 1]), (1 - f) * poses[i][:3, 3] + f * poses[i + 1][:3, 3]
        )

    recorded = []
    for s, e in win_b:
        pair = []
        for t in (s, e):
            m = lerp_pose(ts_b, poses_b, t)
            m[:3, 3] += recorded_offset
            pair.append(m.tolist())
        recorded.append(pair)
    lidar_t = np.eye(4)
    lidar_t[2, 3] = 1.9
    return {
        "T_world_base": np.eye(4).tolist(),
        "world_to_nre": {"matrix": np.eye(4).tolist()},
        "rig_trajectories": [
            {
                "sequence_id": sa,
                "T_rig_world_timestamps_us": ts_a,
                "T_rig_worlds": [p.tolist() for p in poses_a],
                "cameras_frame_timestamps_us": {front_a: win_a, f"camera_side_a@{sa}": [[ta + 10, ta + 20]]},
                "lidars_frame_timestamps_us": {f"lidar_top_360fov@{sa}": [[ta, ta + 100_000]]},
                "cameras_linear_start_frame_indices": {front_a: 0, f"camera_side_a@{sa}": 2},
                "lidars_linear_start_frame_indices": {f"lidar_top_360fov@{sa}": 0},
                "rig_bbox": {"centroid": [1.3, 0, 0.8], "dim": [4.8, 1.9, 1.6], "rot": [0, 0, 0]},
            },
            {
                "sequence_id": sb,
                "T_rig_world_timestamps_us": ts_b,
                "T_rig_worlds": [p.tolist() for p in poses_b],
                "cameras_frame_timestamps_us": {front_b: win_b, rear_b: [[tb, tb + 20_000]]},
                "cameras_frame_T_rig_worlds": {front_b: recorded},
                "cameras_linear_start_frame_indices": {front_b: 3, rear_b: 6},
                "rig_bbox": None,
            },
        ],
        "camera_calibrations": {
            front_a: pinhole_calibration(sa, "camera_front_wide_120fov", 0, (1920, 1080), 1.7),
            front_b: pinhole_calibration(sb, "camera_front_wide_120fov", 1, (1600, 1200), 1.9),
            rear_b: pinhole_calibration(None, "camera_rear_b", 2, (640, 480), -1.0),
            f"camera_side_a@{sa}": pinhole_calibration(sa, "camera_side_a", 3, (640, 480), 0.5),
        },
        "lidar_calibrations": {
            f"lidar_top_360fov@{sa}": {
                "logical_sensor_name": "lidar_top_360fov",
                "sequence_id": sa,
                "unique_sensor_idx": 4,
                "T_sensor_rig": lidar_t.tolist(),
                "lidar_model": None,
            },
        },
    }


def two_sequence_tracks(conflict: bool = False) -> dict:
    """`sequence_tracks.json` with one sequence per trajectory: A holds tracks 3 and 7, B holds 7 (the
    same data; with `conflict`, a different label) and 12."""
    (sa, sb), (ta, _) = TWO_SEQ, TWO_SEQ_T0

    def seq(key, ids, labels, t0, x0s):
        ts = [[t0, t0 + 100_000] for _ in ids]
        poses = [[[x, 5.0, 0.8, 0, 0, 0, 1], [x + 1, 5.0, 0.8, 0, 0, 0, 1]] for x in x0s]
        return {
            "tracks_data": {
                "tracks_id": [f"{i}@{key}" for i in ids],
                "tracks_label_class": labels,
                "tracks_flags": ["DYNAMIC|CONTROLLABLE"] * len(ids),
                "tracks_timestamps_us": ts,
                "tracks_poses": poses,
            },
            "cuboidtracks_data": {"cuboids_dims": [[4.5, 1.9, 1.5]] * len(ids)},
        }

    a = seq(sa, ["3", "7"], ["automobile", "automobile"], ta, [5.0, 15.0])
    b = seq(sb, ["7", "12"], ["person" if conflict else "automobile", "person"], ta, [15.0, 60.0])
    return {sa: a, sb: b}


def two_sequence_scene(path, *, data_info=b'{"sequence_id": "two-seq-scene"}', tracks=None, n=200, seed=0):
    """Writes a `.usdz` with `two_sequence_rig()`, `two_sequence_tracks()` (or `tracks`), no
    metadata.yaml, `data_info` as data_info.json (None: no member) and `n` plain Gaussians."""
    rng = np.random.default_rng(seed)
    state: dict = {}
    pos = np.concatenate(
        [rng.uniform([0, -10, 0], [60, 10, 4], (n // 2, 3)), rng.uniform([40, 0, 0], [60, 60, 4], (n - n // 2, 3))]
    )
    gaussian_layer(state, "gaussians", n, rng, degree=0, positions=pos)
    members = [
        ("volume.nurec", payload(state, {})),
        ("rig_trajectories.json", jbytes(two_sequence_rig())),
        ("sequence_tracks.json", jbytes(two_sequence_tracks() if tracks is None else tracks)),
    ]
    if data_info is not None:
        members.append(("data_info.json", data_info))
    usdz(path, members)
    return path
