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
from mmdit.model.derived_conditions import check_derived_conditions
from mmdit.model.streams import StreamSpec, aligned_times, build_streams, time_reference

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload")
# model.prediction: the heads predict the velocity ``v = noise - x0`` directly, or the clean tokens ``x0`` (JiT's
# x-prediction), turned into ``v = (x_sigma - x0) / max(sigma, X0_MIN_SIGMA)`` inside the model (mmdit.model.mmdit)
PREDICTIONS = ("velocity", "x0")
X0_MIN_SIGMA = 0.05

# The keep-name of cross-stream attention (``model.joint_guidance``): ``cond_keep[JOINT_KEEP]`` False confines a
# sample's tokens to their own stream in every layer, so dropout and CFG can treat the partner stream as a condition.
JOINT_KEEP = "joint"


@dataclasses.dataclass(frozen=True)
class ConditionArch:
    """A cross-attended condition sequence (text, reference audio, windowed audio features)."""

    name: str
    dim: int  # input feature dim
    length: int  # tokens per sample (for shapes / FLOPs)
    rate: float | None = None  # tokens per second, needed by windowed cross-attention
    window: float | None = None  # aligned-time window (reference latent frames); None = full
    embedding: str = "mlp"  # "mlp": Linear-GELU(tanh)-Linear (Wan's text_embedder); "norm_mlp": Wan's image_embedder
    added_to: str | None = None  # attended inside that condition's cross-attention (Wan I2V's add_k_proj/add_v_proj)
    # TalkingMachines' speaking/silence mode: where the clip is silent (input ``speaking_frames`` 0) a learned
    # embedding replaces this condition's embedded tokens; ``silence_labels``: training records carry the labels.
    silence_embedding: bool = False
    silence_labels: bool = False
    face_local: bool = False  # grid streams attend it only from tokens inside the clip's ``face_box``
    derived: str | None = None  # computed from the model's own tokens, never an input (mmdit.model.derived_conditions)


@dataclasses.dataclass(frozen=True)
class StreamArch:
    """One stream of the model: its token geometry (:class:`~mmdit.model.streams.StreamSpec`: shape, patch,
    channels, tokens, times) plus the transformer widths and the conditions it cross-attends."""

    geometry: StreamSpec
    dim: int
    ffn: int
    cross: tuple[str, ...]  # conditions this stream cross-attends (outputs summed)
    time_factor: float | None = None
    concat: tuple[str, ...] = ()  # per-token conditions concatenated to the tokens before the patch embedding
    key_frame_embedding: bool = False  # a learned vector added to the stream's first temporal token position

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
    time_reference: str | None = None  # the stream whose latent frames are the unit of aligned time
    joint_guidance: bool = False  # keep-name JOINT_KEEP switches cross-stream attention per sample (model.joint_guidance)
    prediction: str = "velocity"  # what the output heads predict (model.prediction; the model returns velocities)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.streams)

    @property
    def generated(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.streams if not s.geometry.condition)

    @property
    def keep_names(self) -> tuple[str, ...]:
        """What condition dropout and CFG can drop (the step's ``cond_keep`` keys): the conditions,
        then the condition streams, then ``JOINT_KEEP`` with ``model.joint_guidance`` (no embedding, no
        params: False makes that sample's streams attend only within themselves in every layer)."""
        names = tuple(c.name for c in self.conditions) + tuple(s.name for s in self.streams if s.geometry.condition)
        return names + ((JOINT_KEEP,) if self.joint_guidance else ())

    def added_condition(self, host: str) -> str | None:
        """The condition attended inside ``host``'s cross-attention (``model.conditions.*.added_to``), or None."""
        return next((c.name for c in self.conditions if c.added_to == host), None)

    def attended(self, arch: StreamArch) -> tuple[str, ...]:
        """Every condition a stream attends: its ``cross`` conditions, then the ones added to them."""
        extra = tuple(g for g in (self.added_condition(c) for c in arch.cross) if g is not None)
        return arch.cross + extra

    @property
    def reference_frames(self) -> int:
        """Latent frames of the time-reference stream (the length of the ``speaking_frames`` input)."""
        return int(self.stream(self.time_reference).geometry.shape[0])

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


EMBEDDINGS = ("mlp", "norm_mlp")


