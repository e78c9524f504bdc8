"""Attention masks as predicates over token metadata.

Every token in a joint self-attention sequence carries metadata (:class:`TokenMeta`): which stream it
belongs to, its aligned time (video-latent-frame units), its causal chunk, whether it is known
(clean: a condition, a reference frame, an already generated chunk) and whether it is valid (not
padding, not an absent stream). A mask *rule* is a predicate over a (query, key) pair of metadata.
Rules compose with ``&`` and ``|`` and are written in configs as strings, e.g.
``"chunk_causal & no_peek"`` or ``"local(2) | same_stream"``.

One predicate feeds every consumer:

* :func:`dense_mask` -- the boolean ``[B, Sq, Sk]`` mask (reference attention, tests);
* :func:`block_map` -- per (q-block, k-block): ``EMPTY`` / ``PARTIAL`` / ``FULL`` (block-sparse kernels);
* kernels evaluate the same predicate in-kernel on partial blocks (:meth:`MaskSpec.kernel_mask_fn`).

The first two are ``mmdit_kernels``' own (``reference.dense_mask``, ``block_map.block_map_from_mask_fn``,
the ``EMPTY``/``PARTIAL``/``FULL`` constants) applied to :func:`mask_fn` of the predicate, so mmdit and
the kernels cannot disagree on what a mask or a tile class is.

Shapes: metadata fields are ``[B, S]`` (``B`` may be 1 to broadcast over the batch).
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from mmdit_kernels.block_map import EMPTY, FULL, PARTIAL, block_map_from_mask_fn  # noqa: F401  (masks.EMPTY ...)
from mmdit_kernels.reference import dense_mask as kernel_dense_mask


def _batch_dim(fields):
    """The broadcast batch size of ``[B or 1, S]`` fields: the first leading dim that is not 1
    (works for symbolic batch dims under ``jax.export``)."""
    for f in fields:
        d = np.shape(f)[0]
        if not (isinstance(d, (int, np.integer)) and d == 1):
            return d
    return 1


class TokenMeta(NamedTuple):
    """Per-token metadata; every field is ``[B, S]`` (or ``[1, S]``)."""

    stream: object  # int32 index into the attention's stream names
    time: object  # float32 aligned time in video-latent-frame units
    chunk: object  # int32 causal chunk index (0 when unchunked)
    known: object  # bool: clean token (condition, reference, already generated)
    valid: object  # bool: False for padding and absent streams (never attended as a key)
    group: object  # int32 attention group: only pairs within one group attend (all 0 in joint
    # layers; the stream index in per-stream layers outside ``joint_layers``)

    @staticmethod
    def concat(metas: Sequence["TokenMeta"], xp=jnp) -> "TokenMeta":
        """Concatenates along the sequence axis, broadcasting batch dims."""
        batch = _batch_dim(f for m in metas for f in m)
        fields = []
        for i in range(len(TokenMeta._fields)):
            parts = [xp.broadcast_to(m[i], (batch,) + tuple(np.shape(m[i])[1:])) for m in metas]
            fields.append(xp.concatenate(parts, axis=1))
        return TokenMeta(*fields)

    def pad_to(self, length: int, xp=jnp) -> "TokenMeta":
        """Pads the sequence axis to ``length`` with invalid tokens."""
        pad = length - int(np.shape(self.stream)[1])
        if pad < 0:
            raise ValueError(f"cannot pad {np.shape(self.stream)[1]} tokens down to {length}")
        if pad == 0:
            return self
        widths = ((0, 0), (0, pad))
        return TokenMeta(
            stream=xp.pad(self.stream, widths, constant_values=-1),
            time=xp.pad(self.time, widths),
            chunk=xp.pad(self.chunk, widths),
            known=xp.pad(self.known, widths),
            valid=xp.pad(self.valid, widths),
            group=xp.pad(self.group, widths, constant_values=-1),
        )

    def slice(self, start: int, stop: int) -> "TokenMeta":
        return TokenMeta(*(f[:, start:stop] for f in self))

    def rows(self) -> "TokenMeta":
        """Query view: ``[B, S, 1]`` for broadcasting against :meth:`cols`."""
        return TokenMeta(*(f[..., :, None] for f in self))

    def cols(self) -> "TokenMeta":
        """Key view: ``[B, 1, S]``."""
        return TokenMeta(*(f[..., None, :] for f in self))


# A bound predicate: (query meta [.., Sq, 1], key meta [.., 1, Sk]) -> bool [.., Sq, Sk].
Predicate = Callable[[TokenMeta, TokenMeta], object]


def _universal(pred, q: TokenMeta, k: TokenMeta):
    """What every mask includes besides its rule: valid keys, same attention group."""
    return pred(q, k) & k.valid & (q.group == k.group)


class Rule:
    """A mask rule over stream *names*; :meth:`bind` resolves names to stream indices."""

    def bind(self, stream_names: Sequence[str]) -> Predicate:
        raise NotImplementedError

    def streams_named(self) -> tuple[str, ...]:
        return ()

    def uses_known(self) -> bool:
        """Whether the rule restricts pairs by the ``known`` flags (plain ``no_peek`` somewhere in it):
        tasks that give a modality (tv2a, a2v) require it. Composite rules ask their parts."""
        return False

    def validate(self, stream_names: Sequence[str], field: str = "model.mask") -> None:
        missing = [s for s in self.streams_named() if s not in stream_names]
        if missing:
            raise ValueError(
                f"{field}: mask rule {self} names stream(s) {missing} but the model's streams are "
                f"{list(stream_names)}; fix the rule or add the stream to model.streams"
            )

    def __and__(self, other: "Rule") -> "Rule":
        return And(self, other)

    def __or__(self, other: "Rule") -> "Rule":
        return Or(self, other)


@dataclasses.dataclass(frozen=True)
class Full(Rule):
    """Every query attends to every (valid) key."""

    def bind(self, stream_names):
        return lambda q, k: jnp.ones(jnp.broadcast_shapes(q.stream.shape, k.stream.shape), bool)

    def __str__(self):
        return "full"


@dataclasses.dataclass(frozen=True)
class SameStream(Rule):
    """Only pairs within one stream (per-stream self-attention; layers outside ``joint_layers``)."""

    def bind(self, stream_names):
        return lambda q, k: q.stream == k.stream

    def __str__(self):
        return "same_stream"


@dataclasses.dataclass(frozen=True)
class Local(Rule):
    """JAM-Flow's localized joint attention: across streams only pairs with ``|t_q - t_k| <= window``
    (aligned time, video-latent frames); pairs within one stream are unrestricted."""

    window: float

    def bind(self, stream_names):
        w = float(self.window)
        return lambda q, k: (q.stream == k.stream) | (jnp.abs(q.time - k.time) <= w)

    def __str__(self):
        return f"local({self.window:g})"


@dataclasses.dataclass(frozen=True)
class ChunkCausal(Rule):
    """TalkingMachines' sparse causal chunks: a query in chunk c sees key chunks {0, c-1, c}."""

    def bind(self, stream_names):
        return lambda q, k: (k.chunk == 0) | (k.chunk == q.chunk) | (k.chunk == q.chunk - 1)

    def __str__(self):
        return "chunk_causal"


