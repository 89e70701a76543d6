"""Synthetic NuRec artifacts in the layouts real NuRec releases write, derived from the sample scene.

Each variant keeps the sample's Gaussians (so renders can be compared with the sample's) and
changes what a given NuRec release changes in the file:

- `nurec-25.07`: the older payload flavour: 3DGS colour convention (no `radiance_sph_O0`),
  densities stored [N], `n_active_features` as a per-layer tensor, tracks under `dummy_chunk_id`.
- `nurec-26.04`: a `dynamic_deformables` layer (two of the cars, with a deformation-network
  tensor), PPISP post-processing tensors and config, 26.04 calibration fields
  (`unique_sensor_idx`, `cameras_linear_start_frame_indices`, a null external distortion),
  `mesh_ground.usd` and `mesh_ground.ply`, `pose_record.json`, and a second lidar whose
  `lidar_model` is null.
- `nurec-26.4.111`: `n_active_features` in each layer's `_extra_state` (set to 1 while the
  stored width is degree 3).
- `two-trajectories`: two sequences in `rig_trajectories.json`, the same logical cameras keyed
  `<logical>@<sequence>` for each, recorded per-camera poses (`cameras_frame_T_rig_worlds`) for the
  second, two sequences in `sequence_tracks.json`.
- `checkpoint-only`: what NuRec training writes by default: no `volume.nurec` and no USD layers,
  the model as a PyTorch Lightning `checkpoint.ckpt` (float32, `model.`-prefixed keys) with
  `parsed_config.yaml`, `datasource_summary.json`, `data_info.json` (the scene id; no
  `metadata.yaml`).

    python tools/make_artifact_variants.py --output-dir out/variants [--variants nurec-26.04,...]

Variants that keep `metadata.yaml` get the scene id `<sample id>-<variant>`, so one server can
serve them all; `checkpoint-only` takes its id from `data_info.json`. Deterministic: the same
sample gives the same files.
"""

from __future__ import annotations

import argparse
import collections
import copy
import gzip
import io
import json
import os
import zipfile

import msgpack
import numpy as np
import yaml

from nurec_jax import data, sh
from nurec_jax.payload import decode_tensor

if __package__:  # imported as `tools.make_artifact_variants` (the tests)
    from tools import make_sample_scene as sample
    from tools import torch_zip
else:  # run as `python tools/make_artifact_variants.py`: tools/ is sys.path[0]
    import make_sample_scene as sample
    import torch_zip

SEQ2 = "clipgt-sample-street-0002"
SEQ2_OFFSET_US = 30_000_000  # the second drive starts 30 s after the first
DEFORMABLE_TRACKS = ("21", "15")  # moved from dynamic_rigids into dynamic_deformables
PPISP_CAMERAS = 4


class Base:
    """The sample scene's members, with its payload decoded into a mutable state dict."""

    def __init__(self, path: str | None = None):
        with zipfile.ZipFile(path or data.sample_scene_path()) as z:
            self.members = {i.filename: z.read(i) for i in z.infolist()}
        doc = msgpack.unpackb(gzip.decompress(self.members["volume.nurec"]), raw=False, strict_map_key=False)
        self.nre = doc["nre_data"]

    def copy(self):
        return copy.deepcopy(self.members), copy.deepcopy(self.nre)


def _put(state, key, arr, dtype=np.float16):
    arr = np.asarray(arr, dtype=dtype)
    state[key] = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
    state[key + ".shape"] = [int(s) for s in arr.shape]


def _get(state, key):
    return decode_tensor(state, key, "sample")


def _payload(nre) -> bytes:
    return gzip.compress(msgpack.packb({"nre_data": nre}, use_bin_type=True), compresslevel=1, mtime=0)


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _write(path, members: dict[str, bytes]) -> None:
    sample.write_zip(path, list(members.items()))


# --------------------------------------------------------------------------------------------


def nurec_25_07(base: Base) -> dict[str, bytes]:
    members, nre = base.copy()
    state, config = nre["state_dict"], nre["config"]
    nre["version"] = "25.7.3"
    for name, cfg in config["layers"].items():
        pre = f".gaussians_nodes.{name}."
        cfg["particle"]["radiance_sph_O0"] = False
        albedo = _get(state, pre + "features_albedo").astype(np.float64)
        albedo[:, 0, :] = (albedo[:, 0, :] - 0.5) / sh.C0  # the same colour in the 3DGS convention
        _put(state, pre + "features_albedo", albedo)
        dens = _get(state, pre + "densities")
        _put(state, pre + "densities", dens.reshape(-1))
    tracks = json.loads(members["sequence_tracks.json"])
    members["sequence_tracks.json"] = _json({"dummy_chunk_id": next(iter(tracks.values()))})
    members["volume.nurec"] = _payload(nre)
    return members


