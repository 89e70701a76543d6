"""nurec_jax.ppisp: against the numpy twin (tests/ppisp_numpy.py), by hand, under jit, gradients."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import ppisp_numpy
import pytest

from nurec_jax import ppisp
from nurec_jax.errors import SceneFormatError

F, C, H, W = 4, 2, 12, 16
_IDENTITY_COLOR = np.array([1.0, 0, 0, 0, 1.0, 0, 0, 0])
# float32 against the float64 twin: rounding through the colour step and CRF, measured <= 2e-6.
_F32_ATOL = 3e-5


def _raw_inverse_softplus(v):
    return np.log(np.expm1(v))


def _raw_inverse_sigmoid(p):
    return np.log(p / (1.0 - p))


def _params(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    vig = np.concatenate(
        [rng.uniform(0.3, 0.7, (C, 3, 2)), rng.uniform(-0.8, 0.3, (C, 3, 3))], axis=-1
    )  # some falloffs clip at 1, most are below
    return dict(
        exposure_params=rng.normal(0.0, 0.4, F),
        vignetting_params=vig,
        color_params=_IDENTITY_COLOR + rng.normal(0.0, 0.05, (F, 8)),
        crf_params=rng.normal(-0.5, 0.7, (C, 3, 7)),
    )


def _image(seed=1, h=H, w=W) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.exp(rng.uniform(np.log(0.02), np.log(40.0), (h, w, 3)))
    img[0, 0] = 0.0
    img[0, 1, 2] = -0.05
    return img


def _model(params, dtype) -> ppisp.Ppisp:
    return ppisp.Ppisp(**{k: jnp.asarray(v, dtype) for k, v in params.items()})


def _twin(params, img, c, f):
    names = ("exposure_params", "vignetting_params", "color_params", "crf_params")
    return ppisp_numpy.ppisp_numpy(*(params[n] for n in names), img, c, f)


_COMBOS = [(-1, -1), (-1, 2), (1, -1), (1, 2)]
_apply = jax.jit(ppisp.apply)  # one compile per dtype serves every index (eager op-by-op is slower)
_crf = jax.jit(ppisp.crf_curve)


@pytest.mark.parametrize("c,f", _COMBOS)
def test_matches_numpy_float64(c, f):
    params, img = _params(), _image()
    want = _twin(params, img, c, f)
    with jax.enable_x64(True):
        m = _model(params, jnp.float64)
        got = np.asarray(_apply(m, jnp.asarray(img), jnp.int32(c), jnp.int32(f)))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)
    assert 0.0 <= got.min() and got.max() <= 1.0


@pytest.mark.parametrize("c,f", _COMBOS)
def test_matches_numpy_float32(c, f):
    params, img = _params(), _image()
    m, x = _model(params, jnp.float32), jnp.asarray(img, jnp.float32)
    got = np.asarray(_apply(m, x, jnp.int32(c), jnp.int32(f)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _twin(params, img, c, f), atol=_F32_ATOL)


def test_image_reaches_every_crf_region():
    """The comparison image reaches every piece of each channel's curve (camera 1, frame 2)."""
    params, img = _params(), _image()
    m = _model(params, jnp.float32)
    pre = ppisp.exposure(jnp.asarray(img, jnp.float32), m.exposure_params[2])
    pre = ppisp.vignetting(pre, m.vignetting_params[1], ppisp.pixel_uv(H, W))
    pre = np.asarray(ppisp.color_correction(pre, m.color_params[2]))  # the CRF's input
    beyond = 0
    for ch in range(3):
        k = ppisp_numpy.crf_knots(params["crf_params"][1, ch])
        v = pre[..., ch]
        edges = [0.0, k["x0"], k["x1"], k["sh_x"]]
        counts = [((v >= lo) & (v < hi)).sum() for lo, hi in zip(edges, edges[1:])]
        assert min(counts) > 0, (ch, counts)
        beyond += (v >= k["sh_x"]).sum()
    assert (pre < 0).any() and beyond > 0