@dataclasses.dataclass(frozen=True)
class Causal(Rule):
    """Dense chunk causality: a query in chunk c sees every key chunk <= c."""

    def bind(self, stream_names):
        return lambda q, k: k.chunk <= q.chunk

    def __str__(self):
        return "causal"


@dataclasses.dataclass(frozen=True)
class NoPeek(Rule):
    """Known tokens (conditions, given modalities) do not attend to generated tokens, so their
    features never depend on the noise (Mirage's asymmetric attention, TV2A). With ``streams``,
    only queries of those streams are restricted, whatever their known flags."""

    streams: tuple[str, ...] = ()

    def bind(self, stream_names):
        if not self.streams:
            return lambda q, k: ~(q.known & ~k.known)
        ids = [stream_names.index(s) for s in self.streams]

        def pred(q, k):
            q_cond = _isin(q.stream, ids)
            k_cond = _isin(k.stream, ids)
            return ~q_cond | k_cond

        return pred

    def streams_named(self):
        return tuple(self.streams)

    def uses_known(self):
        return not self.streams

    def __str__(self):
        return "no_peek" if not self.streams else "no_peek(" + ", ".join(map(repr, self.streams)) + ")"


@dataclasses.dataclass(frozen=True)
class FaceLocal(Rule):
    """Face-local cross-attention (TalkingMachines): only queries inside the face region attend. The
    region travels in the *query* metadata's ``valid`` flags (``MMDiT._cross_meta`` clears them outside
    the clip's ``face_box``), so a key-independent predicate serves every consumer (dense masks, block
    maps, kernels); the model also zeroes the cross-attention output of the queries outside it."""

    def bind(self, stream_names):
        return lambda q, k: jnp.broadcast_to(q.valid, jnp.broadcast_shapes(q.valid.shape, k.valid.shape))

    def __str__(self):
        return "face_local"