def _check_condition_roles(model_cfg, conditions, streams) -> None:
    """Validates the opt-in Wan I2V roles: ``embedding``, ``added_to`` (a condition attended inside another's
    cross-attention) and ``model.streams.*.concat`` (per-token conditions concatenated to a stream's tokens)."""
    by_name = {c.name: c for c in conditions}
    concat = {n: tuple(model_cfg.streams[n].get("concat", ())) for n in streams}
    cross = {c for n in streams for c in model_cfg.streams[n].get("cross", ())}
    for c in conditions:
        field = f"model.conditions.{c.name}"
        if c.embedding not in EMBEDDINGS:
            raise ValueError(f"{field}.embedding={c.embedding!r}: choose one of {EMBEDDINGS}")
        if c.added_to is None:
            continue
        host = by_name.get(c.added_to)
        if host is None or host.added_to is not None or c.added_to == c.name:
            raise ValueError(
                f"{field}.added_to={c.added_to!r} must name another cross-attended condition of model.conditions "
                f"({sorted(n for n in by_name if n != c.name)}) that is not itself added to one"
            )
        if [o.name for o in conditions if o.added_to == c.added_to] != [c.name]:
            raise ValueError(f"{field}.added_to: condition {c.added_to!r} takes at most one added condition")
        if c.name in cross or any(c.name in v for v in concat.values()):
            raise ValueError(f"{field} is added_to {c.added_to!r}: remove it from model.streams.*.cross / concat")
        if c.window is not None:
            raise ValueError(f"{field}: an added condition attends in full; remove `window`")
        if c.added_to not in cross:
            raise ValueError(f"{field}.added_to={c.added_to!r}: no stream cross-attends it; add it to model.streams.*.cross")
    for name, names in concat.items():
        for c in names:
            field = f"model.streams.{name}.concat"
            if c not in by_name:
                raise ValueError(f"{field} names condition {c!r}, which is not in model.conditions ({sorted(by_name)})")
            if c in cross or by_name[c].added_to is not None:
                raise ValueError(f"{field}: condition {c!r} is concatenated, so it cannot also be cross-attended / added_to")
            if by_name[c].length != streams[name].num_tokens:
                raise ValueError(
                    f"model.conditions.{c}.length={by_name[c].length}: a condition concatenated to stream {name!r} has one "
                    f"feature vector per token, so its length must be the stream's {streams[name].num_tokens} tokens"
                )


# Per-clip inputs of the silence embedding and face-local masks (mmdit.model.inputs): reserved names.
AUX_INPUTS = ("speaking_frames", "face_box")


def _check_silence_and_face(model_cfg, conditions, streams) -> None:
    """Validates ``model.conditions.*.silence_embedding`` / ``silence_labels`` / ``face_local``: both act on a
    cross-attended condition; silence needs the condition's ``rate`` (to map its tokens to frames) and face-local
    a grid (video) stream attending it."""
    cross = {n: tuple(model_cfg.streams[n].get("cross", ())) for n in streams}
    for c in conditions:
        field = f"model.conditions.{c.name}"
        if c.name in AUX_INPUTS:
            raise ValueError(f"{field}: the name {c.name!r} is a reserved input field ({AUX_INPUTS}); rename the condition")
        attended_by = [n for n, names in cross.items() if c.name in names]
        if c.silence_labels and not c.silence_embedding:
            raise ValueError(f"{field}.silence_labels=True needs {field}.silence_embedding=True")
        if c.silence_embedding:
            if not attended_by:
                raise ValueError(
                    f"{field}.silence_embedding: the silence embedding replaces a cross-attended condition's tokens, "
                    f"but no model.streams.*.cross names {c.name!r}; add it there (a twin audio stream expresses "
                    "silence through its own latents: give silent audio as known tokens, e.g. --inpaint)"
                )
            if c.rate is None:
                raise ValueError(f"{field}.silence_embedding needs {field}.rate (tokens/second) to map its tokens to frames")
        if c.face_local:
            grids = [n for n in attended_by if streams[n].kind == "grid"]
            if not grids:
                raise ValueError(
                    f"{field}.face_local=True restricts a video (grid) stream's cross-attention to the face box, but no "
                    f"grid stream cross-attends {c.name!r} (model.streams.*.cross); remove face_local or add it"
                )


def _resolve_impl(impl: str, fallback, rule, platform: str, dtype: str, field: str) -> tuple[str, str | None]:
    """``model.attention.<field>`` -> (impl, fallback); ``"auto"`` picks per platform, mask rule and dtype
    (:func:`mmdit.attention.registry.resolve_auto`), announced once per process."""
    if impl != "auto":
        return impl, fallback
    chosen, auto_fallback = attention_registry.resolve_auto(rule, platform, dtype)
    fallback = fallback if fallback is not None else auto_fallback
    attention_registry.announce(
        f"model.attention.{field}='auto' -> {chosen!r} (fallback {fallback!r}) for platform {platform!r}, mask {rule}, dtype {dtype}"
    )
    return chosen, fallback