def _ground_mesh_usda() -> bytes:
    return b"""#usda 1.0
(
    defaultPrim = "World"
    metersPerUnit = 1
    upAxis = "Z"
)

def Xform "World"
{
    def Mesh "mesh_ground"
    {
        int[] faceVertexCounts = [4]
        int[] faceVertexIndices = [0, 1, 2, 3]
        point3f[] points = [(-40, -4.25, 0), (185, -4.25, 0), (185, 7.75, 0), (-40, 7.75, 0)]
    }
}
"""


def _ground_mesh_ply() -> bytes:
    header = (
        b"ply\nformat ascii 1.0\nelement vertex 4\nproperty float x\nproperty float y\nproperty float z\n"
        b"element face 1\nproperty list uchar int vertex_indices\nend_header\n"
    )
    return header + b"-40 -4.25 0\n185 -4.25 0\n185 7.75 0\n-40 7.75 0\n4 0 1 2 3\n"


def ppisp_tensors(n_frames: int) -> dict[str, np.ndarray]:
    """A plausible PPISP state: mild per-camera vignetting and response curves, no per-frame change."""
    vig = np.zeros((PPISP_CAMERAS, 3, 5))
    vig[:, :, :2] = 0.5
    vig[:, :, 2] = -0.35  # alpha1: darker corners
    crf = np.zeros((PPISP_CAMERAS, 3, 7))
    crf[:] = [-1.5, 0.0, 0.5, -2.0, 0.0, 0.0, 0.8]
    crf[:, 0, 6] = 0.9  # a slightly different gamma for red
    color = np.zeros((n_frames, 8))
    color[:, [0, 4]] = 1.0  # identity homography (H[2,2] = 1 is implied)
    return {"exposure_params": np.zeros(n_frames), "vignetting_params": vig, "color_params": color, "crf_params": crf}


def nurec_26_04(base: Base) -> dict[str, bytes]:
    members, nre = base.copy()
    state, config = nre["state_dict"], nre["config"]
    nre["version"] = "26.4.96"
    # Split two cars off the rigid layer into a deformable layer with its own track list.
    pre = ".gaussians_nodes.dynamic_rigids."
    ids = state["._extra_state"]["obj_track_ids"]["dynamic_rigids"]
    clean = [t.split("@")[0] for t in ids]
    cub = _get(state, pre + "gaussian_cuboid_ids")
    deform_local = [clean.index(t) for t in DEFORMABLE_TRACKS]
    is_def = np.isin(cub, deform_local)
    keep_ids = [t for t in ids if t.split("@")[0] not in DEFORMABLE_TRACKS]
    def_ids = [ids[i] for i in deform_local]
    keys = [
        k[len(pre) :] for k in state if k.startswith(pre) and not k.endswith(".shape") and isinstance(state[k], bytes)
    ]
    dpre = ".gaussians_nodes.dynamic_deformables."
    n = cub.shape[0]
    for k in keys:
        arr = _get(state, pre + k)
        if arr.ndim == 0 or arr.shape[0] != n:
            if k == "n_active_features":
                _put(state, dpre + k, arr, np.int64)
            continue
        dtype = arr.dtype
        if k == "gaussian_cuboid_ids":
            rigid_map = {clean.index(t.split("@")[0]): i for i, t in enumerate(keep_ids)}
            def_map = {c: i for i, c in enumerate(deform_local)}
            _put(state, dpre + k, [def_map[c] for c in arr[is_def]], np.int32)
            _put(state, pre + k, [rigid_map[c] for c in arr[~is_def]], np.int32)
            continue
        _put(state, dpre + k, arr[is_def], dtype)
        _put(state, pre + k, arr[~is_def], dtype)
    _put(state, dpre + "aabb_extent", np.tile(sample.CAR_DIMS * 1.1, (len(def_ids), 1)))
    _put(state, dpre + "deform_network.feature_volume.encoding.tcnn_module.params", np.linspace(-0.1, 0.1, 256))
    state[dpre + "deform_network.feature_volume.encoding._extra_state"] = {"n_input_dims": 4, "n_levels": 8}
    state["._extra_state"]["obj_track_ids"] = {"dynamic_rigids": keep_ids, "dynamic_deformables": def_ids}
    config["layers"]["dynamic_deformables"] = dict(config["layers"]["dynamic_rigids"], name="deformable-gaussians")
    # PPISP post-processing (per-camera terms only, as NuRec's car2sim config sets it).
    rig = json.loads(members["rig_trajectories.json"])
    n_frames = sum(len(w) for w in rig["rig_trajectories"][0]["cameras_frame_timestamps_us"].values())
    for k, v in ppisp_tensors(n_frames).items():
        _put(state, f".post_processings.0.ppisp.{k}", v, np.float32 if k == "crf_params" else np.float16)
    config["post_processing"] = {
        "b": {"name": "ppisp-post-processing", "use_slang": True, "per_frame_ppisp_enabled": False}
    }
    # 26.04 calibration fields.
    start = 0
    traj = rig["rig_trajectories"][0]
    traj["cameras_linear_start_frame_indices"] = {}
    for idx, (key, cal) in enumerate(rig["camera_calibrations"].items()):
        cal["sequence_id"] = sample.SEQ
        cal["unique_sensor_idx"] = idx
        cal["camera_model"]["parameters"]["external_distortion_parameters"] = None
        traj["cameras_linear_start_frame_indices"][key] = start
        start += len(traj["cameras_frame_timestamps_us"][key])
    rig["lidar_calibrations"][f"lidar_front_90fov@{sample.SEQ}"] = {
        "logical_sensor_name": "lidar_front_90fov",
        "sequence_id": sample.SEQ,
        "unique_sensor_idx": 9,
        "T_sensor_rig": np.eye(4).tolist(),
        "lidar_model": None,
    }
    members["rig_trajectories.json"] = _json(rig)
    members["volume.nurec"] = _payload(nre)
    members["mesh_ground.usd"] = _ground_mesh_usda()
    members["mesh_ground.ply"] = _ground_mesh_ply()
    members["pose_record.json"] = _json(
        {"alignment_origin": {"latitude": 37.3706, "longitude": -121.9672, "altitude": 20.0}}
    )
    return members


