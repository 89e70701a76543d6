"""Scenes in the layouts NuRec releases write (`tools/make_artifact_variants.py`, built from a thin
copy of the sample): each loads, renders and says what it read, approximated or skipped; a
checkpoint-only artifact renders what its `.nurec` twin renders; a hostile checkpoint is refused."""

from __future__ import annotations

import io
import os
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

from nurec_jax import cameras, ppisp
from nurec_jax import renderer as RR
from nurec_jax import scene as S
from nurec_jax.errors import SceneFormatError
from nurec_jax.torch_checkpoint import UnsafeCheckpointError
from tools import make_artifact_variants as variants
from tools import make_sample_scene as sample
from tools import torch_zip
from tools.thin_scene import write_thin_scene

CAM = "camera_front_wide_120fov"
FRAME = 30


@pytest.fixture(scope="module")
def thin(tmp_path_factory):
    d = tmp_path_factory.mktemp("variants")
    return write_thin_scene(d / "thin.usdz", keep_every=25, scene_id=sample.SEQ)


@pytest.fixture(scope="module")
def paths(thin, tmp_path_factory):
    d = tmp_path_factory.mktemp("variants_out")
    return variants.write_variants(str(d), base=variants.Base(thin))


@pytest.fixture(scope="module")
def renderer():
    return RR.Renderer()


def _render(path, renderer, isp=None):
    sc = S.load_scene(path)
    meta = sc.metadata
    cal = meta.cameras[CAM]
    s, e = (int(t) for t in cal.frame_timestamps_us[FRAME])
    cam = cameras.camera_at_resolution(cameras.camera_from_intrinsics(cal.intrinsics), 64, 0)
    pose = RR.rig_camera_poses(meta, CAM, s, e)
    actors = RR.track_actor_poses(meta, sc.gaussians.track_ids, s, e)
    if isp is None:
        isp = RR.isp_index(meta, CAM, e, per_frame=sc.report.ppisp_per_frame)
    out = renderer.render(sc.gaussians, cam, pose, actors, isp=isp)
    return sc, np.asarray(out.rgb)


def _psnr(a, b):
    return 10 * np.log10(1.0 / max(float(np.mean((a - b) ** 2)), 1e-20))


def test_checkpoint_only_renders_what_its_payload_twin_renders(paths, thin, renderer):
    sc, img = _render(paths["checkpoint-only"], renderer)
    _, ref = _render(thin, renderer)
    assert sc.report.sources == ("checkpoint.ckpt",)
    assert "volume.nurec" not in sc.metadata.members and "metadata.yaml" not in sc.metadata.members
    assert sc.scene_id == sample.SEQ  # from data_info.json
    np.testing.assert_allclose(img, ref, atol=1e-6)  # fp16 payload values are exact in fp32
    assert img.std() > 0.05  # not a blank frame


def test_older_payload_flavour_renders_the_same_scene(paths, thin, renderer):
    sc, img = _render(paths["nurec-25.07"], renderer)
    _, ref = _render(thin, renderer)
    assert {l.colour_convention for l in sc.report.layers} == {"3dgs"}
    assert _psnr(img, ref) > 45  # the DC term re-quantised to float16 in the other convention


def test_n_active_features_in_extra_state_sets_the_sh_degree(paths, thin, renderer):
    sc, img = _render(paths["nurec-26.4.111"], renderer)
    assert {l.sh_degree for l in sc.report.layers} == {1}  # stored width says 3, the file says 1
    assert sc.gaussians.static.sh.shape[1] == 4
    _, ref = _render(thin, renderer)
    assert _psnr(img, ref) > 30  # only the small higher-order terms are gone


