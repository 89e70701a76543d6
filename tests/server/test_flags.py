"""NuRec's flag spelling (dashes, --no-x, tuple values) maps onto absl flags."""

import pytest
from absl import app, flags

from nurec_jax.cli._flags import height_width, normalize_argv


def test_normalize_argv():
    fv = flags.FlagValues()
    flags.DEFINE_boolean("enable_nrend", True, "", flag_values=fv)
    flags.DEFINE_string("artifact_glob", None, "", flag_values=fv)
    flags.DEFINE_list("difix_resolution", ["576", "1024"], "", flag_values=fv)
    flags.DEFINE_integer("port", 8080, "", flag_values=fv)
    argv = [
        "serve-grpc",
        "--artifact-glob=/d/**/*.usdz",
        "--no-enable-nrend",
        "--port",
        "6000",
        "--difix-resolution",
        "288",
        "512",
    ]
    out = normalize_argv(argv, fv, {"difix_resolution": 2})
    assert out == [
        "serve-grpc",
        "--artifact_glob=/d/**/*.usdz",
        "--noenable_nrend",
        "--port",
        "6000",
        "--difix_resolution=288,512",
    ]
    fv(out)
    assert fv.artifact_glob == "/d/**/*.usdz" and fv.enable_nrend is False and fv.port == 6000
    assert fv.difix_resolution == ["288", "512"]
    # absl's own spelling passes through unchanged.
    assert normalize_argv(["x", "--noenable_nrend", "--port=1"], fv) == ["x", "--noenable_nrend", "--port=1"]


def test_height_width():
    assert height_width(["576", "1024"], "difix-resolution") == (576, 1024)
    for bad in (["576"], ["576", "1024", "3"], ["576", "wide"]):
        with pytest.raises(app.UsageError, match=r"--difix-resolution takes two integers H W, got"):
            height_width(bad, "difix-resolution")


@pytest.mark.parametrize(
    "kw,flag",
    [
        (dict(warmup_height=-1), "--warmup-height"),
        (dict(metrics_port=70000), "--metrics-port"),
        (dict(enable_harmonizer=True), "--enable-harmonizer"),
        (dict(initial_pair_capacity=3), "--initial-pair-capacity"),
    ],
)
def test_server_options_name_the_bad_flag(kw, flag):
    from nurec_jax.server.options import ServerOptions

    with pytest.raises(ValueError, match=flag):
        ServerOptions(**kw).validate()