@pytest.mark.parametrize("c,f", [(C, -1), (-1, F), (100, -7), (-5, 2 * F)])
def test_out_of_range_indices_act_like_minus_one(c, f):
    params, img = _params(), jnp.asarray(_image(), jnp.float32)
    m = _model(params, jnp.float32)
    want = _apply(m, img, jnp.int32(c if 0 <= c < C else -1), jnp.int32(f if 0 <= f < F else -1))
    got = _apply(m, img, jnp.int32(c), jnp.int32(f))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_stage_identities():
    img = jnp.asarray(_image(), jnp.float32)
    np.testing.assert_array_equal(ppisp.exposure(img, jnp.float32(0.0)), img)
    np.testing.assert_allclose(ppisp.exposure(img, jnp.float32(-1.0)), img / 2, rtol=1e-7)
    no_falloff = jnp.asarray([[0.3, 0.6, 0.0, 0.0, 0.0]] * 3, jnp.float32)
    np.testing.assert_array_equal(ppisp.vignetting(img, no_falloff, ppisp.pixel_uv(H, W)), img)
    pos = jnp.clip(img, 0.0, None)
    i = pos.sum(-1, keepdims=True)
    got = ppisp.color_correction(pos, jnp.asarray(_IDENTITY_COLOR, jnp.float32))
    # B = I - R - G cancels: the float32 error is a few ulps of I, not of B.
    assert np.all(np.abs(got - pos * i / (i + ppisp.EPS)) <= 1e-6 * i)


def test_vignetting_by_hand():
    with jax.enable_x64(True):
        uv = ppisp.pixel_uv(2, 4, jnp.float64)
        np.testing.assert_allclose(uv[1, 3], [0.875, 0.75])
        params = jnp.asarray([[0.5, 0.5, -1.0, 0.0, 0.0], [0.0, 0.0, -0.5, 0.0, 0.0], [0.5, 0.5, -1.0, 2.0, 0.0]])
        out = ppisp.vignetting(jnp.ones((2, 4, 3)), params, uv)
        r2 = 0.375**2 + 0.25**2  # pixel (1, 3) to (0.5, 0.5)
        r2_origin = 0.875**2 + 0.75**2
        want = [1 - r2, max(0.0, 1 - 0.5 * r2_origin), min(1.0, 1 - r2 + 2 * r2**2)]
        np.testing.assert_allclose(out[1, 3], want)


def test_pipeline_with_neutral_parameters_is_display_or_crf_only():
    params = dict(
        exposure_params=np.zeros(F),
        vignetting_params=np.zeros((C, 3, 5)),
        color_params=np.tile(_IDENTITY_COLOR, (F, 1)),
        crf_params=_params()["crf_params"],
    )
    img = np.random.default_rng(3).uniform(0.1, 1.2, (H, W, 3))
    with jax.enable_x64(True):
        m, x = _model(params, jnp.float64), jnp.asarray(img)
        i = img.sum(-1, keepdims=True)
        colour = img * i / (i + ppisp.EPS)
        display = np.clip(colour, 0, 1) ** (1 / 2.2)
        np.testing.assert_allclose(_apply(m, x, jnp.int32(-1), jnp.int32(1)), display, rtol=1e-12)
        crf = _crf(jnp.asarray(img), m.crf_params[0])
        np.testing.assert_allclose(_apply(m, x, jnp.int32(0), jnp.int32(-1)), crf, rtol=1e-12)


def _hand_crf_raw(gamma=1.0):
    """x0_off 0.25, toe 1 -> x0 0.5; y0 0.2; y1_frac 0.5; shoulder 1; overshoot 1; gamma 1."""
    sp, sig = _raw_inverse_softplus, _raw_inverse_sigmoid
    return np.array([sp(0.25), sig(0.2), sig(0.5), sp(1.0), sp(1.0), sp(1.0), sp(gamma)])


def test_crf_by_hand():
    # gamma 1: s0 = 0.8, toe 0.8 x^2, segment 0.2 + 0.8 (x - 0.5) up to y1 = 0.6 at x1 = 1,
    # shoulder 1.4 - 0.2 (3 - x)^2 (sh_y = 1.4, sh_x = 3), saturating at 1 from x = 3 - sqrt(2).
    with jax.enable_x64(True):
        raw = jnp.asarray(np.tile(_hand_crf_raw(), (3, 1)))
        k = ppisp.crf_knots(raw)
        got_knots = [k.x0[0], k.x1[0], k.sh_x[0], k.sh_y[0], k.y1[0], k.b_toe[0], k.b_shoulder[0]]
        np.testing.assert_allclose(got_knots, [0.5, 1.0, 3.0, 1.4, 0.6, 2.0, 2.0])
        xs = np.array([-0.1, 0.25, 0.4, 0.75, 0.9, 1.5, 1.55, 2.0, 5.0])
        want = [0.0, 0.05, 0.128, 0.4, 0.52, 0.95, 1.4 - 0.2 * 1.45**2, 1.0, 1.0]
        got = ppisp.crf_curve(jnp.asarray(np.repeat(xs[:, None], 3, 1)), raw)[:, 0]
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        twin = ppisp_numpy.crf_channel(xs, raw[0])
        np.testing.assert_allclose(twin, want, rtol=1e-10, atol=1e-12)


