"""Writes the PyTorch checkpoint fixtures of tests/test_torch_checkpoint.py with real PyTorch.

Needs a Python with torch (not the project venv, which has none), for example:

    python3.11 -m venv /work/torchenv && /work/torchenv/bin/pip install torch==2.13.0 numpy omegaconf
    /work/torchenv/bin/python tools/make_checkpoint_fixtures.py [--out tests/data/checkpoints]

Writes to the output folder:
- `lightning_like.ckpt`: `torch.save` of a dict shaped like a PyTorch Lightning checkpoint of a
  NuRec-style model (Gaussian node tensors, a background texture, `_extra_state`, optimizer
  state), with the awkward cases: fp16 and bf16, a transposed view, a sliced view with a storage
  offset, a stepped slice, an expanded (stride 0) view, two tensors over one storage, an
  nn.Parameter, 0-d tensors, bool/uint8/int8/int16/int32/int64/uint16/float64, a tensor and a
  Parameter with Python attributes, and a torch.Size, torch.device, bytes and a set;
- `expected.npz`: every tensor of it as numpy (bf16 widened to float32), keyed by its path
  (`state_dict/<name>`, `optimizer_states/0/state/0/exp_avg`, ...);
- `gaussian_scene.ckpt` / `gaussian_scene.npz`: a complete small NuRec model (a static and a rigid
  layer, a sky, per-layer `_extra_state`) as NuRec training saves it, and its tensors;
- `malicious.ckpt`: torch's zip layout around a pickle whose object reduces to
  `os.system('touch /tmp/nurec_pwned')`; a safe reader must refuse it without running it;
- `omegaconf_hparams.ckpt` (when omegaconf is installed): hyper_parameters as an OmegaConf
  DictConfig, plus a pathlib path and a numpy scalar, as Hydra-configured Lightning runs save.

It also checks that `tools/torch_zip.py`'s writer output reads back identically through
`torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import pickle
import sys
from collections import OrderedDict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_zip

N = 40  # Gaussians in the background node
M = 12  # Gaussians in the dynamic rigids node
S = 8  # background texture size


def _lightning_like() -> dict:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    bg = "model.gaussians_nodes.background"
    dyn = "model.gaussians_nodes.dynamic_rigids"
    base = rand(5, 7)
    row = rand(10)
    shared = rand(10)
    sd = OrderedDict()
    sd[f"{bg}.positions"] = rand(N, 3)
    sd[f"{bg}.rotations"] = rand(N, 4)
    sd[f"{bg}.scales"] = rand(N, 3)
    sd[f"{bg}.densities"] = rand(N, 1)
    sd[f"{bg}.features_albedo"] = rand(N, 3)
    sd[f"{bg}.features_specular"] = rand(N, 45)
    sd[f"{bg}.n_active_features"] = torch.tensor(3, dtype=torch.int64)
    sd[f"{dyn}.positions"] = rand(M, 3)
    sd[f"{dyn}.gaussian_cuboid_ids"] = torch.tensor([0] * 7 + [1] * 5, dtype=torch.int32)
    sd["model.background.textures"] = rand(1, 6, S, S, 3)
    sd["model._extra_state"] = {"obj_track_ids": {"dynamic_rigids": ["7@seq", "9@seq"]}}
    sd["model.aux.half"] = rand(4, 3).half()
    sd["model.aux.bf16"] = rand(6).bfloat16()
    sd["model.aux.transposed"] = base.t()
    sd["model.aux.sliced"] = base[2:4]
    sd["model.aux.stepped"] = row[1::3]
    sd["model.aux.expanded"] = torch.arange(3.0).expand(4, 3)
    sd["model.aux.shared_a"] = shared[:6].view(2, 3)
    sd["model.aux.shared_b"] = shared[6:]
    sd["model.aux.param"] = torch.nn.Parameter(rand(2, 2))
    sd["model.aux.scalar"] = torch.tensor(3.25)
    sd["model.aux.mask"] = rand(5) > 0
    sd["model.aux.u8"] = torch.tensor([0, 7, 255], dtype=torch.uint8)
    sd["model.aux.i8"] = torch.tensor([-128, 0, 127], dtype=torch.int8)
    sd["model.aux.i16"] = torch.tensor([-32768, 1, 32767], dtype=torch.int16)
    sd["model.aux.u16"] = torch.tensor([0, 1, 65535], dtype=torch.uint16)
    sd["model.aux.f64"] = rand(3).double()
    sd["model.aux.empty"] = torch.zeros(0, 3)
    tagged = rand(3)
    tagged.tag = "python attribute"  # saved through torch._tensor._rebuild_from_type_v2
    sd["model.aux.tagged"] = tagged
    tagged_param = torch.nn.Parameter(rand(2))
    tagged_param.tag = 7  # saved through torch._utils._rebuild_parameter_with_state
    sd["model.aux.tagged_param"] = tagged_param
    optimizer_state = {
        "state": {
            i: {"step": torch.tensor(1200.0), "exp_avg": rand(N, 3), "exp_avg_sq": rand(N, 3).abs()} for i in range(2)
        },
        "param_groups": [
            {
                "lr": 1e-3,
                "betas": (0.9, 0.999),
                "eps": 1e-15,
                "weight_decay": 0.0,
                "amsgrad": False,
                "name": "positions",
                "params": [0, 1],
            }
        ],
    }
    return {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": sd,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': None}": {
                "best_model_score": torch.tensor(0.5),
                "best_model_path": "",
            }
        },
        "optimizer_states": [optimizer_state],
        "lr_schedulers": [{"base_lrs": [1e-3], "last_epoch": 1200, "_step_count": 1201}],
        "hyper_parameters": {},
        "misc": {
            "size": torch.Size([2, 3]),
            "device": torch.device("cpu"),
            "raw": b"ab",
            "ids": {1, 2},
        },
    }


def _flatten_tensors(obj, path: str, out: dict[str, np.ndarray]) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        out[path] = (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten_tensors(v, f"{path}/{k}" if path else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten_tensors(v, f"{path}/{i}", out)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/nurec_pwned",))


def _malicious_pickle() -> bytes:
    return pickle.dumps({"epoch": 0, "state_dict": OrderedDict(w=_Evil())}, protocol=2)


def _check_writer() -> None:
    """torch_zip's output must read back identically through torch.load(weights_only=True)."""
    base = np.arange(20, dtype=np.float32)
    obj = {
        "state_dict": OrderedDict(
            a=np.arange(6, dtype=np.float32).reshape(2, 3),
            h=np.linspace(-2, 2, 5).astype(np.float16),
            z=np.array(7, np.int64),
            i=np.array([-1, 2], np.int32),
            b=np.array([True, False]),
            u8=np.array([0, 255], np.uint8),
            u16=np.array([1, 65535], np.uint16),
            e=np.zeros((0, 3), np.float32),
            v1=torch_zip.TensorView(base, (2, 3), (1, 2), 4),
            v2=torch_zip.TensorView(base, (5,), (1,), 0),
            p=torch_zip.Parameter(np.ones((2, 2), np.float64)),
            extra={"ids": ["7@seq"], "t": (1, 2.5, None), "raw": b"\x00\xff", "empty": b""},
        ),
        "epoch": 3,
        "big": 2**70,
    }
    buf = io.BytesIO()
    torch_zip.write_checkpoint(buf, obj)
    buf.seek(0)
    got = torch.load(buf, weights_only=True)
    sd, want = got["state_dict"], obj["state_dict"]
    assert list(sd) == list(want), (list(sd), list(want))
    for k, v in want.items():
        if isinstance(v, np.ndarray):
            assert sd[k].numpy().dtype == v.dtype and np.array_equal(sd[k].numpy(), v), k
    assert sd["v1"].tolist() == [[4.0, 6.0, 8.0], [5.0, 7.0, 9.0]] and sd["v2"].tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]
    assert sd["v1"].untyped_storage().data_ptr() == sd["v2"].untyped_storage().data_ptr()
    assert isinstance(sd["p"], torch.nn.Parameter) and sd["p"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert sd["extra"] == want["extra"] and got["epoch"] == 3 and got["big"] == 2**70
    print("torch_zip writer: torch.load(weights_only=True) reads it back identically")


def _gaussian_scene() -> dict:
    """A complete small NuRec model as NuRec training saves it (float32, `model.` keys): a static layer of
    64 Gaussians 4-9 m in front of the origin along +x, a rigid layer of 8 on one track, a sky cubemap,
    per-layer `_extra_state` (26.4.111) and the track list. Every value is float16-representable, so a
    `.nurec` payload (float16) of the same values is exactly the same model."""
    g = torch.Generator().manual_seed(7)

    def f16(*shape, lo=-1.0, hi=1.0):
        return (lo + (hi - lo) * torch.rand(*shape, generator=g)).half().float()

    sd = OrderedDict()
    for name, n in (("background", 64), ("dynamic_rigids", 8)):
        pre = f"model.gaussians_nodes.{name}."
        pos = f16(n, 3, lo=-1.5, hi=1.5)
        if name == "background":
            pos[:, 0] = f16(n, lo=4.0, hi=9.0)
        sd[pre + "positions"] = pos
        sd[pre + "rotations"] = f16(n, 4)
        sd[pre + "scales"] = f16(n, 3, lo=-2.5, hi=-1.0)
        sd[pre + "densities"] = f16(n, 1, lo=0.0, hi=3.0)
        sd[pre + "features_albedo"] = f16(n, 3, lo=0.1, hi=0.9)
        sd[pre + "features_specular"] = f16(n, 45, lo=-0.05, hi=0.05)
        sd[pre + "_extra_state"] = {"n_active_features": 3}
        if name == "dynamic_rigids":
            sd[pre + "gaussian_cuboid_ids"] = torch.zeros(n, dtype=torch.int32)
    sd["model.background.textures"] = f16(1, 6, 4, 4, 3, lo=0.2, hi=0.8)
    sd["model._extra_state"] = {"obj_track_ids": {"dynamic_rigids": ["5@clipgt-fixture"]}}
    return {
        "epoch": 1,
        "global_step": 10,
        "pytorch-lightning_version": "2.5.1",
        "state_dict": sd,
        "load_in_place": False,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "..", "tests", "data", "checkpoints"),
    )
    args = ap.parse_args()
    out = os.path.normpath(args.out)
    os.makedirs(out, exist_ok=True)
    print(f"torch {torch.__version__}")
    _check_writer()

    ckpt = _lightning_like()
    path = os.path.join(out, "lightning_like.ckpt")
    torch.save(ckpt, path)
    reloaded = torch.load(path, weights_only=True)
    expected: dict[str, np.ndarray] = {}
    _flatten_tensors(reloaded, "", expected)
    np.savez(os.path.join(out, "expected.npz"), **expected)

    scene = _gaussian_scene()
    torch.save(scene, os.path.join(out, "gaussian_scene.ckpt"))
    arrays = {k: v.numpy() for k, v in scene["state_dict"].items() if isinstance(v, torch.Tensor)}
    np.savez(os.path.join(out, "gaussian_scene.npz"), **arrays)

    pkl = _malicious_pickle()
    torch_zip.write_archive(os.path.join(out, "malicious.ckpt"), pkl, {}, archive_name="malicious")

    try:
        from omegaconf import OmegaConf
    except ImportError:
        print("omegaconf not installed: omegaconf_hparams.ckpt not written")
    else:
        cfg = OmegaConf.create({"model": {"n_features": 3, "lr": 1e-3, "nodes": ["background", "road"]}})
        torch.save(
            {
                "state_dict": OrderedDict(w=torch.ones(2)),
                "hyper_parameters": cfg,
                "dirpath": pathlib.PurePosixPath("/runs/a"),
                "score": np.float64(0.25),
            },
            os.path.join(out, "omegaconf_hparams.ckpt"),
        )

    total = 0
    for name in sorted(os.listdir(out)):
        size = os.path.getsize(os.path.join(out, name))
        total += size
        print(f"wrote {os.path.join(out, name)} ({size} bytes)")
    print(f"{len(expected)} tensors in expected.npz; {total} bytes in all")


if __name__ == "__main__":
    main()
