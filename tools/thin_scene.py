"""A light copy of the sample scene for server tests and load scripts: every k-th Gaussian of each
layer, enlarged so surfaces stay closed, same cameras, trajectory and tracks, optionally under
another scene id."""

from __future__ import annotations

import gzip
import io
import zipfile

import msgpack
import numpy as np
import yaml

from nurec_jax import data


def _thin_state(state: dict, keep_every: int) -> None:
    layers = {k.split(".")[2] for k in state if k.startswith(".gaussians_nodes.")}
    for layer in layers:
        pre = f".gaussians_nodes.{layer}."
        n = state[pre + "positions.shape"][0]
        for key in [k for k in state if k.startswith(pre) and k.endswith(".shape")]:
            shape = state[key]
            base = key[: -len(".shape")]
            if not shape or shape[0] != n or not isinstance(state.get(base), bytes):
                continue
            row = len(state[base]) // n
            rows = np.frombuffer(state[base], np.uint8).reshape(n, row)[::keep_every]
            state[base] = rows.tobytes()
            state[key] = [len(rows)] + list(shape[1:])
        # Fewer, larger Gaussians: log-scales grow by log(sqrt(k)).
        s = np.frombuffer(state[pre + "scales"], "<f2").astype(np.float32) + 0.5 * np.log(keep_every)
        state[pre + "scales"] = s.astype("<f2").tobytes()


def write_thin_scene(path, keep_every: int = 25, scene_id: str | None = None) -> str:
    with zipfile.ZipFile(data.sample_scene_path()) as z:
        members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    out = []
    for name, blob in members:
        if name.endswith(".nurec"):
            doc = msgpack.unpackb(gzip.decompress(blob), raw=False, strict_map_key=False)
            _thin_state(doc["nre_data"]["state_dict"], keep_every)
            blob = gzip.compress(msgpack.packb(doc, use_bin_type=True), compresslevel=1)
        elif name == "metadata.yaml" and scene_id is not None:
            meta = yaml.safe_load(blob)
            meta["scene_id"] = scene_id
            blob = yaml.safe_dump(meta, sort_keys=False).encode()
        out.append((name, blob))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, blob in out:
            z.writestr(name, blob)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return str(path)
