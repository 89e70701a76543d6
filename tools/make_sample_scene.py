"""Deterministic generator of nurec-jax's bundled sample scene: a small NuRec driving scene.

Writes a NuRec `.usdz` laid out as docs/scene_format.md#a-minimal-scene describes: USD layers written with
usd-core (`default.usda`, `volume.usda`, `rig_trajectories.usda`), a gzip+msgpack `volume.nurec`
with layers `background`, `road` and `dynamic_rigids`, a sky cubemap, `metadata.yaml`,
`rig_trajectories.json` (4 cameras, a lidar, a 12 s ego trajectory, non-zero `world_to_nre`) and
`sequence_tracks.json` (parked and moving cars, out-of-order `@`-suffixed layer track ids), and an
asset bank (`external_assets/`: an orange sedan and a box truck) for actor editing.

The street runs along world +x: asphalt with lane markings, raised sidewalks, building façades
with windows, parked cars and moving cars. The ego drives down the right lane at 10 m/s.

    python tools/make_sample_scene.py --output nurec_jax/data/sample_scene.usdz

The output is byte-for-byte reproducible (fixed seed, zip dates, gzip mtime); a test checks that
the shipped file is what this script makes.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import struct
import zipfile

import msgpack
import numpy as np
import yaml

from nurec_jax import cameras

SEQ = "clipgt-sample-street-0001"
T0_US = 1_700_000_000_000_000
DURATION_S = 12.0
EGO_SPEED = 10.0  # m/s, urban
FRAME_PERIOD_US = 100_000
WORLD_TO_NRE_T = np.array([-38.0, 4.5, -1.25])  # NRE frame = world shifted; catches frame mixing
SKY_SIZE = 64
ROLLING_READOUT_US = 30_000

# Street cross-section (world y, metres); the ego's lane is centred on y = 0.
LANE_W = 3.5
ROAD_Y = (-4.25, 7.75)
SIDEWALK_W = 3.0
SIDEWALK_H = 0.15
X_RANGE = (-40.0, 185.0)


def _yaw_quat_wxyz(angle, axis=2):
    q = np.zeros((np.size(angle), 4))
    q[:, 0] = np.cos(np.asarray(angle) / 2)
    q[:, 1 + axis] = np.sin(np.asarray(angle) / 2)
    return q


class _Builder:
    """Accumulates Gaussians (world or local frame) with RGB radiance and a lidar intensity."""

    def __init__(self, rng):
        self.rng = rng
        self.parts = []

    def plane(
        self,
        origin,
        u,
        v,
        nu,
        nv,
        spacing,
        color_fn,
        normal_sigma=0.015,
        opacity_logit=3.0,
        intensity=0.3,
        normal_axis=2,
    ):
        """Gaussians on the parallelogram origin + a*u + b*v, a,b in [0,1], on a jittered grid."""
        rng = self.rng
        a, b = np.meshgrid((np.arange(nu) + 0.5) / nu, (np.arange(nv) + 0.5) / nv, indexing="ij")
        a = a.ravel() + rng.uniform(-0.3, 0.3, a.size) / nu
        b = b.ravel() + rng.uniform(-0.3, 0.3, b.size) / nv
        pts = np.asarray(origin) + a[:, None] * np.asarray(u) + b[:, None] * np.asarray(v)
        n = len(pts)
        sig = np.full((n, 3), 0.62 * spacing) * rng.uniform(0.85, 1.2, (n, 1))
        sig[:, normal_axis] = normal_sigma
        # Random spin about the surface normal, then an unnormalised scale factor (NuRec stores raw quats).
        q = _yaw_quat_wxyz(rng.uniform(0, np.pi, n), normal_axis) * rng.uniform(0.5, 2.0, (n, 1))
        rgb = np.clip(color_fn(pts, a, b), 0.0, 1.0)
        logit = np.full(n, opacity_logit) + rng.normal(0, 0.4, n)
        # A sprinkle of faint Gaussians keeps density logits on both sides of 0.
        faint = rng.uniform(size=n) < 0.04
        logit[faint] = rng.uniform(-3.0, -0.5, faint.sum())
        self.parts.append((pts, q, np.log(sig), logit, rgb, np.full(n, intensity)))

    def box(self, lo, hi, spacing, color_fn, intensity=0.5, faces=("x+", "x-", "y+", "y-", "z+")):
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        d = hi - lo
        for face in faces:
            axis = "xyz".index(face[0])
            o = lo.copy()
            if face[1] == "+":
                o[axis] = hi[axis]
            others = [i for i in range(3) if i != axis]
            u = np.zeros(3)
            v = np.zeros(3)
            u[others[0]] = d[others[0]]
            v[others[1]] = d[others[1]]
            nu = max(2, int(round(d[others[0]] / spacing)))
            nv = max(2, int(round(d[others[1]] / spacing)))
            self.plane(
                o,
                u,
                v,
                nu,
                nv,
                spacing,
                color_fn,
                normal_sigma=0.012,
                opacity_logit=3.5,
                intensity=intensity,
                normal_axis=axis,
            )

    def arrays(self):
        cols = list(zip(*self.parts))
        return [np.concatenate(c) for c in cols]


def _noise(rng, n, amp):
    return rng.normal(0, amp, (n, 1))


def build_static(rng):
    """Background (façades, sidewalks, poles) and road layers, world frame."""
    road = _Builder(rng)
    x0, x1 = X_RANGE
    length = x1 - x0

    def asphalt(p, a, b):
        n = len(p)
        base = np.array([0.24, 0.24, 0.26]) + _noise(rng, n, 0.025)
        y, x = p[:, 1], p[:, 0]
        centre = (np.abs(y - LANE_W / 2) < 0.1) & (np.mod(x, 9.0) < 3.0)
        edge = (np.abs(y + LANE_W / 2) < 0.1) | (np.abs(y - 1.5 * LANE_W) < 0.1)
        parking = (np.abs(y - ROAD_Y[0] - 0.05) < 0.08) | (np.abs(y - ROAD_Y[1] + 0.05) < 0.08)
        base = np.where((centre | edge)[:, None], np.array([0.92, 0.92, 0.88]), base)
        base = np.where(parking[:, None], np.array([0.85, 0.78, 0.35]), base)
        return base

    w = ROAD_Y[1] - ROAD_Y[0]
    road.plane(
        [x0, ROAD_Y[0], 0.0], [length, 0, 0], [0, w, 0], int(length / 0.3), int(w / 0.16), 0.22, asphalt, intensity=0.12
    )

    bg = _Builder(rng)

    def concrete(p, a, b):
        tile = (np.mod(p[:, 0], 1.5) < 0.05)[:, None]
        return np.where(tile, 0.45, 0.62) + _noise(rng, len(p), 0.02) + np.array([0.0, 0.0, 0.02])

    for y_in, y_out in ((ROAD_Y[0], ROAD_Y[0] - SIDEWALK_W), (ROAD_Y[1], ROAD_Y[1] + SIDEWALK_W)):
        lo, hi = min(y_in, y_out), max(y_in, y_out)
        bg.plane(
            [x0, lo, SIDEWALK_H],
            [length, 0, 0],
            [0, hi - lo, 0],
            int(length / 0.4),
            int((hi - lo) / 0.4),
            0.4,
            concrete,
            intensity=0.25,
        )
        # Kerb face toward the road.
        bg.plane(
            [x0, y_in, 0.0],
            [length, 0, 0],
            [0, 0, SIDEWALK_H],
            int(length / 0.3),
            2,
            0.15,
            lambda p, a, b: np.full((len(p), 3), 0.7),
            intensity=0.3,
            normal_axis=1,
        )

    palette = np.array(
        [
            [0.80, 0.72, 0.58],
            [0.62, 0.30, 0.24],
            [0.60, 0.62, 0.64],
            [0.55, 0.66, 0.78],
            [0.88, 0.84, 0.72],
            [0.70, 0.52, 0.40],
            [0.42, 0.46, 0.40],
        ]
    )

    def facade_fn(block_start, block_len, color, height):
        def fn(p, a, b):
            along = p[:, 0] if p.shape[0] and np.ptp(p[:, 0]) > 1e-6 else p[:, 1]
            s = np.mod(along - block_start, 3.0)
            z = p[:, 2]
            window = (s > 0.8) & (s < 2.2) & (np.mod(z, 3.2) > 1.0) & (np.mod(z, 3.2) < 2.5) & (z > 2.0)
            door_band = z < 0.25
            out = color + _noise(rng, len(p), 0.03)
            out = np.where(window[:, None], np.array([0.16, 0.22, 0.30]) + _noise(rng, len(p), 0.02), out)
            out = np.where(door_band[:, None], color * 0.55, out)
            return out

        return fn

    for side, y in ((0, ROAD_Y[0] - SIDEWALK_W), (1, ROAD_Y[1] + SIDEWALK_W)):
        x = x0
        k = side * 3
        while x < x1 - 1.0:
            block = min(float(rng.uniform(14.0, 28.0)), x1 - x)
            height = float(rng.uniform(8.0, 16.0))
            color = palette[k % len(palette)]
            k += 1
            bg.plane(
                [x, y, 0.0],
                [block, 0, 0],
                [0, 0, height],
                int(block / 0.42),
                int(height / 0.42),
                0.42,
                facade_fn(x, block, color, height),
                intensity=0.35,
                normal_axis=1,
            )
            x += block
    # A building closing the street's far end.
    bg.plane(
        [x1, ROAD_Y[0] - SIDEWALK_W, 0.0],
        [0, ROAD_Y[1] - ROAD_Y[0] + 2 * SIDEWALK_W, 0],
        [0, 0, 14.0],
        int(18.0 / 0.42),
        int(14.0 / 0.42),
        0.42,
        facade_fn(0.0, 18.0, palette[4], 14.0),
        intensity=0.35,
        normal_axis=0,
    )
    # Lamp posts on both sidewalks.
    for x in np.arange(x0 + 10.0, x1, 25.0):
        for y in (ROAD_Y[0] - 0.6, ROAD_Y[1] + 0.6):
            bg.box(
                [x - 0.08, y - 0.08, SIDEWALK_H],
                [x + 0.08, y + 0.08, 5.5],
                0.08,
                lambda p, a, b: np.full((len(p), 3), 0.18),
                intensity=0.6,
            )
    return bg.arrays(), road.arrays()


CAR_DIMS = np.array([4.5, 1.85, 1.5])


def build_car(rng, color):
    """One car in its cuboid-local frame (origin at the box centre, x forward, z up)."""
    b = _Builder(rng)
    half = CAR_DIMS / 2
    body_top = -half[2] + 0.85

    def paint(p, a, c):
        return color + _noise(rng, len(p), 0.02)

    def glass_or_paint(p, a, c):
        out = color + _noise(rng, len(p), 0.02)
        glass = p[:, 2] > body_top + 0.08
        return np.where(glass[:, None], np.array([0.08, 0.10, 0.14]), out)

    b.box([-half[0], -half[1], -half[2] + 0.25], [half[0], half[1], body_top], 0.14, paint, intensity=0.55)
    b.box([-1.3, -half[1] + 0.1, body_top], [1.0, half[1] - 0.1, half[2]], 0.13, glass_or_paint, intensity=0.5)
    # Wheels: dark discs on the sides, facing y.
    for x in (-1.4, 1.4):
        for y in (-half[1] - 0.01, half[1] + 0.01):
            b.plane(
                [x - 0.33, y, -half[2]],
                [0.66, 0, 0],
                [0, 0, 0.62],
                5,
                5,
                0.13,
                lambda p, a, c: np.full((len(p), 3), 0.05),
                intensity=0.2,
                normal_axis=1,
            )
    return b.arrays()


TRUCK_DIMS = np.array([7.6, 2.45, 3.3])
ASSETS = (
    # id, label, dims, builder
    ("sedan_orange", "automobile", CAR_DIMS, lambda rng: build_car(rng, np.array([0.95, 0.45, 0.05]))),
    ("box_truck", "heavy_truck", TRUCK_DIMS, lambda rng: build_truck(rng)),
)


def build_truck(rng):
    """A box truck in its cuboid-local frame: white cargo box behind a blue cab with a windscreen."""
    b = _Builder(rng)
    half = TRUCK_DIMS / 2
    floor = -half[2] + 0.55
    box_front = half[0] - 2.1

    def white(p, a, c):
        return np.array([0.90, 0.90, 0.88]) + _noise(rng, len(p), 0.015)

    def cab(p, a, c):
        out = np.array([0.10, 0.25, 0.60]) + _noise(rng, len(p), 0.02)
        glass = (p[:, 2] > floor + 1.15) & (p[:, 0] > box_front + 0.9)
        return np.where(glass[:, None], np.array([0.08, 0.10, 0.14]), out)

    b.box([-half[0], -half[1], floor], [box_front - 0.1, half[1], half[2]], 0.2, white, intensity=0.7)
    b.box([box_front, -half[1] + 0.05, floor], [half[0], half[1] - 0.05, floor + 2.0], 0.15, cab, intensity=0.55)
    for x in (-half[0] + 1.2, -half[0] + 2.4, half[0] - 1.0):
        for y in (-half[1] - 0.01, half[1] + 0.01):
            b.plane(
                [x - 0.5, y, -half[2]],
                [1.0, 0, 0],
                [0, 0, 0.95],
                6,
                6,
                0.15,
                lambda p, a, c: np.full((len(p), 3), 0.05),
                intensity=0.2,
                normal_axis=1,
            )
    return b.arrays()


def asset_members(seed):
    """The asset bank: `external_assets/<id>/<id>.ply` (3DGS PLY, cuboid-local) and its metadata.yaml."""
    from nurec_jax.ply import ply_bytes

    rng = np.random.default_rng(seed + 1)  # own stream: the scene's other members do not change
    members, entries = [], []
    for asset_id, label, dims, build in ASSETS:
        pts, q, log_s, logit, rgb, _ = build(rng)
        dc = (np.clip(rgb, 0, 1) - 0.5) / 0.28209479177387814  # 3DGS degree-0 SH: rgb = 0.5 + C0 * dc
        members.append((f"external_assets/{asset_id}/{asset_id}.ply", ply_bytes(pts, q, log_s, logit, dc[:, None, :])))
        entries.append({"track_id": asset_id, "label_class": label, "cuboids_dims": [float(d) for d in dims]})
    members.append(("external_assets/metadata.yaml", yaml.safe_dump({"assets": entries}, sort_keys=False).encode()))
    return members


def ego_pose(t_s):
    """Rig -> world at t seconds after T0: down the right lane with a gentle weave."""
    x = EGO_SPEED * t_s
    y = 0.25 * np.sin(2 * np.pi * t_s / 8.0) - 0.25 * np.sin(0.0)
    dy = 0.25 * 2 * np.pi / 8.0 * np.cos(2 * np.pi * t_s / 8.0)
    yaw = np.arctan2(dy, EGO_SPEED)
    m = np.eye(4)
    m[:3, :3] = _rotz(yaw)
    m[:3, 3] = [x, y, 0.0]
    return m


def _rotz(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def _rotx(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


def _roty(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


# OpenCV camera axes (x right, y down, z forward) -> rig FLU, for a camera looking along rig +x.
_CAM_FRONT = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])


def _cam_T(yaw, pitch, t):
    m = np.eye(4)
    m[:3, :3] = _rotz(yaw) @ _roty(pitch) @ _CAM_FRONT
    m[:3, 3] = t
    return m


def _ftheta(width, height, cx, cy, bw, cde, shutter):
    """FTheta parameters with the backward polynomial as reference and a fitted forward one."""
    bw = np.asarray(bw, float)
    r_corner = math.hypot(max(cx, width - cx), max(cy, height - cy))
    theta = np.polynomial.polynomial.polyval(np.linspace(0.0, r_corner * 1.02, 400), bw)
    assert np.all(np.diff(theta) > 0), "backward polynomial must be monotonic over the image"
    fw = cameras.fit_inverse_poly(bw, r_corner * 1.02, samples=400)  # forward r(theta), c0 = 0
    # The least-squares fit differs in its last digits between CPUs and numpy builds; 10 significant
    # digits (far below a pixel) make the written file the same on every machine.
    fw = np.array([float(f"{v:.10g}") for v in fw])
    return {
        "resolution": [width, height],
        "shutter_type": shutter,
        "principal_point": [cx, cy],
        "reference_poly": "PIXELDIST_TO_ANGLE",
        "pixeldist_to_angle_poly": bw.tolist(),
        "angle_to_pixeldist_poly": fw.tolist(),
        "max_angle": float(np.polynomial.polynomial.polyval(r_corner, bw)),
        "linear_cde": list(cde),
    }


def camera_calibrations():
    cams = {
        "camera_front_wide_120fov": (
            _cam_T(0.0, math.radians(2.0), [1.70, 0.0, 1.45]),
            {
                "type": "ftheta",
                "parameters": _ftheta(
                    1920,
                    1080,
                    959.4,
                    539.2,
                    [0.0, 1.0e-3, 1.1e-7, -3.0e-11, 1.5e-14, -3.0e-18],
                    (1.0002, 0.0003, -0.0004),
                    "ROLLING_TOP_TO_BOTTOM",
                ),
            },
        ),
        "camera_front_tele_30fov": (
            _cam_T(0.0, math.radians(1.0), [1.75, 0.12, 1.50]),
            {
                "type": "ftheta",
                "parameters": _ftheta(
                    1920,
                    1080,
                    961.1,
                    540.6,
                    [0.0, 2.72e-4, 4.0e-9, -1.2e-12, 0.0, 0.0],
                    (0.9998, -0.0002, 0.0001),
                    "ROLLING_TOP_TO_BOTTOM",
                ),
            },
        ),
        "camera_rear_pinhole_70fov": (
            _cam_T(math.pi, math.radians(4.0), [-0.95, 0.0, 1.55]),
            {
                "type": "opencv-pinhole",
                "parameters": {
                    "resolution": [1280, 720],
                    "shutter_type": "ROLLING_TOP_TO_BOTTOM",
                    "principal_point": [641.2, 358.7],
                    "focal_length": [914.0, 913.2],
                    "radial_coeffs": [-0.08, 0.012, 0.0, 0.0005, 0.0, 0.0],
                    "tangential_coeffs": [1.0e-4, -2.0e-4],
                    "thin_prism_coeffs": [0.0, 0.0, 0.0, 0.0],
                },
            },
        ),
        "camera_left_fisheye_200fov": (
            _cam_T(math.pi / 2, math.radians(10.0), [2.05, 0.95, 1.05]),
            {
                "type": "opencv-fisheye",
                "parameters": {
                    "resolution": [1280, 1024],
                    "shutter_type": "GLOBAL",
                    "principal_point": [640.5, 511.8],
                    "focal_length": [360.0, 360.0],
                    "radial_coeffs": [0.02, -0.004, 0.0008, 0.0],
                    "max_angle": math.radians(100.0),
                },
            },
        ),
    }
    out = {}
    for i, (name, (t, model)) in enumerate(cams.items()):
        out[f"{name}@{SEQ}"] = {
            "logical_sensor_name": name,
            "sequence_id": SEQ,
            "unique_sensor_idx": i,
            "T_sensor_rig": t.tolist(),
            "camera_model": model,
        }
    return out


def pandar128_elevations_deg():
    """Plausible Pandar128-like beam elevations, +14.44° .. -25.02°, dense around the horizon."""
    u = np.linspace(0.0, 1.0, 128)
    # Monotone map with fine spacing (~0.12°) around the horizon and ~0.5° toward the ends.
    f = u + 0.1 * np.sin(2 * np.pi * u)
    e = 14.44 - 39.46 * f
    return e


def lidar_calibrations():
    elev = np.radians(pandar128_elevations_deg())
    offsets = np.radians(np.tile([1.3, -1.3, 3.9, -3.9], 32) * 0.5)
    t = np.eye(4)
    t[:3, 3] = [1.25, 0.0, 1.95]
    return {
        f"lidar_top_360fov@{SEQ}": {
            "logical_sensor_name": "lidar_top_360fov",
            "sequence_id": SEQ,
            "unique_sensor_idx": 0,
            "T_sensor_rig": t.tolist(),
            "lidar_model": {
                "type": "row-offset-spinning",
                "parameters": {
                    "device": "PANDAR128",
                    "n_rows": 128,
                    "n_columns": 3600,
                    "row_elevations_rad": [round(float(v), 7) for v in elev],
                    "column_azimuths_rad": [
                        round(float(v), 7) for v in np.linspace(np.pi, -np.pi, 3600, endpoint=False)
                    ],
                    "row_azimuth_offsets_rad": [round(float(v), 7) for v in offsets],
                    "spinning_frequency_hz": 10.0,
                    "spinning_direction": "cw",
                    "min_range_m": 0.3,
                    "max_range_m": 200.0,
                },
            },
        }
    }


def _moving_track(x_start, y, speed, t_start_s, t_end_s):
    ts = np.arange(t_start_s, t_end_s + 1e-9, 0.1)
    heading = 0.0 if speed >= 0 else np.pi
    poses = []
    for t in ts:
        x = x_start + speed * (t - t_start_s)
        qz, qw = np.sin(heading / 2), np.cos(heading / 2)
        poses.append([x, y, CAR_DIMS[2] / 2, 0.0, 0.0, qz, qw])
    return [int(T0_US + round(t * 1e6)) for t in ts], poses


def tracks():
    """JSON track order; the rigid layer's own order (obj_track_ids) differs on purpose."""
    spec = [
        # id, label, flags, (timestamps, poses), colour (None: no Gaussians)
        (
            "3",
            "automobile",
            "DYNAMIC|CONTROLLABLE",
            _moving_track(30.0, 0.0, 11.0, 0.0, DURATION_S),
            [0.70, 0.08, 0.06],
        ),
        (
            "7",
            "automobile",
            "DYNAMIC|CONTROLLABLE",
            _moving_track(150.0, LANE_W, -9.0, 0.0, DURATION_S),
            [0.10, 0.22, 0.62],
        ),
        ("11", "person", "NONE", _moving_track(12.0, ROAD_Y[0] - 1.5, 1.3, 0.0, DURATION_S), None),
        (
            "21",
            "automobile",
            "DYNAMIC|CONTROLLABLE",
            _moving_track(175.0, LANE_W, -12.0, 4.0, DURATION_S),
            [0.92, 0.92, 0.90],
        ),
        ("12", "automobile", "NONE", _moving_track(18.0, ROAD_Y[0] + 1.2, 0.0, 0.0, DURATION_S), [0.65, 0.67, 0.70]),
        (
            "15",
            "automobile",
            "CONTROLLABLE",
            _moving_track(52.0, ROAD_Y[1] - 1.2, -0.0, 0.0, DURATION_S),
            [0.12, 0.35, 0.18],
        ),
        ("30", "automobile", "NONE", _moving_track(88.0, ROAD_Y[0] + 1.2, 0.0, 0.0, DURATION_S), [0.95, 0.78, 0.10]),
        ("42", "automobile", "NONE", _moving_track(124.0, ROAD_Y[1] - 1.2, -0.0, 0.0, DURATION_S), [0.10, 0.10, 0.12]),
    ]
    # Parked cars on the left side face -x.
    fixed = []
    for tid, label, flags, (ts, poses), color in spec:
        if tid in ("15", "42"):
            poses = [[p[0], p[1], p[2], 0.0, 0.0, 1.0, 0.0] for p in poses]
        if label == "person":
            poses = [[p[0], p[1], 0.9, 0.0, 0.0, 0.0, 1.0] for p in poses]
        fixed.append((tid, label, flags, ts, poses, color))
    return fixed