def _isin(x, ids):
    out = x == ids[0]
    for i in ids[1:]:
        out = out | (x == i)
    return out


@dataclasses.dataclass(frozen=True)
class And(Rule):
    a: Rule
    b: Rule

    def bind(self, stream_names):
        pa, pb = self.a.bind(stream_names), self.b.bind(stream_names)
        return lambda q, k: pa(q, k) & pb(q, k)

    def streams_named(self):
        return self.a.streams_named() + self.b.streams_named()

    def uses_known(self):
        return self.a.uses_known() or self.b.uses_known()

    def __str__(self):
        return f"({self.a} & {self.b})"


@dataclasses.dataclass(frozen=True)
class Or(Rule):
    a: Rule
    b: Rule

    def bind(self, stream_names):
        pa, pb = self.a.bind(stream_names), self.b.bind(stream_names)
        return lambda q, k: pa(q, k) | pb(q, k)

    def streams_named(self):
        return self.a.streams_named() + self.b.streams_named()

    def uses_known(self):
        return self.a.uses_known() or self.b.uses_known()

    def __str__(self):
        return f"({self.a} | {self.b})"


_RULES: dict[str, Callable[..., Rule]] = {
    "full": Full,
    "same_stream": SameStream,
    "local": Local,
    "chunk_causal": ChunkCausal,
    "causal": Causal,
    "no_peek": lambda *streams: NoPeek(tuple(streams)),
}


def register_rule(name: str, factory: Callable[..., Rule]) -> None:
    """Adds a rule name to the config grammar (a new mask rule is one predicate + this call)."""
    _RULES[name] = factory


register_rule("face_local", FaceLocal)


def parse_rule(text: str | Rule, field: str = "model.mask") -> Rule:
    """Parses ``"chunk_causal & (local(2) | no_peek)"`` into a :class:`Rule`."""
    if isinstance(text, Rule):
        return text
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"{field}: cannot parse mask rule {text!r}: {e.msg}") from None

    def build(node):
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)):
            a, b = build(node.left), build(node.right)
            return And(a, b) if isinstance(node.op, ast.BitAnd) else Or(a, b)
        if isinstance(node, ast.Name):
            name, args = node.id, []
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            name = node.func.id
            if not all(isinstance(a, ast.Constant) for a in node.args):
                raise ValueError(f"{field}: rule arguments must be literals in {text!r}")
            args = [a.value for a in node.args]
        else:
            raise ValueError(
                f"{field}: unsupported syntax in mask rule {text!r}; use rule names {sorted(_RULES)} joined by & and |"
            )
        if name not in _RULES:
            raise ValueError(f"{field}: unknown mask rule {name!r} in {text!r}; known: {sorted(_RULES)}")
        try:
            return _RULES[name](*args)
        except TypeError as e:
            raise ValueError(f"{field}: bad arguments for mask rule {name!r}: {e}") from None

    return build(tree)


# ----------------------------------------------------------------------------------------------
# Consumers of a bound predicate.


def mask_fn(pred: Predicate) -> Callable[[tuple, tuple], object]:
    """``(q_fields, k_fields) -> bool`` over metadata tuples, the form ``mmdit_kernels`` takes: ``pred``,
    the key is valid, and query and key share a group. Fields arrive as ``[.., Sq, 1]`` / ``[.., 1, Sk]``
    (``[bq, 1]`` / ``[1, bk]`` tiles inside a kernel)."""

    def fn(qf, kf):
        q, k = TokenMeta(*qf), TokenMeta(*kf)
        return _universal(pred, q, k)

    return fn


