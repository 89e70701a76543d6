"""Rigid poses as pytree dataclasses (jnp), and the start/end pose pairs of an exposure or spin."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nurec_jax import math as nmath


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pose:
    """A rigid transform child -> parent: p_parent = R(quat) p_child + trans.

    Attributes:
      quat: (..., 4) rotation, (w, x, y, z), unit norm.
      trans: (..., 3) translation, metres.
    """

    quat: jax.Array
    trans: jax.Array

    @staticmethod
    def from_matrix(m) -> "Pose":
        m = jnp.asarray(m)
        return Pose(nmath.matrix_to_quat(m[..., :3, :3]), m[..., :3, 3])

    @staticmethod
    def identity(dtype=jnp.float32) -> "Pose":
        return Pose(jnp.array([1.0, 0.0, 0.0, 0.0], dtype), jnp.zeros(3, dtype))

    def rotation(self) -> jax.Array:
        return nmath.quat_to_matrix(self.quat)

    def as_matrix(self) -> jax.Array:
        r = self.rotation()
        top = jnp.concatenate([r, self.trans[..., :, None]], axis=-1)
        bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0], r.dtype), top.shape[:-2] + (1, 4))
        return jnp.concatenate([top, bottom], axis=-2)

    def apply(self, p: jax.Array) -> jax.Array:
        return jnp.einsum("...ij,...j->...i", self.rotation(), p) + self.trans

    def rotate(self, v: jax.Array) -> jax.Array:
        return jnp.einsum("...ij,...j->...i", self.rotation(), v)

    def inverse(self) -> "Pose":
        qi = nmath.quat_conjugate(nmath.quat_normalize(self.quat))
        return Pose(qi, -nmath.rotate(qi, self.trans))

    def compose(self, other: "Pose") -> "Pose":
        """self ∘ other: apply `other` first."""
        return Pose(nmath.quat_multiply(self.quat, other.quat), self.apply(other.trans))

    def perturb(self, delta: jax.Array) -> "Pose":
        """Right-perturbation by a 6-vector [translation (child frame), rotation vector]."""
        d = Pose(nmath.so3_exp(delta[..., 3:]), delta[..., :3])
        return self.compose(d)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PosePair:
    """Poses at the start and end of an exposure (or a lidar spin)."""

    start: Pose
    end: Pose

    @staticmethod
    def constant(pose: Pose) -> "PosePair":
        return PosePair(pose, pose)

    @staticmethod
    def from_matrices(start, end=None) -> "PosePair":
        s = Pose.from_matrix(start)
        return PosePair(s, s if end is None else Pose.from_matrix(end))

    def at(self, tau: jax.Array) -> Pose:
        """Pose at relative time tau in [0, 1]: lerp translation, slerp rotation. Broadcasts over tau."""
        tau = jnp.asarray(tau)
        q = nmath.slerp(self.start.quat, self.end.quat, tau)
        t = self.start.trans + tau[..., None] * (self.end.trans - self.start.trans)
        return Pose(q, t)