def _fp16(a):
    return np.ascontiguousarray(np.asarray(a, dtype=np.float16)).tobytes()


def _put(state, key, arr, dtype=np.float16):
    arr = np.asarray(arr, dtype=dtype)
    state[key] = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
    state[key + ".shape"] = [int(s) for s in arr.shape]


def _spec_pattern(n):
    """Specular SH (N, 45), coefficient-major, distinct per coefficient and channel, small."""
    k = np.arange(15)[:, None]
    c = np.arange(3)[None, :]
    pattern = 0.0003 * (3 * k + c + 1) * np.where(k % 2 == 0, 1.0, -1.0)
    return np.broadcast_to(pattern.reshape(1, 45), (n, 45))


def _layer_state(state, name, arrays, fourier, camera_class, rng, rigid=None):
    pts, q, log_s, logit, rgb, inten = arrays
    n = len(pts)
    pre = f".gaussians_nodes.{name}."
    _put(state, pre + "positions", pts)
    _put(state, pre + "rotations", q)
    _put(state, pre + "scales", log_s)
    _put(state, pre + "densities", logit.reshape(n, 1))
    albedo = np.zeros((n, fourier, 3))
    albedo[:, 0, :] = rgb  # radiance_sph_O0: the DC coefficient is the radiance
    _put(state, pre + "features_albedo", albedo)
    _put(state, pre + "features_specular", _spec_pattern(n))
    _put(state, pre + "n_active_features", np.array(3), np.int64)
    _put(state, pre + "extra_signal", np.zeros((n, 0)))
    cam = np.full((n, 20), -4.0)
    cam[:, camera_class] = 4.0
    _put(state, pre + "camera_extra_signal", cam)
    _put(state, pre + "lidar_extra_signal", inten.reshape(n, 1))
    if rigid is None:
        state[pre + "time_embed._extra_state"] = {
            "timestamps_us_min": T0_US,
            "timestamps_us_max": T0_US + int(DURATION_S * 1e6),
        }
    else:
        cuboid_ids, ranges, n_poses = rigid
        _put(state, pre + "gaussian_cuboid_ids", cuboid_ids, np.int32)
        _put(state, pre + "time_embed.timestamps_us_ranges", ranges, np.int64)
        dq = np.zeros((n_poses, 4))
        dq[:, 3] = 1.0
        _put(state, pre + "tracks_calib.tracks_delta_q", dq)
        _put(state, pre + "tracks_calib.tracks_delta_t", np.zeros((n_poses, 3)))


