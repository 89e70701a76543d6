"""Server-side actor editing (edit_assets / restore_model_parameters, docs/wire.md#asset-editing).

Unlike NRE, whose edits live in the one backend instance that served the call (and silently vanish
with several backends or after an eviction), edits here belong to the scene as the server holds it:
`SceneEditor` keeps each scene's accumulated `ActorEdits` next to the registry, every RPC sees the
edited metadata, and every render gets the edited scene view, rebuilt from the unedited cached scene
when that is reloaded. An edit is validated and its scene view built before anything is committed, so
a failed edit changes nothing.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from nurec_jax import assets as assets_lib
from nurec_jax import geometry
from nurec_jax.actor_edits import ActorEdits, Placement, apply_edits, edited_metadata
from nurec_jax.errors import SceneFormatError
from nurec_jax.metadata import SceneMetadata, Track
from nurec_jax.scene import Scene
from nurec_jax.server import convert
from nurec_jax.server.request_errors import MAX_ID_CHARS, PermissionDenied, check_id, quoted

MAX_PATH_CHARS = 4096  # longest .ply path an asset id may be (Linux PATH_MAX)


class EditError(ValueError):
    """An edit request that cannot be applied (reported in-band: success=false)."""


def _size(msg, owner, field: str) -> np.ndarray | None:
    """An AABB field -> (3,) dims, or None when absent or all zero."""
    if not owner.HasField(field.rsplit(".", 1)[-1]):
        return None
    d = np.array([msg.size_x, msg.size_y, msg.size_z], np.float64)
    if np.all(d == 0):
        return None
    if not np.all(np.isfinite(d)) or np.any(d <= 0):
        raise EditError(f"{field}: sizes must be positive and finite, got {d.tolist()}")
    return d


def _trajectory(msg, field: str) -> tuple[np.ndarray, np.ndarray]:
    if not msg.poses:
        raise EditError(f"{field}: a new track needs at least one pose")
    ts = np.array([p.timestamp_us for p in msg.poses], np.int64)
    if np.any(np.diff(ts) <= 0):
        raise EditError(f"{field}: timestamps must strictly increase")
    mats = []
    for i, p in enumerate(msg.poses):
        try:
            mats.append(geometry.pose7_xyzw_to_matrix(convert.grpc_pose_to_tquat(p.pose, f"{field}.poses[{i}].pose")))
        except ValueError as e:
            raise EditError(str(e)) from None
    return ts, np.stack(mats)


class SceneEditor:
    """Per-scene edits and the edited views of loaded scenes.

    Assets come from the scene's own bank, or (a `.ply` path) from files below `asset_dir` only: a
    path is resolved (symlinks included) before the containment check, and a path outside it, or
    any path when `asset_dir` is None, is PERMISSION_DENIED with the same message whether or not
    the file exists."""

    def __init__(self, registry, max_asset_bytes: int = 1 << 30, asset_dir: str | None = None):
        self.registry = registry
        self.max_asset_bytes = max_asset_bytes
        self.asset_dir = None if asset_dir is None else os.path.realpath(os.path.expanduser(asset_dir))
        self._lock = threading.Lock()
        self._edit_lock = threading.Lock()  # one edit at a time: each builds on the one before
        self._edits: dict[str, ActorEdits] = {}
        self._views: dict[str, tuple[int, Scene]] = {}  # scene id -> (id of the unedited scene, view)
        self._assets: dict[tuple[str, str], assets_lib.Asset] = {}

    # ------------------------------------------------------------------------------------------
    # Views used by every RPC

    def edits(self, scene_id: str) -> ActorEdits:
        with self._lock:
            return self._edits.get(scene_id, ActorEdits())

    def metadata(self, scene_id: str) -> SceneMetadata:
        """The scene's metadata with its edits (raises the registry's NotFound for unknown ids)."""
        return edited_metadata(self.registry.metadata(scene_id), self.edits(scene_id))

    def view(self, scene_id: str, scene: Scene) -> Scene:
        """The edited view of an unedited cached `scene` (the scene itself when there are no edits)."""
        with self._lock:
            edits = self._edits.get(scene_id)
            cached = self._views.get(scene_id)
        if edits is None:
            return scene
        if cached is not None and cached[0] == id(scene.gaussians):
            return cached[1]
        view = apply_edits(scene, edits)
        with self._lock:
            if self._edits.get(scene_id) is edits:
                self._views[scene_id] = (id(scene.gaussians), view)
        return view

    def forget_view(self, scene_id: str) -> None:
        """Drops a cached view (its scene left the model cache: free the device memory it holds)."""
        with self._lock:
            self._views.pop(scene_id, None)

    # ------------------------------------------------------------------------------------------
    # Edits

    def _asset(self, scene_id: str, asset_id: str, field: str) -> assets_lib.Asset:
        path = self.registry.entry(scene_id).path
        key = (path, asset_id)
        with self._lock:
            if key in self._assets:
                return self._assets[key]
        try:
            asset = assets_lib.load_bank_asset(path, asset_id, self.max_asset_bytes)
        except KeyError:
            if not asset_id.lower().endswith(".ply"):
                bank = assets_lib.bank_ids(self.registry.metadata(scene_id).members)
                raise EditError(
                    f"{field}: no asset {quoted(asset_id)} in the scene's asset bank {bank} (and not a .ply path)"
                ) from None
            file = self._asset_file(asset_id, field)
            try:
                asset = assets_lib.load_ply_asset(file, self.max_asset_bytes)
            except FileNotFoundError:
                raise EditError(f"{field}: no asset file {quoted(asset_id)} in --asset-dir") from None
            except (OSError, ValueError, SceneFormatError) as e:
                raise EditError(f"{field}: asset file {quoted(asset_id)}: {str(e)[:300]}") from None
        except SceneFormatError as e:
            raise EditError(f"{field}: {e}") from None
        with self._lock:
            self._assets[key] = asset
        return asset

    def _asset_file(self, asset_id: str, field: str) -> str:
        """The resolved file of a `.ply` asset id, which must lie below --asset-dir (relative ids are
        taken relative to it). Raises PermissionDenied otherwise, never saying whether the file exists."""
        if self.asset_dir is None:
            raise PermissionDenied(
                f"{field}: {quoted(asset_id)}: this server reads no asset files (start "
                "serve-grpc with --asset-dir to allow .ply assets from a directory)"
            )
        try:
            real = os.path.realpath(os.path.join(self.asset_dir, asset_id))  # an absolute id replaces the dir
            inside = os.path.commonpath([self.asset_dir, real]) == self.asset_dir
        except ValueError:  # a NUL byte, or nothing in common
            inside = False
        if not inside:
            raise PermissionDenied(
                f"{field}: {quoted(asset_id)} is not below --asset-dir; asset files are only read from there"
            )
        return real

    def _placement(self, scene_id: str, asset_id: str, size, owner, field: str) -> Placement:
        if not asset_id or asset_id == "none":
            raise EditError(f"{field}: an asset id (asset bank id or .ply path) is required")
        check_id(asset_id, field, MAX_PATH_CHARS if asset_id.lower().endswith(".ply") else MAX_ID_CHARS)
        asset = self._asset(scene_id, asset_id, field)
        dims = _size(size, owner, f"{field.rsplit('.', 1)[0]}.object_size")
        if dims is None:
            if not asset.dims_listed and asset_id.lower().endswith(".ply"):
                raise EditError(f"{field.rsplit('.', 1)[0]}.object_size: required for a .ply path")
            dims = asset.dims
        return Placement(asset, dims)

    def parse(self, request) -> ActorEdits:
        """Validates an EditAssetsRequest against the scene as currently edited."""
        sid = request.scene_id
        meta = self.metadata(sid)
        replaced: dict = {}
        for i, r in enumerate(request.replace):
            f = f"replace[{i}]"
            check_id(r.original_id, f"{f}.original_id")
            if r.original_id not in meta.tracks:
                raise EditError(f"{f}.original_id: no track {quoted(r.original_id)} in scene {quoted(sid)}")
            if r.original_id in replaced:
                raise EditError(f"{f}.original_id: track {quoted(r.original_id)} is replaced twice in one request")
            replaced[r.original_id] = self._placement(sid, r.replacement_id, r.object_size, r, f"{f}.replacement_id")
        inserted: dict = {}
        for i, t in enumerate(request.insert):
            f = f"insert[{i}]"
            if not t.id:
                raise EditError(f"{f}.id: empty")
            check_id(t.id, f"{f}.id")
            if "@" in t.id:
                raise EditError(f"{f}.id: {quoted(t.id)} must not contain '@'")
            if t.id in meta.tracks or t.id in inserted:
                raise EditError(f"{f}.id: track {quoted(t.id)} already exists")
            check_id(t.semantic_class, f"{f}.semantic_class")
            ts, mats = _trajectory(t.trajectory, f"{f}.trajectory")
            p = self._placement(sid, t.asset_id, t.object_size, t, f"{f}.asset_id")
            label = t.semantic_class or p.asset.label or "automobile"
            inserted[t.id] = (Track(t.id, label, "DYNAMIC|CONTROLLABLE", ts, mats, np.asarray(p.dims)), p)
        if not replaced and not inserted:
            raise EditError("the request has no replace or insert actions")
        return ActorEdits(replaced, inserted)

    def edit(self, request, loaded: Scene | None) -> ActorEdits:
        """Applies an edit request; `loaded` is the unedited cached scene, if loaded (its view is built
        before committing). Raises EditError (nothing changed) when the edit is invalid."""
        sid = request.scene_id
        with self._edit_lock:
            new = self.edits(sid).merged(self.parse(request))
            view = None
            if loaded is not None:
                try:
                    view = apply_edits(loaded, new)
                except (ValueError, SceneFormatError) as e:
                    raise EditError(str(e)) from None
            with self._lock:
                self._edits[sid] = new
                if view is not None:
                    self._views[sid] = (id(loaded.gaussians), view)
                else:
                    self._views.pop(sid, None)
        return new

    def restore(self, scene_id: str) -> None:
        """Undoes every edit of the scene."""
        with self._edit_lock, self._lock:
            self._edits.pop(scene_id, None)
            self._views.pop(scene_id, None)

    def edited_scene_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._edits)


def describe(edits: ActorEdits) -> str:
    parts = [
        f"replaced {quoted(tid)} with {quoted(p.asset.asset_id)} ({'x'.join(f'{d:.2f}' for d in p.dims)} m)"
        for tid, p in edits.replaced.items()
    ]
    parts += [f"inserted {quoted(tid)} ({quoted(p.asset.asset_id)})" for tid, (_, p) in edits.inserted.items()]
    return "; ".join(parts)
