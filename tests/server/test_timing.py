"""Stage timing, the timing log / metrics.yaml, and the profiling backends (nurec_jax/server/stage_timer.py,
timing_log.py, metrics_yaml.py, profiler.py)."""

import glob
import json
import logging
import os
import sys
import threading
import time
import types

import jax
import jax.numpy as jnp
import pytest
import yaml

from nurec_jax.server.metrics_yaml import metrics_yaml
from nurec_jax.server.profiler import PROFILING_BACKENDS, Profiler
from nurec_jax.server.stage_timer import StageTimer
from nurec_jax.server.timing_log import TimingLog

_LOGGER_NAME = "nurec_jax.server.timing_log"


# ---------------------------------------------------------------------------------------------- timer


def test_stages_recorded_in_order():
    t = StageTimer()
    for name, secs in (("decode_request", 0.002), ("setup", 0.0), ("render", 0.01), ("encode", 0.0)):
        with t.stage(name):
            time.sleep(secs)  # the stage's work: its duration is what the timer must record
    rec = t.record()
    assert list(rec) == ["decode_request", "setup", "render", "encode"]
    assert rec["render"] >= 10.0 and rec["decode_request"] >= 2.0
    assert all(v >= 0 for v in rec.values())
    assert t.total_ms() >= rec["render"] + rec["decode_request"]
    assert t.record() is not t.record()  # a copy


def test_repeated_and_nested_stages():
    t = StageTimer()
    with t.stage("render"):
        for _ in range(2):
            with t.stage("compositing"):
                time.sleep(0.003)  # the stage's work: its duration is what the timer must record
    with t.stage("encode"):
        pass
    rec = t.record()
    assert list(rec) == ["render", "compositing", "encode"]  # first-entry order
    assert rec["compositing"] >= 6.0
    assert rec["render"] >= rec["compositing"]
    # The span covers render (which contains the compositing stages) and encode, counted once.
    assert rec["render"] + rec["encode"] <= t.total_ms() + 1e-6 < sum(rec.values())


def test_stage_recorded_on_exception():
    t = StageTimer()
    with pytest.raises(RuntimeError):
        with t.stage("render"):
            raise RuntimeError("boom")
    assert list(t.record()) == ["render"]


def test_synchronize_blocks_until_ready(monkeypatch):
    calls = []
    real = jax.block_until_ready
    monkeypatch.setattr(jax, "block_until_ready", lambda x: calls.append(x) or real(x))
    x = jnp.arange(4.0) * 2
    t = StageTimer(synchronize=True)
    with t.stage("compositing") as st:
        out = st.wait({"rgb": x})
    assert out["rgb"] is x and len(calls) == 1 and calls[0]["rgb"] is x
    t = StageTimer(synchronize=False)
    with t.stage("compositing") as st:
        assert st.wait(x) is x
    assert len(calls) == 1


def test_disabled_timer_is_noop(monkeypatch):
    monkeypatch.setattr(jax, "block_until_ready", lambda x: pytest.fail("disabled timer must not block"))
    t = StageTimer(enabled=False, synchronize=True)
    s1, s2 = t.stage("render"), t.stage("encode")
    assert s1 is s2  # one shared no-op object: nothing allocated per stage
    x = jnp.ones(2)
    with t.stage("render") as st:
        assert st.wait(x) is x
    assert t.record() == {} and t.total_ms() == 0.0
    t0 = time.perf_counter()
    for _ in range(10_000):
        with t.stage("render") as st:
            st.wait(x)
    assert time.perf_counter() - t0 < 0.5  # ~1 us each on any machine


def test_timer_opens_profiler_ranges(monkeypatch):
    opened = []

    class FakeProfiler:
        enabled = True

        def range(self, name):
            class R:
                def __enter__(self):
                    opened.append(("enter", name))

                def __exit__(self, *exc):
                    opened.append(("exit", name))

            return R()

    t = StageTimer(profiler=FakeProfiler())
    with t.stage("render"):
        with t.stage("projection"):
            pass
    assert opened == [("enter", "render"), ("enter", "projection"), ("exit", "projection"), ("exit", "render")]
    assert list(t.record()) == ["render", "projection"]
    opened.clear()
    t = StageTimer(enabled=False, profiler=FakeProfiler())  # profiling without timing still marks stages
    with t.stage("render"):
        pass
    assert opened == [("enter", "render"), ("exit", "render")] and t.record() == {}
    t = StageTimer(enabled=False, profiler=Profiler("NONE"))  # backend NONE marks nothing: the shared no-op stage
    assert t.stage("render") is t.stage("encode")


