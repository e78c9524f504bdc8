"""Helpers for families whose target scans its layers (``nn.scan``: one param per layer kind with a
leading layer axis): fill a preallocated ``[num_layers, ...]`` array one source tensor at a time, so
peak memory stays at the output plus one source tensor (no list of per-layer copies to stack)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from mmdit.convert.source import ConvertError


def stack_layers(src, names: Callable[[int], str], num_layers: int, dtype, fn: Callable[[np.ndarray], np.ndarray] = lambda a: a):
    """``[num_layers, *fn(src.get(names(i))).shape]`` in ``dtype``: layer ``i`` from tensor ``names(i)``
    through ``fn`` (e.g. a transpose). ConvertError naming the first missing tensor."""
    out = None
    for i in range(num_layers):
        name = names(i)
        if name not in src:
            raise ConvertError(
                f"{src.directory}: tensor {name!r} is missing (layer {i} of {num_layers}); the checkpoint is incomplete"
            )
        a = fn(src.get(name))
        if out is None:
            out = np.empty((num_layers, *a.shape), dtype)
        elif a.shape != out.shape[1:]:
            raise ConvertError(
                f"{src.directory}: tensor {name!r} has shape {a.shape} after mapping, layer 0's is {out.shape[1:]}"
            )
        out[i] = a.astype(dtype)
    return out


def get(src, name: str, dtype, fn: Callable[[np.ndarray], np.ndarray] = lambda a: a, shape: tuple | None = None) -> np.ndarray:
    """One tensor through ``fn`` in ``dtype``; ConvertError naming it when missing or (``shape``) mis-shaped."""
    if name not in src:
        raise ConvertError(f"{src.directory}: tensor {name!r} is missing; the checkpoint is incomplete or another model")
    a = fn(src.get(name))
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ConvertError(
            f"{src.directory}: tensor {name!r} has shape {tuple(a.shape)} after mapping, the config implies {tuple(shape)}"
        )
    return np.asarray(a, dtype)