def test_crf_continuous_at_knots_and_monotone():
    raws = [_params(s)["crf_params"].reshape(-1, 7) for s in range(4)] + [_hand_crf_raw(2.0)[None]]
    raws = np.concatenate(raws)
    with jax.enable_x64(True):
        for raw in raws:
            k = ppisp_numpy.crf_knots(raw)
            raw3 = jnp.asarray(np.tile(raw, (3, 1)))

            def curve(x):
                return np.asarray(_crf(jnp.asarray(np.repeat(x[:, None], 3, 1)), raw3))[:, 0]

            knots = np.array([k["x0"], k["x1"], k["sh_x"]])
            d = 1e-9
            np.testing.assert_allclose(curve(knots - d), curve(knots + d), atol=1e-7)
            np.testing.assert_allclose(curve(knots[:2]), [k["y0"], k["y1"]], rtol=1e-12)
            grid = np.linspace(-0.5, 1.5 * k["sh_x"], 4001)
            y = curve(grid)
            assert np.all(np.diff(y) >= -1e-12) and y[0] == 0.0 and y[-1] == 1.0


def test_display_gamma_without_camera():
    x = jnp.asarray([-1.0, 0.0, 0.25, 1.0, 3.0])
    want = [0.0, 0.0, 0.25 ** (1 / 2.2), 1.0, 1.0]
    np.testing.assert_allclose(ppisp.display_gamma(x), want, rtol=1e-6)


def test_jit_does_not_retrace_for_new_indices():
    traces = []

    def run(m, img, c, f):
        traces.append(1)
        return ppisp.apply(m, img, c, f)

    fn = jax.jit(run)
    params, img = _params(), _image()
    m = _model(params, jnp.float32)
    for c, f in [(0, 0), (1, 3), (-1, -1), (7, -3), (1, 2)]:
        out = fn(m, jnp.asarray(img, jnp.float32), jnp.int32(c), jnp.int32(f))
        np.testing.assert_allclose(out, _twin(params, img, c, f), atol=_F32_ATOL)
    assert len(traces) == 1


def _loss(img, m, c, f, weights):
    return jnp.sum(ppisp.apply(m, img, c, f) * weights)


_loss_jit = jax.jit(_loss)
_grad = jax.jit(jax.grad(_loss, argnums=(0, 1)))  # d/d(img, params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("c,f", _COMBOS)
def test_gradients_are_finite(dtype, c, f):
    with jax.enable_x64(dtype == jnp.float64):
        img = _image()
        img[1, :3] = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [-1.0, 1e-30, 1e4]]  # edges of every branch
        m, x = _model(_params(), dtype), jnp.asarray(img, dtype)
        w = jnp.asarray(np.random.default_rng(5).normal(size=img.shape), dtype)
        g_img, g_m = _grad(x, m, jnp.int32(c), jnp.int32(f), w)
        assert np.all(np.isfinite(g_img))
        for name, g in dataclasses.asdict(g_m).items():
            assert np.all(np.isfinite(g)), name
        if c >= 0:
            assert np.any(g_m.crf_params != 0) and np.any(g_m.vignetting_params != 0)
        if f >= 0:
            assert np.any(g_m.color_params != 0) and g_m.exposure_params[f] != 0


def test_float32_gradients_finite_for_saturated_crf_parameters():
    """Each raw CRF entry pushed far out (sigmoids saturate to exactly 0 or 1 in float32, empty
    shoulder, gamma at its floor). Known limit: y0 = sigmoid(r1) below ~1e-6 with a small gamma
    underflows y0 ** (1 / gamma), so r1 is only taken to -10."""
    params, img = _params(), jnp.asarray(_image(), jnp.float32)
    w = jnp.ones_like(img)
    for j in range(7):
        for v in (-10.0, 30.0) if j == 1 else (-30.0, 30.0):
            raw = params["crf_params"].copy()
            raw[..., j] = v
            m = _model({**params, "crf_params": raw}, jnp.float32)
            grads = jax.tree_util.tree_leaves(_grad(img, m, jnp.int32(1), jnp.int32(1), w))
            assert all(np.all(np.isfinite(g)) for g in grads), (j, v)


def _fd(g, h=1e-6):
    """Fourth-order central difference of g at 0 (the colour step's high curvature makes the
    two-point rule's h**2 error visible at 1e-6 relative)."""
    return (8 * (g(h) - g(-h)) - (g(2 * h) - g(-2 * h))) / (12 * h)