def _layer_config(fourier, time_embed):
    return {
        "name": "sh-gaussians",
        "density_activation": "sigmoid",
        "scale_activation": "exp",
        "rotation_activation": "normalize",
        "fourier_features_dim": fourier,
        "time_embed": {"name": time_embed},
        "transmittance_threshold": 0.0001,
        "particle": {
            "radiance_sph_degree": 3,
            "radiance_sph_O0": True,
            "density_kernel_degree": 2,
            "density_kernel_min_response": 0.0113,
            "density_kernel_planar": False,
            "extra_signal_dim": 0,
            "camera_extra_signal_dim": 20,
            "lidar_extra_signal_dim": 1,
        },
    }


def sky_cubemap():
    from nurec_jax import sky  # the convention lives in the package

    d = sky.texel_directions(SKY_SIZE)
    z = d[..., 2]
    horizon = np.array([0.78, 0.86, 0.95])
    zenith = np.array([0.22, 0.45, 0.85])
    ground = np.array([0.35, 0.34, 0.32])
    t = np.clip(z, 0.0, 1.0) ** 0.6
    col = (1 - t[..., None]) * horizon + t[..., None] * zenith
    col = np.where((z < 0)[..., None], ground + (horizon - ground) * np.exp(8 * z)[..., None], col)
    # A soft sun toward (+x, -y, up).
    sun = np.array([0.6, -0.3, 0.74])
    sun /= np.linalg.norm(sun)
    glow = np.clip(d @ sun, 0, 1) ** 64
    col = np.clip(col + glow[..., None] * np.array([0.9, 0.8, 0.6]), 0, 1)
    return col[None]