def build_spec(model_cfg, platform: str | None = None) -> ModelSpec:
    """``platform``: the backend ``model.attention.impl="auto"`` resolves for (default:
    :func:`mmdit.attention.registry.platform`; ``mmdit-plan`` passes its target's)."""
    streams = build_streams(model_cfg)
    heads = int(model_cfg.heads)
    head_dim = model_cfg.get("head_dim", None)
    conditions = []
    for name, c in model_cfg.get("conditions", {}).items():
        dim, length = c.get("dim", None), c.get("length", None)
        if c.get("derived", None) is not None:  # unset dim/length: those of the stream it is concatenated to
            host = next((n for n in streams if name in tuple(model_cfg.streams[n].get("concat", ()))), None)
            if host is not None:
                dim = streams[host].token_dim if dim is None else dim
                length = streams[host].num_tokens if length is None else length
            else:  # no host stream: check_derived_conditions names the missing concat
                dim, length = dim or 0, length or 0
        if dim is None or length is None:
            raise ValueError(f"model.conditions.{name}: set `dim` and `length` (features per position, positions)")
        conditions.append(
            ConditionArch(
                name=name,
                dim=int(dim),
                length=int(length),
                rate=c.get("rate", None),
                window=c.get("window", None),
                embedding=c.get("embedding", "mlp"),
                added_to=c.get("added_to", None),
                silence_embedding=bool(c.get("silence_embedding", False)),
                silence_labels=bool(c.get("silence_labels", False)),
                face_local=bool(c.get("face_local", False)),
                derived=c.get("derived", None),
            )
        )
        if c.get("window", None) is not None and c.get("rate", None) is None:
            raise ValueError(f"model.conditions.{name}: a windowed condition needs `rate` (tokens/second)")
    cond_names = [c.name for c in conditions]
    _check_condition_roles(model_cfg, conditions, streams)
    _check_silence_and_face(model_cfg, conditions, streams)
    check_derived_conditions(model_cfg, conditions, streams)
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
        key_frame = s.get("key_frame_embedding", False)
        if not isinstance(key_frame, bool):
            raise ValueError(f"model.streams.{name}.key_frame_embedding={key_frame!r}: use True or False")
        if key_frame and (spec.kind != "grid" or spec.condition):
            raise ValueError(
                f"model.streams.{name}.key_frame_embedding=True: only a generated grid (video) stream has a key frame; "
                "remove it from this stream"
            )
        archs.append(StreamArch(spec, dim, int(s.ffn), cross, s.get("time_factor", None), tuple(s.get("concat", ())), key_frame))
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
    platform = platform or attention_registry.platform()  # never starts the backend (multi-host init order)
    dtype_name = model_cfg.get("dtype", "float32")
    impl, fallback = _resolve_impl(att.get("impl", "xla"), att.get("fallback", None), rule, platform, dtype_name, "impl")
    opts = AttentionOptions(
        impl=impl,
        fallback=fallback,
        block_q=int(att.get("block_q", 128)),
        block_k=int(att.get("block_k", 128)),
        interpret=bool(att.get("interpret", False)),
    )
    attention_registry.get(opts.impl)  # unknown impl -> error naming the field
    cross_impl, cross_fallback = _resolve_impl(
        att.get("cross_impl", "xla"), None, masks.Full(), platform, dtype_name, "cross_impl"
    )
    attention_registry.get(cross_impl)
    cross_opts = dataclasses.replace(opts, impl=cross_impl, fallback=cross_fallback)
    for field, name in (("dtype", model_cfg.get("dtype", "float32")), ("param_dtype", model_cfg.get("param_dtype", "float32"))):
        if name not in _DTYPES:
            raise ValueError(f"model.{field}={name!r}: choose one of {list(_DTYPES)}")
    sp = model_cfg.get("sequence_parallel", "none")
    if sp not in ("none", "ulysses", "ring"):
        raise ValueError(f"model.sequence_parallel={sp!r}: choose 'none', 'ulysses' or 'ring'")
    joint_guidance = bool(model_cfg.get("joint_guidance", False))
    prediction = model_cfg.get("prediction", "velocity")
    if prediction not in PREDICTIONS:
        raise ValueError(f"model.prediction={prediction!r}: choose one of {PREDICTIONS}")
    clash = [n for n in list(streams) + cond_names if n == JOINT_KEEP]
    if joint_guidance and clash:
        raise ValueError(
            f"model.joint_guidance=True reserves the keep-name {JOINT_KEEP!r} (cross-stream attention), but a stream or "
            f"condition is named {JOINT_KEEP!r}; rename it"
        )
    if joint_guidance and len(streams) < 2:
        raise ValueError(
            f"model.joint_guidance=True switches cross-stream attention, but the model has one stream ({list(streams)}); "
            "set model.joint_guidance=False"
        )
    spec = ModelSpec(
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
        time_reference=time_reference(model_cfg, streams).name,
        joint_guidance=joint_guidance,
        prediction=prediction,
    )
    if joint_guidance and not spec.joint_layers:
        raise ValueError(
            "model.joint_guidance=True switches the cross-stream attention of the joint layers, but "
            "model.joint_layers is empty; give joint layers or set model.joint_guidance=False"
        )
    return spec