@pytest.mark.parametrize("c,f", _COMBOS)
def test_gradients_match_finite_differences(c, f):
    """Directional derivatives along random directions in float64 against finite differences.

    Away from kinks only: vignetting alphas are negative (no falloff at its clip), the image is
    positive, and outputs within 0.01 of 0 or 1 (clipped, saturating, the toe's EPS floor, or
    the display curve's steep foot) get no weight in the loss. Checked stable over 30 seeds.
    """
    params = _params(2)
    params["vignetting_params"][..., 2:] = -np.abs(params["vignetting_params"][..., 2:])
    rng = np.random.default_rng(6)
    img = rng.uniform(0.05, 3.0, (H, W, 3))
    with jax.enable_x64(True):
        m, x = _model(params, jnp.float64), jnp.asarray(img)
        ci, fi = jnp.int32(c), jnp.int32(f)
        out = _apply(m, x, ci, fi)
        w = jnp.asarray(rng.normal(size=img.shape)) * ((out > 0.01) & (out < 0.99))
        g_img, g_m = _grad(x, m, ci, fi, w)
        leaves = jax.tree_util.tree_leaves
        for _ in range(2):
            d_img = jnp.asarray(rng.normal(size=img.shape))
            d_m = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.normal(size=a.shape)), m)
            fd_img = _fd(lambda s: _loss_jit(x + s * d_img, m, ci, fi, w))
            np.testing.assert_allclose(jnp.vdot(g_img, d_img), fd_img, rtol=1e-6)
            step = lambda s: jax.tree_util.tree_map(lambda a, d: a + s * d, m, d_m)  # noqa: E731
            fd_m = _fd(lambda s: _loss_jit(x, step(s), ci, fi, w))
            an_m = sum(jnp.vdot(g, d) for g, d in zip(leaves(g_m), leaves(d_m)))
            np.testing.assert_allclose(an_m, fd_m, rtol=1e-6)


def _state(prefix="post_processings.0.ppisp.", **override):
    state = {prefix + k: v for k, v in _params().items()}
    state.update({prefix + k: v for k, v in override.items()})
    return state


def test_from_state_reads_and_converts():
    m = ppisp.Ppisp.from_state(_state(), "ckpt.pt", prefix="post_processings.0.ppisp.")
    assert (m.num_frames, m.num_cameras) == (F, C) and m.crf_params.dtype == jnp.float32
    no_frames = ppisp.Ppisp.from_state(_state("", exposure_params=np.zeros(0), color_params=np.zeros((0, 8))), "ckpt")
    img = jnp.asarray(_image(), jnp.float32)
    assert no_frames.num_frames == 0
    i32 = jnp.int32
    got = _apply(no_frames, img, i32(1), i32(3))
    np.testing.assert_array_equal(got, _apply(no_frames, img, i32(1), i32(-1)))
    np.testing.assert_array_equal(got, _apply(m, img, i32(1), i32(-1)))


_BAD_STATES = [  # (override, key to drop, message pattern)
    ({}, "crf_params", r"missing PPISP tensor 'crf_params'"),
    (
        {"vignetting_params": np.zeros((C, 3, 4))},
        None,
        r"'vignetting_params' has shape \(2, 3, 4\), expected \(C, 3, 5\)",
    ),
    (
        {"color_params": np.zeros((F + 1, 8))},
        None,
        r"'color_params' has shape \(5, 8\), expected \(F, 8\) with F = 4 from 'exposure_params'",
    ),
    (
        {"crf_params": np.zeros((C + 1, 3, 7))},
        None,
        r"'crf_params' has shape \(3, 3, 7\).*C = 2 from 'vignetting_params'",
    ),
    (
        {"exposure_params": np.zeros((F, 1))},
        None,
        r"'exposure_params' has shape \(4, 1\), expected \(F,\)",
    ),
    (
        {"vignetting_params": np.zeros((0, 3, 5)), "crf_params": np.zeros((0, 3, 7))},
        None,
        r"'crf_params' has shape \(0, 3, 7\); need at least one camera",
    ),
    ({"exposure_params": np.array([0.0, np.nan, 0, 0])}, None, r"'exposure_params'.*finite"),
]


@pytest.mark.parametrize("override,drop,match", _BAD_STATES)
def test_from_state_errors_name_the_key(override, drop, match):
    state = _state("", **override)
    if drop:
        del state[drop]
    with pytest.raises(SceneFormatError, match=match) as info:
        ppisp.Ppisp.from_state(state, "ckpt.pt")
    assert str(info.value).startswith("ckpt.pt: ")