def build_payload(rng):
    bg, road = build_static(rng)
    w2n_t = WORLD_TO_NRE_T
    bg[0] = bg[0] + w2n_t  # static layers live in the NRE frame
    road[0] = road[0] + w2n_t

    track_list = tracks()
    # The rigid layer's own track order: deliberately not the JSON order, with '@' suffixes.
    layer_order = ["7", "3", "30", "21", "15", "12", "42"]
    colors = {t[0]: t[5] for t in track_list}
    ranges, n_poses = [], 0
    parts = []
    ids = []
    for c, tid in enumerate(layer_order):
        car = build_car(rng, np.asarray(colors[tid]))
        parts.append(car)
        ids.append(np.full(len(car[0]), c, np.int32))
        tr = next(t for t in track_list if t[0] == tid)
        ranges.append([tr[3][0], tr[3][-1]])
        n_poses += len(tr[3])
    rigid = [np.concatenate(cols) for cols in zip(*parts)]

    state = {}
    _layer_state(state, "background", bg, 5, 2, rng)
    _layer_state(state, "road", road, 1, 0, rng)
    _layer_state(
        state, "dynamic_rigids", rigid, 4, 13, rng, rigid=(np.concatenate(ids), np.asarray(ranges, np.int64), n_poses)
    )
    state["._extra_state"] = {"obj_track_ids": {"dynamic_rigids": [f"{t}@{SEQ}" for t in layer_order]}}
    _put(state, ".background.textures", sky_cubemap())
    _put(state, ".gaussians_strategy.invisible_steps.background", np.zeros(len(bg[0])), np.int32)
    config = {
        "layers": {
            "background": _layer_config(5, "holistic-remap-time-input-embedding"),
            "road": _layer_config(1, "holistic-remap-time-input-embedding"),
            "dynamic_rigids": _layer_config(4, "individual-remap-time-input-embedding"),
        },
        "background": {
            "name": "sky-env-map",
            "envmap_type": "cubemap",
            "width": SKY_SIZE,
            "height": SKY_SIZE,
            "composite_in_linear_space": False,
        },
        "renderer": {"name": "3dgut-nrend"},
        "appearance_embedding": {"name": "skip-appearance"},
    }
    doc = {"nre_data": {"version": "26.4.0", "model": "nre", "config": config, "state_dict": state}}
    counts = {"background": len(bg[0]), "road": len(road[0]), "dynamic_rigids": len(rigid[0])}
    return gzip.compress(msgpack.packb(doc, use_bin_type=True), compresslevel=9, mtime=0), counts, track_list