def nurec_26_4_111(base: Base) -> dict[str, bytes]:
    members, nre = base.copy()
    state = nre["state_dict"]
    nre["version"] = "26.4.111"
    for name in nre["config"]["layers"]:
        pre = f".gaussians_nodes.{name}."
        state.pop(pre + "n_active_features", None)
        state.pop(pre + "n_active_features.shape", None)
        state[pre + "_extra_state"] = {"n_active_features": 1}
    members["volume.nurec"] = _payload(nre)
    return members


def _shifted(m, dx: float):
    m = np.asarray(m, np.float64).copy()
    m[0, 3] += dx
    return m.tolist()


def two_trajectories(base: Base) -> dict[str, bytes]:
    members, _ = base.copy()
    rig = json.loads(members["rig_trajectories.json"])
    t1 = rig["rig_trajectories"][0]
    # The second drive: the same street 30 s later, starting 20 m further along.
    t2 = {
        "sequence_id": SEQ2,
        "T_rig_world_timestamps_us": [t + SEQ2_OFFSET_US for t in t1["T_rig_world_timestamps_us"]],
        "T_rig_worlds": [_shifted(m, 20.0) for m in t1["T_rig_worlds"]],
        "cameras_frame_timestamps_us": {},
        "cameras_frame_T_rig_worlds": {},
        "lidars_frame_timestamps_us": {},
        "rig_bbox": t1.get("rig_bbox"),
    }
    cams2 = {}
    for key, cal in rig["camera_calibrations"].items():
        logical = key.split("@")[0]
        cal["sequence_id"] = sample.SEQ
        key2 = f"{logical}@{SEQ2}"
        cams2[key2] = dict(copy.deepcopy(cal), sequence_id=SEQ2)
        windows = [[s + SEQ2_OFFSET_US, e + SEQ2_OFFSET_US] for s, e in t1["cameras_frame_timestamps_us"][key][:60]]
        t2["cameras_frame_timestamps_us"][key2] = windows
        # Recorded poses: the trajectory's pose plus a 5 cm lateral offset (so a test can tell them apart).
        ts = np.asarray(t2["T_rig_world_timestamps_us"])
        mats = np.asarray(t2["T_rig_worlds"])
        recorded = []
        for s, e in windows:
            pair = []
            for t in (s, e):
                i = int(np.clip(np.searchsorted(ts, t), 1, len(ts) - 1))
                w = (t - ts[i - 1]) / (ts[i] - ts[i - 1])
                m = mats[i - 1].copy()
                m[:3, 3] = (1 - w) * mats[i - 1][:3, 3] + w * mats[i][:3, 3]
                m[1, 3] += 0.05
                pair.append(m.tolist())
            recorded.append(pair)
        t2["cameras_frame_T_rig_worlds"][key2] = recorded
    for key, cal in list(rig["lidar_calibrations"].items()):
        cal["sequence_id"] = sample.SEQ
    rig["camera_calibrations"].update(cams2)
    rig["rig_trajectories"].append(t2)
    members["rig_trajectories.json"] = _json(rig)
    tracks = json.loads(members["sequence_tracks.json"])
    ((seq1, doc1),) = tracks.items()
    td = doc1["tracks_data"]
    i = td["tracks_id"].index("3")  # a parked car, seen again in the second drive as track 103
    seq2 = {
        "tracks_data": {
            "tracks_id": ["103"],
            "tracks_label_class": [td["tracks_label_class"][i]],
            "tracks_flags": [td["tracks_flags"][i]],
            "tracks_timestamps_us": [[t + SEQ2_OFFSET_US for t in td["tracks_timestamps_us"][i]]],
            "tracks_poses": [td["tracks_poses"][i]],
        },
        "cuboidtracks_data": {"cuboids_dims": [doc1["cuboidtracks_data"]["cuboids_dims"][i]]},
    }
    members["sequence_tracks.json"] = _json({seq1: doc1, SEQ2: seq2})
    return members


