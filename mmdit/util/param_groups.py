"""Param-path patterns -> training groups: which params train and at what learning rate.

A **param path** is the ``/``-joined Flax path of one leaf of the train state's ``params``:
``dit/params/blocks/audio/attn/to_q/kernel``, ``dit/params/video/head/proj/bias``,
``text_encoder/params/token_embed/embedding`` (``mmdit.config_spec.param_paths(cfg)`` lists a
config's). Patterns are ``fnmatch`` patterns over the whole path (``*`` also matches ``/``), so
``dit/params/blocks/video/*`` is every block param of the video stream and ``*/norm*`` every norm.

The rules (``config.train``, validated by :mod:`mmdit.config_spec`):

* a param **trains** iff it matches a ``train.trainable`` pattern (default ``("*",)``) and no
  ``train.freeze`` pattern (default ``()``): **freeze wins** where both match;
* its **learning-rate multiplier** is that of the *last* ``train.lr_groups`` pattern matching it
  (later entries override earlier ones, so ``{"*": 0.1, "dit/params/blocks/audio/*": 1.0}`` reads
  "everything at 0.1x except the audio blocks"); 1.0 where none matches;
* every pattern must match at least one param, and at least one param must train: a typo is an
  error naming the field and listing what the paths look like, never a silently frozen model.

:func:`tree_labels` gives every param its optax label (:data:`FROZEN` or :func:`lr_label` of its
multiplier) for ``optax.multi_transform``; boxed trees (``nn.Partitioned``) are labelled per box.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Iterable

import jax
from flax.core import meta

from mmdit.util.converted import path_str

FROZEN = "frozen"


def lr_label(multiplier: float) -> str:
    """The optax label of the params trained at ``multiplier`` × the learning rate."""
    return f"lr_x{float(multiplier)!r}"


def _is_box(x) -> bool:
    return isinstance(x, meta.AxisMetadata)


def param_paths(tree) -> list[str]:
    """``/``-joined paths of ``tree``'s leaves (an ``nn.Partitioned`` box counts as one leaf)."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]]


def path_examples(paths: Iterable[str], depth: int = 4, limit: int = 8) -> str:
    """A few patterns covering ``paths``, grouped by their first ``depth`` components
    (``'dit/params/blocks/audio/*'``), for error messages."""
    groups = list(dict.fromkeys("/".join(p.split("/")[:depth]) + ("/*" if p.count("/") >= depth else "") for p in paths))
    more = f" ... ({len(groups) - limit} more)" if len(groups) > limit else ""
    return ", ".join(repr(g) for g in groups[:limit]) + more


@dataclasses.dataclass(frozen=True)
class ParamGroups:
    """``train.trainable`` / ``train.freeze`` / ``train.lr_groups`` (module docstring)."""

    trainable: tuple[str, ...] = ("*",)
    freeze: tuple[str, ...] = ()
    lr_groups: tuple[tuple[str, float], ...] = ()  # (pattern, multiplier), in config order

    @property
    def is_default(self) -> bool:
        """Everything trains at 1x: the optimizer is the plain (ungrouped) one."""
        return self.trainable == ("*",) and not self.freeze and all(m == 1.0 for _, m in self.lr_groups)

    @property
    def multipliers(self) -> tuple[float, ...]:
        """Every multiplier a param can get (1.0 always included)."""
        return tuple(sorted({1.0, *(float(m) for _, m in self.lr_groups)}))

    def trains(self, path: str) -> bool:
        hit = lambda pats: any(fnmatch.fnmatchcase(path, p) for p in pats)  # noqa: E731
        return hit(self.trainable) and not hit(self.freeze)

    def multiplier(self, path: str) -> float:
        m = 1.0
        for pattern, mult in self.lr_groups:
            if fnmatch.fnmatchcase(path, pattern):
                m = float(mult)
        return m

    def label(self, path: str) -> str:
        return lr_label(self.multiplier(path)) if self.trains(path) else FROZEN

    def check(self, paths: Iterable[str]) -> None:
        """Raises ``ValueError`` naming the field if a pattern matches none of ``paths`` or no
        param is left trainable."""
        paths = list(paths)
        fields = [("train.trainable", p) for p in self.trainable] + [("train.freeze", p) for p in self.freeze]
        fields += [("train.lr_groups", p) for p, _ in self.lr_groups]
        for field, pattern in fields:
            if not any(fnmatch.fnmatchcase(x, pattern) for x in paths):
                raise ValueError(
                    f"{field} pattern {pattern!r} matches no param of this model ({len(paths)} params; paths look like "
                    f"{path_examples(paths)}); fix {field} (fnmatch over the '/'-joined path, e.g. 'dit/params/blocks/video/*')"
                )
        if not any(self.trains(x) for x in paths):
            raise ValueError(
                f"train.trainable={self.trainable} with train.freeze={self.freeze} leaves no param trainable "
                "(freeze wins where both match); narrow train.freeze or widen train.trainable"
            )


def tree_labels(tree, groups: ParamGroups, *, check: bool = True):
    """A tree like ``tree`` (boxes as leaves) of optax labels: :data:`FROZEN` or :func:`lr_label`.
    ``check`` runs :meth:`ParamGroups.check` on the tree's paths first."""
    if check:
        groups.check(param_paths(tree))
    return jax.tree_util.tree_map_with_path(lambda p, _: groups.label(path_str(p)), tree, is_leaf=_is_box)


def frozen_mask(tree, groups: ParamGroups):
    """A tree like ``tree`` (boxes as leaves) of Python bools, True where the param is frozen."""
    return jax.tree_util.tree_map_with_path(lambda p, _: not groups.trains(path_str(p)), tree, is_leaf=_is_box)


def select(mask, if_true, if_false):
    """Leafwise ``if_true if mask else if_false`` over trees shaped like ``mask`` (static bools)."""
    return jax.tree.map(lambda m, a, b: a if m else b, mask, if_true, if_false)
