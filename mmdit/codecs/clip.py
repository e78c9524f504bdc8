"""Decoded frames in [-1, 1] to playable uint8 frames."""

from __future__ import annotations

import numpy as np


def to_uint8(frames) -> np.ndarray:
    """Frames in [-1, 1] -> uint8 in [0, 255] (rounded)."""
    return np.clip((np.asarray(frames, np.float32) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