# ------------------------------------------------------------------------------------------------ log


def test_bad_verbosity_and_paths(tmp_path):
    with pytest.raises(ValueError, match="--timing-verbosity 'LOUD': choose one of NONE, SUMMARY, BASIC"):
        TimingLog("LOUD")
    with pytest.raises(ValueError, match="--timing-logfile .* is a directory"):
        TimingLog(logfile=str(tmp_path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--timing-logfile .*cannot create its directory"):
        TimingLog(logfile=str(tmp_path / "file" / "t.jsonl"))
    with pytest.raises(ValueError, match="--metrics-output-dir .*cannot create"):
        TimingLog(metrics_output_dir=str(tmp_path / "file"))
    assert TimingLog("details").verbosity == "DETAILS"


def test_basic_logs_one_line_per_request_and_logfile(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=_LOGGER_NAME)
    path = tmp_path / "sub" / "dir" / "timing.jsonl"
    log = TimingLog("BASIC", logfile=str(path))
    assert path.parent.is_dir() and not path.exists()  # directories now, the file on first use
    log.add("render_rgb", "scene-a", {"decode_request": 0.5, "render": 10.0}, total_ms=12.0)
    log.add("render_lidar", "scene-b", {"render": 3.25})
    msgs = [r.getMessage() for r in caplog.records if r.name == _LOGGER_NAME]
    assert msgs == [
        "timing render_rgb scene=scene-a total=12.00 ms | decode_request=0.50 render=10.00",
        "timing render_lidar scene=scene-b total=3.25 ms | render=3.25",
    ]
    lines = [json.loads(s) for s in path.read_text().splitlines()]  # line-buffered: visible before close
    assert [{k: v for k, v in d.items() if k != "time"} for d in lines] == [
        {
            "method": "render_rgb",
            "scene_id": "scene-a",
            "total_ms": 12.0,
            "stages": {"decode_request": 0.5, "render": 10.0},
        },
        {"method": "render_lidar", "scene_id": "scene-b", "total_ms": 3.25, "stages": {"render": 3.25}},
    ]
    assert abs(lines[0]["time"] - time.time()) < 60
    caplog.clear()
    log.close()
    assert not [r for r in caplog.records if r.name == _LOGGER_NAME]  # BASIC: no summary
    assert len(path.read_text().splitlines()) == 2
    log.add("render_rgb", "scene-a", {"render": 1.0})  # after close: ignored
    assert len(path.read_text().splitlines()) == 2


def test_logfile_appends(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"old": 1}\n')
    log = TimingLog("DETAILS", logfile=str(path))
    log.add("render_rgb", "s", {"render": 1.0})
    log.close()
    lines = [json.loads(s) for s in path.read_text().splitlines()]
    assert lines[0] == {"old": 1} and lines[1]["method"] == "render_rgb"
    assert lines[2]["summary"]["render_rgb"]["render"]["count"] == 1  # DETAILS: summary at close too


def test_none_and_summary_verbosity(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=_LOGGER_NAME)
    for verbosity in ("NONE", "SUMMARY"):
        caplog.clear()
        path = tmp_path / f"{verbosity}.jsonl"
        log = TimingLog(verbosity, logfile=str(path))
        for ms in (1.0, 2.0, 3.0, 4.0):
            log.add("render_rgb", "s", {"setup": 0.5, "render": ms}, total_ms=ms + 1)
        assert not [r for r in caplog.records if r.name == _LOGGER_NAME]  # nothing per request
        s = log.summary()  # available at any verbosity
        assert s["render_rgb"]["render"] == pytest.approx(
            {"count": 4, "mean_ms": 2.5, "p50_ms": 2.5, "p95_ms": 3.85, "max_ms": 4.0}
        )
        assert list(s["render_rgb"]) == ["total", "setup", "render"] and s["render_rgb"]["total"]["max_ms"] == 5.0
        log.close()
        log.close()  # idempotent
        msgs = [r.getMessage() for r in caplog.records if r.name == _LOGGER_NAME]
        if verbosity == "NONE":
            assert msgs == [] and not path.exists()
        else:
            assert len(msgs) == 1 and msgs[0].startswith("timing summary (ms):\nmethod")
            table = msgs[0].splitlines()
            assert table[1].split() == ["method", "stage", "count", "mean", "p50", "p95", "max"]
            assert table[4].split() == ["render_rgb", "render", "4", "2.50", "2.50", "3.85", "4.00"]
            (line,) = path.read_text().splitlines()
            assert json.loads(line)["summary"] == s


def test_thread_safety(tmp_path):
    path = tmp_path / "t.jsonl"
    log = TimingLog("BASIC", logfile=str(path), metrics_output_dir=str(tmp_path / "m"), flush_interval_s=0.005)
    n_threads, n_each = 6, 150
    barrier = threading.Barrier(n_threads)

    def work(i):
        barrier.wait()
        for k in range(n_each):
            log.add(f"m{i % 2}", f"scene{i}", {"setup": 1.0, "render": float(k)})

    logging.getLogger(_LOGGER_NAME).setLevel(logging.WARNING)  # keep the 900 INFO lines out of the run
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        logging.getLogger(_LOGGER_NAME).setLevel(logging.NOTSET)
    log.close()
    s = log.summary()
    assert s["m0"]["render"]["count"] == s["m1"]["render"]["count"] == 3 * n_each
    assert s["m0"]["setup"]["mean_ms"] == 1.0
    lines = path.read_text().splitlines()
    assert len(lines) == n_threads * n_each and all(json.loads(x)["stages"]["setup"] == 1.0 for x in lines)
    m = yaml.safe_load((tmp_path / "m" / "metrics.yaml").read_text())
    assert m["m0"]["count"] == m["m1"]["count"] == 3 * n_each - 3
    assert not glob.glob(str(tmp_path / "m" / ".metrics.yaml.*"))  # no temp files left by concurrent writers


# -------------------------------------------------------------------------------------------- metrics


def test_metrics_yaml_after_warmups(tmp_path):
    log = TimingLog("NONE", metrics_output_dir=str(tmp_path / "metrics"))
    for ms in (900.0, 50.0, 40.0, 10.0, 12.0, 14.0, 20.0):  # the first 3 are warm-ups (compiles)
        log.add("render_rgb", "s", {"setup": 1.0, "render": ms}, total_ms=ms + 2.0)
    log.add("render_lidar", "s", {"raycast": 5.0})  # only a warm-up so far
    log.add("render_lidar", "s", {"raycast": 5.0})
    assert not (tmp_path / "metrics" / "metrics.yaml").exists()  # not before the flush interval
    log.flush()
    text = (tmp_path / "metrics" / "metrics.yaml").read_text()
    assert (
        text
        == """\
# nurec-jax render metrics (--metrics-output-dir): render-time samples in ms, per method,
# after the first 3 renders of each method (warm-up).
warmup_renders: 3
render_rgb:
  count: 4
  warmup_skipped: 3
  mean_ms: 14.0000
  p50_ms: 13.0000
  p95_ms: 19.1000
  max_ms: 20.0000
  samples_ms: [10.0000, 12.0000, 14.0000, 20.0000]
  stage_mean_ms:
    setup: 1.0000
    render: 14.0000
render_lidar:
  count: 0
  warmup_skipped: 2
  mean_ms: null
  p50_ms: null
  p95_ms: null
  max_ms: null
  samples_ms: []
  stage_mean_ms: {}
"""
    )
    parsed = yaml.safe_load(text)
    assert parsed["render_rgb"]["samples_ms"] == [10.0, 12.0, 14.0, 20.0]
    assert parsed["render_lidar"] == {
        "count": 0,
        "warmup_skipped": 2,
        "mean_ms": None,
        "p50_ms": None,
        "p95_ms": None,
        "max_ms": None,
        "samples_ms": [],
        "stage_mean_ms": {},
    }
    log.add("render_lidar", "s", {"raycast": 6.0})  # the third warm-up
    log.add("render_lidar", "s", {"raycast": 7.0})  # no `render` stage: the total is the sample
    log.close()
    parsed = yaml.safe_load((tmp_path / "metrics" / "metrics.yaml").read_text())
    assert parsed["render_lidar"]["samples_ms"] == [7.0] and parsed["render_lidar"]["stage_mean_ms"] == {"raycast": 7.0}


def test_metrics_yaml_quoting_and_floats():
    text = metrics_yaml(
        {
            "render rgb": {
                "count": 1,
                "mean_ms": 1e-05,
                "samples_ms": [float("inf"), 2.5e7],
                "stage_mean_ms": {"on": 1.0, "a:b": 2.0, 'q"x': 3.0},
            }
        },
        3,
    )
    parsed = yaml.safe_load(text)
    assert parsed["render rgb"]["mean_ms"] == 0.0  # fixed point: a float, never the string "1e-05"
    assert parsed["render rgb"]["samples_ms"] == [float("inf"), 2.5e7]
    assert parsed["render rgb"]["stage_mean_ms"] == {"on": 1.0, "a:b": 2.0, 'q"x': 3.0}


def test_metrics_flush_interval_and_atomic_write(tmp_path, monkeypatch):
    now = [100.0]
    log = TimingLog(
        "NONE", metrics_output_dir=str(tmp_path), warmup_renders=0, flush_interval_s=10.0, clock=lambda: now[0]
    )
    path = tmp_path / "metrics.yaml"
    log.add("render_rgb", "s", {"render": 1.0})
    now[0] += 9.9
    log.add("render_rgb", "s", {"render": 2.0})
    assert not path.exists()
    now[0] += 0.2
    log.add("render_rgb", "s", {"render": 3.0})  # 10.1 s since construction: written by add()
    assert yaml.safe_load(path.read_text())["render_rgb"]["samples_ms"] == [1.0, 2.0, 3.0]
    log.add("render_rgb", "s", {"render": 4.0})
    assert yaml.safe_load(path.read_text())["render_rgb"]["count"] == 3  # interval restarted

    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: replaced.append((a, b)) or real_replace(a, b))
    log.flush()
    assert len(replaced) == 1 and replaced[0][1] == str(path)
    assert os.path.dirname(replaced[0][0]) == str(tmp_path)  # same directory: a rename, never a copy
    before = path.read_text()

    def broken_replace(a, b):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    log.add("render_rgb", "s", {"render": 5.0})
    log.flush()  # logged, not raised
    assert path.read_text() == before  # the old file stays whole
    assert sorted(os.listdir(tmp_path)) == ["metrics.yaml"]  # the temp file is removed


# ------------------------------------------------------------------------------------------- profiler


def test_profiler_choices(monkeypatch):
    p = Profiler("NONE")
    assert not p.enabled
    p.start()
    with p.range("x"):
        pass
    p.stop()
    with pytest.raises(ValueError, match="Tracy is NRE's C\\+\\+ profiler .*use JAX .* or NVTX"):
        Profiler("TRACY")
    with pytest.raises(ValueError, match="--profiling-backend 'VTUNE': choose one of NONE, JAX, NVTX"):
        Profiler("VTUNE")
    with pytest.raises(ValueError, match="--profiling-backend JAX needs a trace directory"):
        Profiler("JAX")
    monkeypatch.setitem(sys.modules, "nvtx", None)  # makes `import nvtx` raise ImportError
    with pytest.raises(ValueError, match=r"--profiling-backend NVTX needs the nvtx package \(pip install nvtx\)"):
        Profiler("NVTX")


def test_nvtx_ranges(monkeypatch):
    events = []

    class Annotate:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            events.append(("push", self.name))

        def __exit__(self, *exc):
            events.append(("pop", self.name))

    monkeypatch.setitem(sys.modules, "nvtx", types.SimpleNamespace(annotate=Annotate))
    p = Profiler("nvtx")
    assert p.enabled and p.backend == "NVTX"
    p.start()  # the external profiler (nsys) owns the capture
    t = StageTimer(profiler=p)
    with t.stage("render"):
        with t.stage("binning"):
            pass
    p.stop()
    assert events == [("push", "render"), ("push", "binning"), ("pop", "binning"), ("pop", "render")]
    assert list(t.record()) == ["render", "binning"]


def test_jax_profiler_trace(tmp_path):
    trace_dir = tmp_path / "trace"
    with Profiler("JAX", str(trace_dir)) as p:
        assert p.tracing
        p.start()  # idempotent
        t = StageTimer(synchronize=True, profiler=p)
        with t.stage("nurec_test_stage") as st:
            st.wait(jnp.arange(8.0) + 1)
    assert not p.tracing
    p.stop()  # idempotent
    files = glob.glob(str(trace_dir / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(files) == 1
    with open(files[0], "rb") as f:
        assert b"nurec_test_stage" in f.read()
    assert PROFILING_BACKENDS == ("NONE", "TRACY", "NVTX", "JAX")
