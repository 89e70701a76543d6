"""The Pallas (Triton) compositor kernels against their plain-jnp twin: interpret mode on CPU (forward
images and custom-VJP gradients with random cotangents), and lowering for an abstract H100 so a kernel
that cannot lower for CUDA fails CI without a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_inputs import DIFF, cotangent_grads, random_tiles

from nurec_jax.kernels import rasterize_pallas as RP
from nurec_jax.kernels import rasterize_ref as RR


def _f32(args):
    return {k: (v.astype(jnp.float32) if v.dtype == jnp.float64 else v) for k, v in args.items()}


CASES = {
    # Two frames (actors), an empty tile, Gaussians shared by tiles, opacities high enough that the
    # stop rule ends most pixels (saturated transmittance).
    "saturated": dict(n_frames=2, opacity=(0.9, 0.99), n=60, cap=40),
    "single_frame": dict(n_frames=1, opacity=(0.2, 0.9)),
    # Capacity overflow: lists longer than the tile capacity are cut at tile_counts (the renderer then grows
    # the capacity and renders again; until then both paths must composite the same prefix).
    "overflow": dict(n_frames=3, opacity=(0.1, 0.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_reference(case):
    args = _f32(random_tiles(3, n_px=16, **CASES[case]))
    if case == "overflow":
        args["tile_counts"] = jnp.minimum(args["tile_counts"], 6)
    ref_fn = jax.jit(lambda a: RR.rasterize_tiles_ref(**a, chunk=4, tile_batch=2))
    pl_fn = jax.jit(lambda a: RP.rasterize_tiles_pallas(**a, chunk=4, interpret=True))
    ref, out = ref_fn(args), pl_fn(args)
    for name, a, b in zip(("rgb", "transmittance", "hit"), ref, out):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=5e-5, err_msg=name)
    _, trans, _ = map(np.asarray, out)  # rgb, transmittance, hit
    assert np.all(trans[0] == 1.0)  # the empty tile
    if case == "saturated":
        assert (trans[1:] < 1e-3).mean() > 0.3
    g_ref, g_pl = cotangent_grads(args, ref, ref_fn, pl_fn)
    for k in DIFF:
        a, b = np.asarray(g_ref[k]), np.asarray(g_pl[k])
        assert np.abs(a).max() > 0, k
        np.testing.assert_allclose(b, a, atol=2e-4 * max(1.0, np.abs(a).max()), err_msg=k)


def test_stop_positions_match_reference():
    """Both compositors end each pixel at the same list position (the stop rule), whatever their walk."""
    args = _f32(random_tiles(5, n_px=16, **CASES["saturated"]))
    names = ("pair_gids", "tile_start", "tile_counts", "rays", "pixel_valid")
    _, (_, _, ref_stop) = RR._forward_units(*[args[k] for k in names + DIFF[1:]], args["frames"], 4, 2, False)
    rows = RP._param_rows(*[args[k] for k in DIFF[1:]])
    _, _, _, stop, _ = jax.jit(lambda a: RP._forward(*[a[k] for k in names], rows, a["frames"], 4, True))(args)
    assert (np.asarray(stop) < 2**30).mean() > 0.1  # pixels do stop (12 % here)
    np.testing.assert_array_equal(np.asarray(stop), np.asarray(ref_stop))


def test_forward_and_backward_lower_for_an_abstract_h100():
    from jax._src import (
        mesh as mesh_lib,  # private, same API on 0.10.2 and 0.11.2 (docs/jax_notes.md#lowering-without-a-gpu)
    )

    args = _f32(random_tiles(3, n_px=256, n_frames=3))
    specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in args.items()}

    def fwd_bwd(a):
        def loss(d):
            rgb, trans, hit = RP.rasterize_tiles_pallas(**{**a, **d}, chunk=32, interpret=False)
            return jnp.sum(rgb) + jnp.sum(trans) + jnp.sum(hit)

        return jax.grad(loss)({k: a[k] for k in DIFF})

    dev = mesh_lib.AbstractDevice("NVIDIA H100", 1, "cuda")
    mesh = mesh_lib.AbstractMesh((1,), ("x",), (mesh_lib.AxisType.Explicit,), abstract_device=dev)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(fwd_bwd).trace(specs).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") >= 2  # the forward and the backward kernel
    assert "nurec_rasterize_fwd" in text and "nurec_rasterize_bwd" in text


def test_chunk_must_be_a_power_of_two():
    args = _f32(random_tiles(3, n_px=16))
    with pytest.raises(ValueError, match="power of two"):
        RP.rasterize_tiles_pallas(**args, chunk=6)
