"""Actor edits: replace a track's Gaussians with an asset, insert new tracks drawn with an asset.

An `ActorEdits` value is pure data (host numpy); `apply_edits` turns an unedited scene into the edited
one (new dynamic layer and track list; the static layers are shared, not copied) and
`edited_metadata` gives the matching metadata (replaced tracks get the asset's size, inserted tracks
appear with their trajectories). Replaced tracks keep their index in `track_ids`, inserted ones are
appended, so actor poses keep their order.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import numpy as np

from nurec_jax.assets import Asset, fit_to_size
from nurec_jax.metadata import SceneMetadata, Track
from nurec_jax.scene import Scene
from nurec_jax.types import Gaussians


@dataclasses.dataclass(frozen=True)
class Placement:
    """An asset drawn at a given cuboid size."""

    asset: Asset
    dims: np.ndarray  # (3,) target [length, width, height]

    def gaussians(self) -> Gaussians:
        return fit_to_size(self.asset.gaussians, self.asset.dims, self.dims)


@dataclasses.dataclass(frozen=True)
class ActorEdits:
    """Every edit applied to a scene: original track id -> placement, new track id -> (track, placement)."""

    replaced: Mapping[str, Placement] = dataclasses.field(default_factory=dict)
    inserted: Mapping[str, tuple[Track, Placement]] = dataclasses.field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.replaced and not self.inserted

    def merged(self, later: "ActorEdits") -> "ActorEdits":
        """These edits followed by `later` ones (a later replacement of the same track wins)."""
        replaced = dict(self.replaced)
        inserted = dict(self.inserted)
        for tid, p in later.replaced.items():
            if tid in inserted:  # replacing an inserted track's asset
                inserted[tid] = (dataclasses.replace(inserted[tid][0], dims=p.dims), p)
            else:
                replaced[tid] = p
        inserted.update(later.inserted)
        return ActorEdits(replaced, inserted)

    def asset_of(self, track_id: str) -> str | None:
        if track_id in self.replaced:
            return self.replaced[track_id].asset.asset_id
        if track_id in self.inserted:
            return self.inserted[track_id][1].asset.asset_id
        return None


def edited_metadata(meta: SceneMetadata, edits: ActorEdits) -> SceneMetadata:
    """`meta` (unedited) with the edits: a replaced track takes the asset's size and keeps its cuboid's
    floor (its poses move up by half the height difference, so a truck replacing a car stands on the
    road instead of sinking into it); inserted tracks are added."""
    if edits.empty:
        return meta
    tracks = dict(meta.tracks)
    for tid, p in edits.replaced.items():
        t = tracks[tid]
        lift = np.eye(4)
        lift[2, 3] = 0.5 * (float(p.dims[2]) - float(t.dims[2]))
        tracks[tid] = dataclasses.replace(
            t, dims=np.asarray(p.dims, np.float64), T_object_world=t.T_object_world @ lift
        )
    for tid, (track, _) in edits.inserted.items():
        tracks[tid] = track
    return dataclasses.replace(meta, tracks=tracks)


def _host(g: Gaussians) -> Gaussians:
    return Gaussians(*(np.asarray(x) for x in (g.means, g.quats, g.scales, g.opacities, g.sh)), g.sh_degree)


def apply_edits(scene: Scene, edits: ActorEdits) -> Scene:
    """The edited scene (device arrays), from the unedited `scene`."""
    if edits.empty:
        return scene
    sg = scene.gaussians
    track_ids = list(sg.track_ids)
    dyn_track = np.asarray(sg.dynamic_track)
    replaced_idx = [track_ids.index(t) for t in edits.replaced if t in track_ids]
    keep = ~np.isin(dyn_track, replaced_idx)
    parts = [_host(sg.dynamic).take(np.flatnonzero(keep))]
    tracks = [dyn_track[keep]]
    for tid, p in edits.replaced.items():
        if tid not in track_ids:  # a recorded track drawn without Gaussians gets some now
            track_ids.append(tid)
        g = p.gaussians()
        parts.append(g)
        tracks.append(np.full(g.count, track_ids.index(tid), np.int32))
    for tid, (_, p) in edits.inserted.items():
        track_ids.append(tid)
        g = p.gaussians()
        parts.append(g)
        tracks.append(np.full(g.count, len(track_ids) - 1, np.int32))
    dynamic = Gaussians.concatenate(parts)
    intensity = None
    if sg.dynamic_intensity is not None:  # assets carry no lidar feature: NaN selects the colour fallback
        added = sum(p.count for p in parts[1:])
        intensity = np.concatenate([np.asarray(sg.dynamic_intensity)[keep], np.full(added, np.nan, np.float32)])
    device = next(iter(sg.static.means.devices())) if isinstance(sg.static.means, jax.Array) else None
    new = jax.device_put(
        dict(dynamic=dynamic, dynamic_track=np.concatenate(tracks).astype(np.int32), dynamic_intensity=intensity),
        device,
    )
    gaussians = dataclasses.replace(sg, track_ids=tuple(track_ids), **new)
    return dataclasses.replace(scene, gaussians=gaussians, metadata=edited_metadata(scene.metadata, edits))