def rig_trajectories(track_list):
    n = int(DURATION_S * 10) + 1
    ts = [T0_US + k * FRAME_PERIOD_US for k in range(n)]
    poses = [ego_pose((t - T0_US) / 1e6).tolist() for t in ts]
    cams = camera_calibrations()
    cam_frames, cam_frame_poses = {}, {}
    for key, cal in cams.items():
        shutter = cal["camera_model"]["parameters"]["shutter_type"]
        exposure = ROLLING_READOUT_US if shutter != "GLOBAL" else 2_000
        windows = []
        for k in range(n - 1):
            end = T0_US + 50_000 + k * FRAME_PERIOD_US
            windows.append([end - exposure, end])
        cam_frames[key] = windows
        cam_frame_poses[key] = [
            [ego_pose((s - T0_US) / 1e6).tolist(), ego_pose((e - T0_US) / 1e6).tolist()] for s, e in windows[::10]
        ]
    lidars = lidar_calibrations()
    lidar_frames = {
        key: [[T0_US + k * FRAME_PERIOD_US, T0_US + (k + 1) * FRAME_PERIOD_US] for k in range(n - 1)] for key in lidars
    }
    w2n = np.eye(4)
    w2n[:3, 3] = WORLD_TO_NRE_T
    return {
        "T_world_base": t_world_base().tolist(),
        "world_to_nre": {"matrix": w2n.tolist()},
        "camera_calibrations": cams,
        "lidar_calibrations": lidars,
        "rig_trajectories": [
            {
                "sequence_id": SEQ,
                "T_rig_world_timestamps_us": ts,
                "T_rig_worlds": poses,
                "cameras_frame_timestamps_us": cam_frames,
                "cameras_frame_T_rig_worlds": {},
                "lidars_frame_timestamps_us": lidar_frames,
                "rig_bbox": {"centroid": [1.35, 0.0, 0.78], "dim": [4.85, 1.92, 1.56], "rot": [0.0, 0.0, 0.0]},
            }
        ],
    }