def test_deformables_are_rigid_and_reported_and_ppisp_is_applied(paths, thin, renderer):
    sc, img = _render(paths["nurec-26.04"], renderer)
    layers = {l.name: l for l in sc.report.layers}
    assert layers["dynamic_deformables"].rigid
    assert "deformation network is not evaluated" in layers["dynamic_deformables"].approximation
    assert set(sc.gaussians.track_ids) >= set(variants.DEFORMABLE_TRACKS)
    assert "PPISP" in sc.report.post_processing and not sc.report.ppisp_per_frame
    text = S.describe(sc)
    assert "approximated: layer 'dynamic_deformables'" in text and "post-processing: PPISP" in text
    assert "lidar_front_90fov" in text and "no lidar model" in text
    # Geometry is the thin scene's; colours are its render through the camera's PPISP curves.
    cal = sc.metadata.cameras[CAM]
    isp = RR.isp_index(sc.metadata, CAM, int(cal.frame_timestamps_us[FRAME][1]))
    assert int(isp.camera) == cal.unique_sensor_idx and int(isp.frame) == -1
    _, linear = _render(thin, renderer)
    expected = ppisp.apply(sc.gaussians.ppisp, jnp.asarray(linear), isp.camera, isp.frame)
    np.testing.assert_allclose(img, np.asarray(expected), atol=2e-5)
    assert np.abs(img - linear).max() > 0.05  # PPISP did change the image
    # An unknown camera gets no camera curve: the display gamma.
    _, plain = _render(paths["nurec-26.04"], renderer, isp=ppisp.IspIndex.of())
    np.testing.assert_allclose(plain, np.clip(linear, 0, 1) ** (1 / 2.2), atol=2e-5)


def test_two_trajectories_keep_every_camera(paths):
    meta = S.read_scene_metadata(paths["two-trajectories"])
    assert [t.sequence_id for t in meta.trajectories] == [sample.SEQ, variants.SEQ2]
    second = meta.camera(CAM, 1)
    assert second.trajectory_idx == 1 and len(second.frame_timestamps_us) == 60
    assert len(meta.camera(CAM, 0).frame_timestamps_us) == 120
    assert second.frame_T_rig_world is not None and second.frame_T_rig_world.shape == (60, 2, 4, 4)
    assert "103" in meta.tracks and "3" in meta.tracks


def test_every_variant_loads_renders_and_describes_itself(paths, renderer):
    for name, path in paths.items():
        sc, img = _render(path, renderer)
        assert np.isfinite(img).all() and img.std() > 0.03, name
        text = S.describe(sc)
        assert "Gaussians in" in text and "ego trajectory" in text, name


def _with_checkpoint(tmp_path, base_path, payload: bytes) -> str:
    with zipfile.ZipFile(base_path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    members["checkpoint.ckpt"] = payload
    out = tmp_path / "hostile.usdz"
    sample.write_zip(out, list(members.items()))
    return str(out)


def test_a_hostile_checkpoint_is_refused_without_running(paths, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    pkl = pickle.dumps({"state_dict": {"model.x": Evil()}}, protocol=2)
    buf = io.BytesIO()
    torch_zip.write_archive(buf, pkl, {})
    path = _with_checkpoint(tmp_path, paths["checkpoint-only"], buf.getvalue())
    with pytest.raises(UnsafeCheckpointError, match="system"):
        S.load_host_scene(path)
    assert not marker.exists()


def test_malformed_checkpoint_artifacts_name_what_is_wrong(paths, tmp_path):
    path = _with_checkpoint(tmp_path, paths["checkpoint-only"], b"not a zip at all")
    with pytest.raises(SceneFormatError, match="checkpoint.ckpt"):
        S.load_host_scene(path)
    with zipfile.ZipFile(paths["checkpoint-only"]) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    members["parsed_config.yaml"] = members["parsed_config.yaml"].replace(
        b"radiance_sph_degree: 3", b"radiance_sph_degree: three", 1
    )
    bad = tmp_path / "badcfg.usdz"
    sample.write_zip(bad, list(members.items()))
    with pytest.raises(
        SceneFormatError,
        match=r"parsed_config.yaml: model\.layers\.background\.particle\."
        r"radiance_sph_degree: expected an integer, got 'three'",
    ):
        S.load_host_scene(str(bad))