def dense_mask(pred: Predicate, q: TokenMeta, k: TokenMeta) -> jnp.ndarray:
    """Boolean ``[B, Sq, Sk]``: ``pred``, the key is valid, and query and key share a group."""
    sq, sk = q.stream.shape[1], k.stream.shape[1]
    m = kernel_dense_mask(mask_fn(pred), tuple(q), tuple(k), sq, sk)  # [1 | B, Sq, Sk]
    batch = _batch_dim(tuple(q) + tuple(k))
    return jnp.broadcast_to(m, (batch, sq, sk))


def block_map(pred: Predicate, q: TokenMeta, k: TokenMeta, block_q: int, block_k: int) -> jnp.ndarray:
    """``int8 [B, ceil(Sq/bq), ceil(Sk/bk)]`` with EMPTY/PARTIAL/FULL per block pair.

    Sequences are padded to block multiples: padded keys are masked (so a block holding them is never
    FULL), padded query rows (index >= Sq) are "don't care"; real rows -- even of invalid tokens --
    follow the dense mask exactly. Computed one q-block row at a time (``lax.map``), so memory is
    ``O(B * block_q * Sk)`` rather than ``O(S^2)`` (``mmdit_kernels.block_map_from_mask_fn``).
    """
    sq, sk = q.stream.shape[1], k.stream.shape[1]
    return block_map_from_mask_fn(mask_fn(pred), tuple(q), tuple(k), sq, sk, block_q, block_k)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Everything an attention implementation needs to know about the mask.

    ``rule`` is the (name-level) rule, ``predicate`` the bound predicate, ``q``/``k`` the metadata.
    ``is_full`` is a static promise that every valid pair is attended (lets mask-free kernels run).
    ``num_groups`` is a static bound on the attention group ids: every query or key whose ``group``
    is outside ``[0, num_groups)`` has no attended key (the model sets it to its stream count; group ids
    are traced inside the layer scan, so kernels that split by group need the bound). ``None``: unknown.
    """

    rule: Rule
    predicate: Predicate
    q: TokenMeta
    k: TokenMeta
    is_full: bool = False
    # Optional ((block_q, block_k), int8 [B, nq, nk]) computed once outside a layer scan.
    precomputed_block_map: tuple | None = None
    num_groups: int | None = None

    @property
    def rule_is_full(self) -> bool:
        """The rule attends every pair: only key validity and group equality restrict it (cuDNN with
        sequence lengths can run it, :func:`mmdit.attention.registry.cudnn_attention`)."""
        return isinstance(self.rule, Full)

    def dense(self) -> jnp.ndarray:
        return dense_mask(self.predicate, self.q, self.k)

    def block_map(self, block_q: int, block_k: int) -> jnp.ndarray:
        if self.precomputed_block_map is not None and tuple(self.precomputed_block_map[0]) == (block_q, block_k):
            return self.precomputed_block_map[1]
        return block_map(self.predicate, self.q, self.k, block_q, block_k)

    def kernel_mask_fn(self):
        """``(q_fields, k_fields) -> bool[bq, bk]`` over metadata tuples, for in-kernel evaluation
        (fields ``[bq, 1]`` / ``[1, bk]``); includes key validity and group equality (:func:`mask_fn`)."""
        return mask_fn(self.predicate)


def make_mask_spec(rule: Rule | str, stream_names: Sequence[str], q: TokenMeta, k: TokenMeta | None = None) -> MaskSpec:
    rule = parse_rule(rule)
    rule.validate(stream_names)
    k = q if k is None else k
    return MaskSpec(rule, rule.bind(tuple(stream_names)), q, k, is_full=isinstance(rule, Full) and _attends_every_pair(q, k))


def _attends_every_pair(q: TokenMeta, k: TokenMeta) -> bool:
    """Concrete metadata with every key valid and one attention group (``is_full`` may then be set);
    traced metadata cannot promise it."""
    fields = (k.valid, q.group, k.group)
    if any(isinstance(f, jax.core.Tracer) for f in fields):
        return False
    groups = np.concatenate([np.asarray(q.group).ravel(), np.asarray(k.group).ravel()])
    return bool(np.all(np.asarray(k.valid))) and bool(np.all(groups == groups[0]))
