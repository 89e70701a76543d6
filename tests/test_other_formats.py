"""Scenes from other tools: the standard 3DGS .ply and OpenUSD ParticleField3DGaussianSplat."""

import numpy as np
import pytest

import nurec_jax
from nurec_jax import SceneFormatError, geometry, ply, sh


def _random_gaussians(n, degree, seed=0):
    rng = np.random.default_rng(seed)
    return dict(
        means=rng.uniform(-3, 3, (n, 3)),
        quats=geometry.normalize_quat(rng.normal(size=(n, 4))),
        scales=rng.uniform(0.01, 0.3, (n, 3)),
        opacities=rng.uniform(0.05, 0.95, n),
        sh=rng.normal(0, 0.3, (n, (degree + 1) ** 2, 3)),
    )


def test_ply_round_trip(tmp_path):
    g = _random_gaussians(50, 3)
    path = tmp_path / "trained.ply"
    logit = np.log(g["opacities"] / (1 - g["opacities"]))
    ply.write_ply_gaussians(path, g["means"], g["quats"] * 2.5, np.log(g["scales"]), logit, g["sh"])
    scene = nurec_jax.load_scene(path)
    assert scene.scene_id == "trained"
    got = scene.gaussians.static
    assert got.sh_degree == 3
    np.testing.assert_allclose(np.asarray(got.means), g["means"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.quats), g["quats"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.scales), g["scales"], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got.opacities), g["opacities"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.sh), g["sh"], atol=1e-6)  # f_rest channel-major undone


def test_ply_f_rest_is_channel_major(tmp_path):
    """An Inria PLY written by hand: f_rest_i with i = channel * 15 + coefficient."""
    names = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(45)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    row = np.zeros(len(names), np.float32)
    row[names.index("rot_0")] = 1.0
    row[names.index("f_rest_16")] = 7.0  # channel 1 (green), coefficient 1
    header = "ply\nformat binary_little_endian 1.0\nelement vertex 1\n"
    header += "".join(f"property float {n}\n" for n in names) + "end_header\n"
    path = tmp_path / "one.ply"
    path.write_bytes(header.encode() + row.tobytes())
    coeffs = np.asarray(nurec_jax.load_scene(path).gaussians.static.sh)[0]
    assert coeffs[2, 1] == 7.0 and np.count_nonzero(coeffs) == 1


def test_ply_errors(tmp_path):
    path = tmp_path / "bad.ply"
    path.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n1\n")
    with pytest.raises(SceneFormatError, match="bad.ply: PLY format 'ascii' is not supported"):
        nurec_jax.load_scene(path)
    header = b"ply\nformat binary_little_endian 1.0\nelement vertex 2\nproperty float x\nend_header\n"
    path.write_bytes(header + b"\0" * 8)
    with pytest.raises(SceneFormatError, match="missing 3DGS vertex properties"):
        nurec_jax.load_scene(path)
    path.write_bytes(header + b"\0" * 5)
    with pytest.raises(SceneFormatError, match="bad.ply: truncated"):
        nurec_jax.load_scene(path)


def _write_particle_field(path, g, degree, parent_matrix=None, half=False):
    from pxr import Gf, Usd, UsdGeom, UsdVol, Vt

    stage = Usd.Stage.CreateNew(str(path))
    xf = UsdGeom.Xform.Define(stage, "/World/Gaussians")
    if parent_matrix is not None:
        xf.AddTransformOp().Set(Gf.Matrix4d(np.asarray(parent_matrix).T.tolist()))
    pf = UsdVol.ParticleField3DGaussianSplat.Define(stage, "/World/Gaussians/gaussians")
    n = len(g["means"])
    if half:
        pf.CreatePositionshAttr().Set(Vt.Vec3hArray.FromNumpy(g["means"].astype(np.float16)))
    else:
        pf.CreatePositionsAttr().Set(Vt.Vec3fArray.FromNumpy(g["means"].astype(np.float32)))
    pf.CreateOrientationsAttr().Set(Vt.QuatfArray([Gf.Quatf(*map(float, q)) for q in g["quats"]]))
    pf.CreateScalesAttr().Set(Vt.Vec3fArray.FromNumpy(g["scales"].astype(np.float32)))
    pf.CreateOpacitiesAttr().Set(Vt.FloatArray.FromNumpy(g["opacities"].astype(np.float32)))
    pf.CreateRadianceSphericalHarmonicsDegreeAttr().Set(degree)
    pf.CreateRadianceSphericalHarmonicsCoefficientsAttr().Set(
        Vt.Vec3fArray.FromNumpy(g["sh"].reshape(-1, 3).astype(np.float32))
    )
    stage.GetRootLayer().Save()
    assert n


def test_particle_field_usda(tmp_path):
    g = _random_gaussians(20, 1, seed=2)
    path = tmp_path / "field.usda"
    _write_particle_field(path, g, 1)
    got = nurec_jax.load_scene(path).gaussians.static
    np.testing.assert_allclose(np.asarray(got.means), g["means"], atol=1e-6)
    q = np.where(g["quats"][:, :1] < 0, -g["quats"], g["quats"])
    gq = np.asarray(got.quats)
    gq = np.where(gq[:, :1] < 0, -gq, gq)
    np.testing.assert_allclose(gq, q, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.scales), g["scales"], rtol=1e-6)  # linear, not log
    np.testing.assert_allclose(np.asarray(got.opacities), g["opacities"], atol=1e-6)  # linear, not logit
    np.testing.assert_allclose(np.asarray(got.sh), g["sh"], atol=1e-6)


def test_particle_field_in_usdz_with_parent_transform(tmp_path):
    """Ancestors' transforms compose; SH is rotated so colours are unchanged as seen from the world."""
    import zipfile

    g = _random_gaussians(15, 2, seed=3)
    rot = geometry.quat_wxyz_to_matrix(np.array([0.9, 0.1, -0.3, 0.2]))
    m = geometry.make_transform(2.0 * rot, [1.0, -2.0, 0.5])
    usdc = tmp_path / "scene.usdc"
    _write_particle_field(usdc, g, 2, parent_matrix=m, half=True)
    path = tmp_path / "pf.usdz"
    with zipfile.ZipFile(path, "w") as z:
        z.write(usdc, "scene.usdc")
    got = nurec_jax.load_scene(path).gaussians.static
    p16 = g["means"].astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(np.asarray(got.means), p16 @ (2.0 * rot).T + m[:3, 3], atol=1e-4)
    np.testing.assert_allclose(np.asarray(got.scales), 2.0 * g["scales"], rtol=1e-5)
    d = np.array([[0.2, 0.9, -0.3]])
    d /= np.linalg.norm(d)
    want = sh.sh_to_rgb(g["sh"], d @ rot, 2)  # local direction = Rᵀ d
    np.testing.assert_allclose(sh.sh_to_rgb(np.asarray(got.sh, np.float64), d, 2), want, atol=1e-5)
