"""One server serves every NuRec artifact layout of `tools/make_artifact_variants.py` (built from a
thin copy of the sample), renders each as the library does, and reports
what each load approximated in get_server_config."""

from __future__ import annotations

import os

import numpy as np
import pytest
from grpc_helpers import connect, decode, rgb_request

from nurec_jax import cameras
from nurec_jax import renderer as RR
from nurec_jax import scene as S
from nurec_jax._proto import common_pb2
from nurec_jax.server.app import create_server
from nurec_jax.server.options import ServerOptions
from tools import make_artifact_variants as variants
from tools import make_sample_scene as sample
from tools.thin_scene import write_thin_scene

pytestmark = pytest.mark.xdist_group("grpc")

CAM = "camera_front_wide_120fov"
FRAME = 30


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("served_variants")
    thin = write_thin_scene(d / "thin.usdz.base", keep_every=25, scene_id=sample.SEQ)
    return variants.write_variants(str(d / "out"), base=variants.Base(thin))


def _render(path, renderer):
    sc = S.load_scene(path)
    meta = sc.metadata
    cal = meta.cameras[CAM]
    s, e = (int(t) for t in cal.frame_timestamps_us[FRAME])
    cam = cameras.camera_at_resolution(cameras.camera_from_intrinsics(cal.intrinsics), 0, 36)
    out = renderer.render(
        sc.gaussians,
        cam,
        RR.rig_camera_poses(meta, CAM, s, e),
        RR.track_actor_poses(meta, sc.gaussians.track_ids, s, e),
        isp=RR.isp_index(meta, CAM, e, per_frame=sc.report.ppisp_per_frame),
    )
    return np.asarray(out.rgb)


def test_one_server_serves_every_variant(paths):
    renderer = RR.Renderer()
    folder = os.path.dirname(paths["checkpoint-only"])
    opts = ServerOptions(artifact_glob=os.path.join(folder, "*.usdz"), port=0, max_workers=1)
    srv, port = create_server("127.0.0.1:0", opts, renderer=renderer)
    try:
        assert srv.serving.wait(60)
        channel, stub = connect(port)
        ids = {S.read_scene_metadata(p).scene_id: name for name, p in paths.items()}
        assert len(ids) == len(paths)
        assert set(stub.get_available_scenes(common_pb2.Empty()).scene_ids) == set(ids)
        for sid, name in ids.items():
            img = decode(stub.render_rgb(rgb_request(paths[name], sid, frame=FRAME)).image_bytes)
            ref = _render(paths[name], renderer)
            assert img.shape == ref.shape
            assert np.abs(img.astype(float) - np.round(np.clip(ref, 0, 1) * 255)).max() <= 1.0, name
        cfg = stub.get_server_config(common_pb2.Empty()).server_config
        sid_def = next(s for s, n in ids.items() if n == "nurec-26.04")
        assert "deformation network is not evaluated" in cfg[f"scenes.{sid_def}.approximated"]
        assert cfg[f"scenes.{sid_def}.post_processing"].startswith("PPISP")
        sid_ck = next(s for s, n in ids.items() if n == "checkpoint-only")
        assert cfg[f"scenes.{sid_ck}.sources"] == "checkpoint.ckpt"
        channel.close()
    finally:
        srv.stop(1)