def t_world_base():
    """World (ENU at the first rig pose) -> ECEF, at a plausible Bay Area location."""
    lat, lon, h = math.radians(37.3706), math.radians(-121.9672), 20.0
    a, e2 = 6378137.0, 6.69437999014e-3
    nrad = a / math.sqrt(1 - e2 * math.sin(lat) ** 2)
    p = [
        (nrad + h) * math.cos(lat) * math.cos(lon),
        (nrad + h) * math.cos(lat) * math.sin(lon),
        (nrad * (1 - e2) + h) * math.sin(lat),
    ]
    east = [-math.sin(lon), math.cos(lon), 0.0]
    north = [-math.sin(lat) * math.cos(lon), -math.sin(lat) * math.sin(lon), math.cos(lat)]
    up = [math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon), math.sin(lat)]
    m = np.eye(4)
    m[:3, :3] = np.array([east, north, up]).T
    m[:3, 3] = p
    return m


def sequence_tracks(track_list):
    return {
        SEQ: {
            "tracks_data": {
                "tracks_id": [t[0] for t in track_list],
                "tracks_label_class": [t[1] for t in track_list],
                "tracks_flags": [t[2] for t in track_list],
                "tracks_timestamps_us": [t[3] for t in track_list],
                "tracks_poses": [[[round(v, 6) for v in p] for p in t[4]] for t in track_list],
            },
            "cuboidtracks_data": {
                "cuboids_dims": [[0.6, 0.6, 1.8] if t[1] == "person" else CAR_DIMS.tolist() for t in track_list],
            },
        }
    }