def checkpoint_state(nre) -> collections.OrderedDict:
    """The payload's state dict as a Lightning checkpoint holds it: float32 tensors, `model.` keys."""
    state = nre["state_dict"]
    out = collections.OrderedDict()
    for key, value in state.items():
        if key.endswith(".shape"):
            continue
        if isinstance(value, (bytes, bytearray)):
            arr = _get(state, key)
            out["model" + key] = arr.astype(np.float32) if arr.dtype == np.float16 else arr
        else:
            out["model" + key] = value
    return out


def checkpoint_only(base: Base) -> dict[str, bytes]:
    members, nre = base.copy()
    ckpt = io.BytesIO()
    torch_zip.write_checkpoint(
        ckpt,
        {
            "epoch": 29,
            "global_step": 30000,
            "pytorch-lightning_version": "2.5.1",
            "state_dict": checkpoint_state(nre),
            "load_in_place": False,
        },
    )
    parsed = {
        "version": nre["version"],
        "model": nre["config"],
        "dataset": {"path": "/data/ncore/clipgt-sample-street-0001.json"},
        "checkpoint": {"artifact": {"nrend": {"enabled": False}, "checkpoint": {"fp16": False}}},
    }
    rig = json.loads(members["rig_trajectories.json"])
    keep = ("rig_trajectories.json", "sequence_tracks.json", "data_info.json")
    out = {k: members[k] for k in keep}
    out["checkpoint.ckpt"] = ckpt.getvalue()
    out["parsed_config.yaml"] = yaml.safe_dump(parsed, sort_keys=False).encode()
    out["datasource_summary.json"] = _json({"rig_trajectories": {"world_to_nre": rig["world_to_nre"]}})
    return out


VARIANTS = {
    "nurec-25.07": nurec_25_07,
    "nurec-26.04": nurec_26_04,
    "nurec-26.4.111": nurec_26_4_111,
    "two-trajectories": two_trajectories,
    "checkpoint-only": checkpoint_only,
}


def write_variants(output_dir: str, names=None, base: Base | None = None) -> dict[str, str]:
    """Writes the named variants (all by default) as `<output_dir>/<name>.usdz`; returns name -> path."""
    base = base or Base()
    os.makedirs(output_dir, exist_ok=True)
    paths = {}
    for name in names or VARIANTS:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        path = os.path.join(output_dir, f"{name}.usdz")
        members = VARIANTS[name](base)
        if "metadata.yaml" in members:  # distinct scene ids, so one server can serve them all
            meta = yaml.safe_load(members["metadata.yaml"])
            meta["scene_id"] = f"{meta['scene_id']}-{name}"
            members["metadata.yaml"] = yaml.safe_dump(meta, sort_keys=False).encode()
        _write(path, members)
        paths[name] = path
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", "--output_dir", required=True)
    parser.add_argument("--variants", default="", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v] or None
    for name, path in write_variants(args.output_dir, names).items():
        print(f"{name:<18} {path}  {os.path.getsize(path) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
