"""The static, validated model description built from ``config.model``.

Every config error is raised here, before anything is traced, with the field and the fix.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from mmdit.attention import masks
from mmdit.attention import registry as attention_registry
from mmdit.attention.registry import AttentionOptions
from mmdit.model.streams import StreamSpec, aligned_times, build_streams, time_reference

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload")


@dataclasses.dataclass(frozen=True)
class ConditionArch:
    """A cross-attended condition sequence (text, reference audio, windowed audio features)."""

    name: str
    dim: int  # input feature dim
    length: int  # tokens per sample (for shapes / FLOPs)
    rate: float | None = None  # tokens per second, needed by windowed cross-attention
    window: float | None = None  # aligned-time window (reference latent frames); None = full


@dataclasses.dataclass(frozen=True)
class StreamArch:
    """One stream of the model: its token geometry (:class:`~mmdit.model.streams.StreamSpec`: shape, patch,
    channels, tokens, times) plus the transformer widths and the conditions it cross-attends."""

    geometry: StreamSpec
    dim: int
    ffn: int
    cross: tuple[str, ...]  # conditions this stream cross-attends (outputs summed)
    time_factor: float | None = None

    @property
    def name(self) -> str:
        return self.geometry.name


@dataclasses.dataclass(frozen=True, eq=False)
class ModelSpec:
    streams: tuple[StreamArch, ...]
    conditions: tuple[ConditionArch, ...]
    num_layers: int
    heads: int
    head_dim: int
    joint_layers: tuple[int, ...]
    rule: masks.Rule
    chunk_frames: float | None  # reference latent frames per causal chunk (None: one chunk)
    rope_theta: float
    freq_dim: int
    eps: float
    dtype: object
    param_dtype: object
    remat: str
    scan: bool
    attention: AttentionOptions
    cross_attention: AttentionOptions
    times: Mapping[str, np.ndarray]  # aligned token times per stream
    reference_rate: float  # latents/s of the time-reference stream (the unit of aligned time)
    sequence_parallel: str = "none"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.streams)

    @property
    def generated(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.streams if not s.geometry.condition)

    @property
    def keep_names(self) -> tuple[str, ...]:
        """What condition dropout and CFG can drop (the step's ``cond_keep`` keys): the conditions,
        then the condition streams."""
        return tuple(c.name for c in self.conditions) + tuple(s.name for s in self.streams if s.geometry.condition)

    def stream(self, name: str) -> StreamArch:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(f"no stream {name!r}; streams are {self.names}")

    def condition(self, name: str) -> ConditionArch:
        for c in self.conditions:
            if c.name == name:
                return c
        raise KeyError(f"no condition {name!r}; conditions are {[c.name for c in self.conditions]}")

    @property
    def num_tokens(self) -> int:
        return sum(s.geometry.num_tokens for s in self.streams)

    def layer_is_joint(self) -> np.ndarray:
        flags = np.zeros(self.num_layers, bool)
        flags[list(self.joint_layers)] = True
        return flags


def _joint_layers(value, num_layers: int) -> tuple[int, ...]:
    if value in ("all", None):
        return tuple(range(num_layers))
    if isinstance(value, str):
        raise ValueError(f"model.joint_layers={value!r}: use 'all' or a tuple of layer indices")
    layers = tuple(int(i) for i in value)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"model.joint_layers has index(es) {bad} outside [0, {num_layers}) (model.num_layers="
            f"{num_layers}); remove them or raise model.num_layers"
        )
    return tuple(sorted(set(layers)))


def build_spec(model_cfg) -> ModelSpec:
    streams = build_streams(model_cfg)
    heads = int(model_cfg.heads)
    head_dim = model_cfg.get("head_dim", None)
    conditions = []
    for name, c in model_cfg.get("conditions", {}).items():
        conditions.append(
            ConditionArch(
                name=name,
                dim=int(c.dim),
                length=int(c.length),
                rate=c.get("rate", None),
                window=c.get("window", None),
            )
        )
        if c.get("window", None) is not None and c.get("rate", None) is None:
            raise ValueError(f"model.conditions.{name}: a windowed condition needs `rate` (tokens/second)")
    cond_names = [c.name for c in conditions]
    archs = []
    for name, spec in streams.items():
        if name == "blocks" or name in cond_names:
            raise ValueError(
                f"model.streams.{name}: the name clashes with the param tree ('blocks') or a condition; rename the stream"
            )
        s = model_cfg.streams[name]
        dim = int(s.dim)
        if head_dim is None and dim % heads:
            raise ValueError(
                f"model.streams.{name}.dim={dim} is not divisible by model.heads={heads}; pick a dim "
                f"that is a multiple of the heads or set model.head_dim"
            )
        cross = tuple(s.get("cross", ()))
        for c in cross:
            if c not in cond_names:
                raise ValueError(
                    f"model.streams.{name}.cross names condition {c!r}, which is not in "
                    f"model.conditions ({cond_names}); add it there or remove it from the stream"
                )
        archs.append(StreamArch(spec, dim, int(s.ffn), cross, s.get("time_factor", None)))
    if head_dim is None:
        dims = {a.dim for a in archs}
        if len(dims) > 1:
            raise ValueError(
                f"streams have different dims {sorted(dims)}: set model.head_dim so that every "
                f"stream attends in the same heads x head_dim space"
            )
        head_dim = archs[0].dim // heads
    head_dim = int(head_dim)
    if head_dim % 2:
        raise ValueError(f"head dim {head_dim} (model.heads={heads}) must be even for RoPE")
    num_layers = int(model_cfg.num_layers)
    rule = masks.parse_rule(model_cfg.get("mask", "full"), "model.mask")
    rule.validate(list(streams), "model.mask")
    remat = model_cfg.get("remat", "none")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat={remat!r}: choose one of {REMAT_POLICIES}")
    att = model_cfg.get("attention", {})
    opts = AttentionOptions(
        impl=att.get("impl", "xla"),
        fallback=att.get("fallback", None),
        block_q=int(att.get("block_q", 128)),
        block_k=int(att.get("block_k", 128)),
        interpret=bool(att.get("interpret", False)),
    )
    attention_registry.get(opts.impl)  # unknown impl -> error naming the field
    cross_opts = dataclasses.replace(opts, impl=att.get("cross_impl", "xla"), fallback=None)
    for field, name in (("dtype", model_cfg.get("dtype", "float32")), ("param_dtype", model_cfg.get("param_dtype", "float32"))):
        if name not in _DTYPES:
            raise ValueError(f"model.{field}={name!r}: choose one of {list(_DTYPES)}")
    sp = model_cfg.get("sequence_parallel", "none")
    if sp not in ("none", "ulysses", "ring"):
        raise ValueError(f"model.sequence_parallel={sp!r}: choose 'none', 'ulysses' or 'ring'")
    return ModelSpec(
        streams=tuple(archs),
        conditions=tuple(conditions),
        num_layers=num_layers,
        heads=heads,
        head_dim=head_dim,
        joint_layers=_joint_layers(model_cfg.get("joint_layers", "all"), num_layers),
        rule=rule,
        chunk_frames=model_cfg.get("chunk_frames", None),
        rope_theta=float(model_cfg.get("rope_theta", 10000.0)),
        freq_dim=int(model_cfg.get("freq_dim", 256)),
        eps=float(model_cfg.get("eps", 1e-6)),
        dtype=_DTYPES[model_cfg.get("dtype", "float32")],
        param_dtype=_DTYPES[model_cfg.get("param_dtype", "float32")],
        remat=remat,
        scan=bool(model_cfg.get("scan", True)),
        attention=opts,
        cross_attention=cross_opts,
        times=aligned_times(model_cfg, streams),
        reference_rate=time_reference(model_cfg, streams).rate,
        sequence_parallel=sp,
    )