def metadata_yaml():
    return {
        "scene_id": SEQ,
        "version_string": "nre-26.4.0-nurec-jax-sample",
        "training_date": "2026-11-26",
        "dataset_hash": "sample-street-synthetic",
        "uuid": "5a3f2c1e-9d4b-4e8a-b7c6-1f2e3d4c5b6a",
        "is_resumable": False,
        "sensors": {"camera_ids": [k.split("@")[0] for k in camera_calibrations()], "lidar_ids": ["lidar_top_360fov"]},
        "logger": {},
        "time_range": {"start": T0_US, "end": T0_US + int(DURATION_S * 1e6)},
        "training_step_outputs": {"psnr": 99.0},
    }


# ---------------------------------------------------------------------------------------------
# USD layers (usd-core)


def _layer_text(layer):
    return layer.ExportToString().encode("utf-8")


def volume_usda():
    from pxr import Gf, Sdf, Usd, UsdGeom, UsdVol

    layer = Sdf.Layer.CreateAnonymous("volume.usda")
    stage = Usd.Stage.Open(layer)
    UsdGeom.SetStageMetersPerUnit(stage, 1.0)
    UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.z)
    world = UsdGeom.Xform.Define(stage, "/World")
    stage.SetDefaultPrim(world.GetPrim())
    vol = UsdVol.Volume.Define(stage, "/World/volume")
    p = vol.GetPrim()
    p.CreateAttribute("omni:nurec:isNuRecVolume", Sdf.ValueTypeNames.Bool).Set(True)
    p.CreateAttribute("omni:nurec:useProxyTransform", Sdf.ValueTypeNames.Bool).Set(False)
    p.CreateAttribute("omni:nurec:offset", Sdf.ValueTypeNames.Float3).Set(Gf.Vec3f(*(-WORLD_TO_NRE_T)))
    inf = float("inf")
    p.CreateAttribute("omni:nurec:crop:minBounds", Sdf.ValueTypeNames.Float3).Set(Gf.Vec3f(-inf, -inf, -inf))
    p.CreateAttribute("omni:nurec:crop:maxBounds", Sdf.ValueTypeNames.Float3).Set(Gf.Vec3f(inf, inf, inf))
    for rel, name, role, dtype in (
        ("density", "density_field", "density", "float"),
        ("emissiveColor", "emissive_color_field", "emissiveColor", "float3"),
    ):
        f = stage.DefinePrim(f"/World/volume/{name}", "OmniNuRecFieldAsset")
        f.CreateAttribute("filePath", Sdf.ValueTypeNames.Asset).Set(Sdf.AssetPath("./volume.nurec"))
        f.CreateAttribute("fieldName", Sdf.ValueTypeNames.Token).Set(role)
        f.CreateAttribute("fieldDataType", Sdf.ValueTypeNames.Token).Set(dtype)
        f.CreateAttribute("fieldRole", Sdf.ValueTypeNames.Token).Set(role)
        if rel == "emissiveColor":
            for c, row in zip("RGB", ((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0))):
                f.CreateAttribute(f"omni:nurec:ccm{c}", Sdf.ValueTypeNames.Float4).Set(Gf.Vec4f(*row))
        vol.CreateFieldRelationship(rel, f.GetPath())
    return _layer_text(layer)


