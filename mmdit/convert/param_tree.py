"""Placing converted tensors into our nested params, each checked against our module's abstract shapes.

Every family maps a reference tensor name to a path of ours and a tensor in our layout; what remains
is the same for all: the path must exist in our module, the shape must match, nothing may be left
out. :func:`abstract_shapes` gets our module's ``{path: shape}`` without computing anything, and
:class:`ParamTree` enforces the rest with errors that name the tensor and the directory.
"""

from __future__ import annotations

import numpy as np

from mmdit.convert.source import ConvertError, cast


def abstract_shapes(module, *example) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{param path: shape}`` of ``module.init(key, *example)["params"]`` (``jax.eval_shape``: no compute).
    ``example``: arrays or ``jax.ShapeDtypeStruct`` inputs."""
    import flax.linen as nn
    import jax
    from flax import traverse_util

    shapes = jax.eval_shape(lambda *x: module.init(jax.random.PRNGKey(0), *x), *example)
    return {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(nn.unbox(shapes)["params"]).items()}


class ParamTree:
    """Collects ``{"params": ...}`` for a module whose abstract shapes are ``want``.

    ``where`` names the source (its directory) and ``what`` our module, both for error messages."""

    def __init__(self, want: dict[tuple[str, ...], tuple[int, ...]], *, where: str, what: str, dtype):
        self.want, self.where, self.what, self.dtype = want, where, what, dtype
        self.params: dict = {}
        self.seen: set[tuple[str, ...]] = set()

    def put(self, name: str, path: tuple[str, ...], x: np.ndarray) -> None:
        """Places tensor ``name`` (already in our layout) at ``path``, cast to the target dtype."""
        if path not in self.want:
            raise ConvertError(f"{self.where}: tensor {name!r} maps to {'/'.join(path)}, which our {self.what} does not have")
        if tuple(x.shape) != self.want[path]:
            raise ConvertError(
                f"{self.where}: tensor {name!r} has shape {x.shape} after conversion, ours {self.want[path]} "
                "(config.json does not describe these weights)"
            )
        node = self.params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = cast(x, self.dtype)
        self.seen.add(path)

    def missing(self) -> list[tuple[str, ...]]:
        return sorted(set(self.want) - self.seen)

    def finish(self, hint: str = "the checkpoint is incomplete") -> dict:
        """``{"params": nested}``; raises :class:`ConvertError` if any of our params got no tensor."""
        missing = self.missing()
        if missing:
            raise ConvertError(f"{self.where}: {len(missing)} weight(s) missing, e.g. {'/'.join(missing[0])}; {hint}")
        return {"params": self.params}
