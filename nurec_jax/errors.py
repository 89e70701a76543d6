"""Exceptions raised while reading scene files."""

from __future__ import annotations


class SceneFormatError(ValueError):
    """A scene file is malformed; the message names the file or member and what is wrong."""


class UnsupportedSceneError(SceneFormatError, NotImplementedError):
    """A scene file is well-formed but uses a feature nurec-jax does not support."""