def rig_trajectories_usda(rig):
    from pxr import Gf, Sdf, Usd, UsdGeom

    layer = Sdf.Layer.CreateAnonymous("rig_trajectories.usda")
    stage = Usd.Stage.Open(layer)
    UsdGeom.SetStageMetersPerUnit(stage, 1.0)
    UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.z)
    world = UsdGeom.Xform.Define(stage, "/World")
    stage.SetDefaultPrim(world.GetPrim())
    traj = rig["rig_trajectories"][0]
    layer.customLayerData = {"absoluteTimeOffsetMicroSec": T0_US}
    fps = 24.0
    rig_x = UsdGeom.Xform.Define(stage, "/World/sensor_rig_0")
    op = rig_x.AddTransformOp()
    for t, m in zip(traj["T_rig_world_timestamps_us"], traj["T_rig_worlds"]):
        op.Set(Gf.Matrix4d(np.asarray(m).T.tolist()), fps * 1e-6 * (t - T0_US))
    flip = np.diag([1.0, -1.0, -1.0, 1.0])  # OpenCV -> USD camera axes
    for key, cal in rig["camera_calibrations"].items():
        params = cal["camera_model"]["parameters"]
        cam = UsdGeom.Camera.Define(stage, f"/World/sensor_rig_0/{cal['logical_sensor_name']}")
        cam.AddTransformOp().Set(Gf.Matrix4d((np.asarray(cal["T_sensor_rig"]) @ flip).T.tolist()))
        p = cam.GetPrim()
        if cal["camera_model"]["type"] == "ftheta":
            p.CreateAttribute("cameraProjectionType", Sdf.ValueTypeNames.Token).Set("fisheyePolynomial")
            p.CreateAttribute("fthetaWidth", Sdf.ValueTypeNames.Float).Set(params["resolution"][0])
            p.CreateAttribute("fthetaHeight", Sdf.ValueTypeNames.Float).Set(params["resolution"][1])
            p.CreateAttribute("fthetaCx", Sdf.ValueTypeNames.Float).Set(params["principal_point"][0])
            p.CreateAttribute("fthetaCy", Sdf.ValueTypeNames.Float).Set(params["principal_point"][1])
            for letter, c in zip("ABCDEF", params["pixeldist_to_angle_poly"]):
                p.CreateAttribute(f"ftheta{letter}", Sdf.ValueTypeNames.Float).Set(c)
            p.CreateAttribute("fthetaMaxFov", Sdf.ValueTypeNames.Float).Set(math.degrees(2 * params["max_angle"]))
    return _layer_text(layer)


def default_usda(stems):
    from pxr import Sdf

    layer = Sdf.Layer.CreateAnonymous("default.usda")
    layer.defaultPrim = "World"
    root = Sdf.PrimSpec(layer, "World", Sdf.SpecifierDef, "Xform")
    layer.pseudoRoot.SetInfo("metersPerUnit", 1.0)
    layer.pseudoRoot.SetInfo("upAxis", "Z")
    for stem in stems:
        over = Sdf.PrimSpec(root, stem, Sdf.SpecifierOver)
        over.referenceList.Prepend(Sdf.Reference(f"./{stem}.usda"))
    return _layer_text(layer)


# ---------------------------------------------------------------------------------------------
# Zip


def write_zip(path, members, pad64=False):
    """ZIP_STORED members with fixed dates; optionally 64-byte aligned data (USDZ spec padding)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            if pad64:
                header = 30 + len(name.encode())
                offset = buf.tell() + header
                pad = (-offset) % 64
                if pad and pad < 4:
                    pad += 64
                if pad:
                    info.extra = struct.pack("<HH", 0x1986, pad - 4) + b"\0" * (pad - 4)
            z.writestr(info, data)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def build_members(seed: int = 20261126):
    rng = np.random.default_rng(seed)
    payload, counts, track_list = build_payload(rng)
    rig = rig_trajectories(track_list)
    members = [
        ("default.usda", default_usda(["volume", "rig_trajectories"])),
        ("volume.usda", volume_usda()),
        ("volume.nurec", payload),
        ("metadata.yaml", yaml.safe_dump(metadata_yaml(), sort_keys=False).encode()),
        ("rig_trajectories.json", json.dumps(rig).encode()),
        ("sequence_tracks.json", json.dumps(sequence_tracks(track_list)).encode()),
        ("rig_trajectories.usda", rig_trajectories_usda(rig)),
        (
            "data_info.json",
            json.dumps(
                {
                    "sequence_id": SEQ,
                    "pose-range": {
                        "start-timestamp_us": T0_US,
                        "end-timestamp_us": T0_US + int(DURATION_S * 1e6),
                        "num-poses": int(DURATION_S * 10) + 1,
                    },
                }
            ).encode(),
        ),
    ]
    members += asset_members(seed)
    return members, counts


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--pad64", action="store_true", help="align member data to 64 bytes")
    parser.add_argument("--seed", type=int, default=20261126)
    args = parser.parse_args(argv)
    members, counts = build_members(args.seed)
    write_zip(args.output, members, pad64=args.pad64)
    total = sum(counts.values())
    print(f"wrote {args.output}: {total} Gaussians {counts}")


if __name__ == "__main__":
    main()
