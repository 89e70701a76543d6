"""NuRec training checkpoints (`checkpoint.ckpt` + `parsed_config.yaml`) as a model state.

By default NuRec's training writes no `.nurec` payload into its `last.usdz`: the Gaussians are in
`checkpoint.ckpt`, a PyTorch Lightning checkpoint whose `state_dict` holds the model's tensors
under `model.`-prefixed keys (`model.gaussians_nodes.<layer>.positions`, `model._extra_state`,
`model.background.textures`, `model.post_processings.<i>.ppisp.*`, ...), usually in float32
(float16 when the artifact was written with fp16 on). They are the same tensors, with the same
pre-activation convention, that the `.nurec` payload stores under `.`-prefixed keys (the payload
is written from this state dict with the `model` prefix dropped), so this module only renames
keys and hands the result to `payload.decode_state`. The layer config the payload would carry is
the `model` section of the Hydra config `parsed_config.yaml` (`model.layers.<layer>...`,
`model.background`, `model.post_processing`).

The checkpoint is read by `torch_checkpoint` (a restricted unpickler; nothing in the file runs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from nurec_jax.archive import Archive, check_zip_members
from nurec_jax.errors import SceneFormatError
from nurec_jax.payload import Payload, StateSource, decode_state
from nurec_jax.torch_checkpoint import LazyTensor, load_checkpoint, state_dict_arrays

CHECKPOINT_MEMBER = "checkpoint.ckpt"
CONFIG_MEMBER = "parsed_config.yaml"
_CONFIG_LIMIT = 8 << 20  # a real parsed_config.yaml is tens of KB; bounded (while inflating) before parsing
_MODEL_PREFIX = "model."


class CheckpointState(StateSource):
    """A Lightning state dict under payload keys: `model.<key>` becomes `.<key>`."""

    def __init__(self, state_dict: Mapping[str, Any], where: str):
        keys = [k for k in state_dict if isinstance(k, str)]
        if any(k.startswith(_MODEL_PREFIX) for k in keys):
            keys = [k for k in keys if k.startswith(_MODEL_PREFIX)]
            entries = {"." + k[len(_MODEL_PREFIX) :]: state_dict[k] for k in keys}
        else:
            entries = {"." + k: state_dict[k] for k in keys}
        super().__init__(entries, where)

    def keys(self) -> list[str]:
        return list(self.entries)

    def array(self, key: str) -> np.ndarray:
        value = self.entries.get(key)
        torch_key = _MODEL_PREFIX + key[1:]
        if value is None:
            raise SceneFormatError(f"{self.where}: tensor {torch_key!r} is missing")
        if not isinstance(value, LazyTensor):
            raise SceneFormatError(f"{self.where}: {torch_key!r} is not a tensor ({type(value).__name__})")
        return value.numpy()

    def value(self, key: str, default: Any = None) -> Any:
        value = self.entries.get(key, default)
        return default if isinstance(value, LazyTensor) else value


def read_model_config(archive: Archive, notes: list[str]) -> tuple[Mapping[str, Any], str]:
    """(the `model` section of `parsed_config.yaml`, its `version`), or ({}, "") with a note when the
    member is absent."""
    where = f"{archive.name}:{CONFIG_MEMBER}"
    if not archive.has(CONFIG_MEMBER):
        notes.append(
            f"no {CONFIG_MEMBER}: layer settings taken from the tensors alone (default activations, "
            "SH degree from the stored width, 3DGS colour convention)"
        )
        return {}, ""
    doc = archive.read_yaml(CONFIG_MEMBER, getattr(archive, "max_yaml_bytes", _CONFIG_LIMIT))
    if not isinstance(doc, Mapping):
        raise SceneFormatError(f"{where}: top level must be a mapping")
    model = doc.get("model")
    if model is None:
        model = doc if "layers" in doc else {}
    if not isinstance(model, Mapping):
        raise SceneFormatError(f"{where}: 'model' must be a mapping")
    return model, str(doc.get("version", "") or "")


def _check_inner_zip(f, archive: Archive, where: str, max_bytes: int) -> None:
    import zipfile

    start = f.tell()
    size = f.seek(0, 2)
    f.seek(start)
    try:
        inner = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return  # load_checkpoint says what is wrong with it
    try:
        limits = dataclasses.replace(
            archive.limits,
            member_bytes=min(max_bytes, archive.limits.member_bytes),
            total_bytes=max(0, archive.limits.total_bytes - archive.inflated + size),
        )
        # (the container's own bytes were counted when it was opened; its members are those bytes)
        check_zip_members(inner, limits, where, size)
    finally:
        f.seek(start)


def decode_checkpoint(archive: Archive, max_bytes: int) -> Payload:
    """Decodes the archive's `checkpoint.ckpt` (with `parsed_config.yaml`) like a `.nurec` payload."""
    where = f"{archive.name}:{CHECKPOINT_MEMBER}"
    notes: list[str] = []
    config, version = read_model_config(archive, notes)
    with archive.open(CHECKPOINT_MEMBER, max_bytes) as f:
        # The checkpoint's own reader stops at each inner member's declared size, so checking the inner
        # headers against what is left of the archive's limits bounds what it inflates.
        _check_inner_zip(f, archive, where, max_bytes)
        obj = load_checkpoint(f, where=where, max_member_bytes=max_bytes)
        state = state_dict_arrays(obj)
        if not isinstance(state, Mapping) or not state:
            raise SceneFormatError(f"{where}: no state_dict in the checkpoint")
        config_where = f"{archive.name}:{CONFIG_MEMBER}: model" if config else None
        payload = decode_state(CheckpointState(state, where), config, version, where, config_where)
    if notes:
        payload = dataclasses.replace(payload, notes=tuple(notes) + payload.notes)
    return payload
