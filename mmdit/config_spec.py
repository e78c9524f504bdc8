"""Every config section validated once into a frozen spec (as ``build_spec`` does for ``model``).

:func:`build_run_spec` reads a whole experiment config (``configs/base.py`` declares every field
and its default) and returns a :class:`RunSpec`: ``model`` (:class:`mmdit.model.spec.ModelSpec`),
``flow``, ``tasks``, ``sample``, ``train``, ``data``, ``mesh``. Each check raises ``ValueError``
naming the field and the fix, so a bad value stops a run before anything compiles; code reads values
from these specs, never with its own ``.get(key, default)``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

import ml_collections as mlc

from mmdit import config_lib, flow
from mmdit import tasks as tasks_lib
from mmdit.codecs import registry as codec_registry
from mmdit.model import chunks
from mmdit.model.spec import JOINT_KEEP, ModelSpec, build_spec
from mmdit.parallel import axis_sizes
from mmdit.util import param_groups
from mmdit.util.param_groups import ParamGroups
from mmdit.util.plain import plain

SIGMA_DISTS = ("logit_normal", "uniform")
LR_SCHEDULES = ("cosine", "constant")
GUIDANCE_MODES = ("nested", "independent")
GUIDANCE_SCHEDULES = ("constant", "cosine")
SAMPLE_SOLVERS = ("euler", "renoise")  # mmdit.sample.ode.solver_update


_BASE = None


def complete(cfg):
    """``cfg`` with every field ``configs/base.py`` declares and ``cfg`` lacks filled in from base
    (a copy; ``cfg`` is not changed): base is the one place defaults live. A mapping keyed by names
    (``config_lib.OPEN_SECTIONS``, e.g. ``tasks``) is taken whole from ``cfg`` when it has one: base's
    names are not merged into it."""

    def fill(node: dict, base: dict, prefix: str) -> dict:
        out = dict(node)
        for k, v in base.items():
            if k not in out:
                out[k] = v
            elif isinstance(v, dict) and v and isinstance(out[k], Mapping) and prefix + k not in config_lib.OPEN_SECTIONS:
                out[k] = fill(dict(out[k]), v, prefix + k + ".")
        return out

    return mlc.ConfigDict(fill(plain(cfg), base_defaults(), ""))


def base_defaults() -> dict:
    """``configs/base.py`` as a plain dict (loaded once; callers must not modify it)."""
    global _BASE
    if _BASE is None:
        _BASE = config_lib.load("base").to_dict()
    return _BASE


def _number(section: str, name: str, value, *, lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
    field = f"{section}.{name}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (integer and not float(value).is_integer()):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{field}={value!r} must be {kind}; fix {field}")
    v = int(value) if integer else float(value)
    if not math.isfinite(v):
        raise ValueError(f"{field}={value!r} must be finite; fix {field}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{field}={value!r} must be {'>' if lo_open else '>='} {lo}; fix {field}")
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise ValueError(f"{field}={value!r} must be {'<' if hi_open else '<='} {hi}; fix {field}")
    return v


def _choice(section: str, name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{section}.{name}={value!r}: choose one of {list(choices)}")
    return value


_KEEP_NAMES = "conditions or condition streams"  # what ModelSpec.keep_names lists (plus JOINT_KEEP with the flag)


def _names(section: str, mapping, allowed, what: str) -> dict:
    out = dict(plain(mapping) or {})
    bad = [k for k in out if k not in allowed]
    if JOINT_KEEP in bad and what == _KEEP_NAMES:
        raise ValueError(
            f"{section} names {JOINT_KEEP!r} (cross-stream attention as a droppable / guidable condition), which needs "
            "model.joint_guidance=True; set it (the param tree is unchanged) or remove the entry"
        )
    if bad:
        raise ValueError(
            f"{section} names {bad}, which are not {what} of this model ({list(allowed)}); remove them or fix the names"
        )
    return out


def check_stream_shift(stream_shift, generated) -> dict[str, float]:
    """``{stream: shift}`` with every name a generated stream and every shift > 0 (``sample.stream_shift``
    or ``--stream-shift``)."""
    out = _names("sample.stream_shift (or --stream-shift)", stream_shift, generated, "generated streams")
    return {k: _number("sample.stream_shift", k, v, lo=0, lo_open=True) for k, v in out.items()}


def check_solver(solver) -> str:
    """``sample.solver`` (or a ``solver=`` override): one of :data:`SAMPLE_SOLVERS`."""
    if solver not in SAMPLE_SOLVERS:
        raise ValueError(
            f"sample.solver={solver!r}: choose one of {list(SAMPLE_SOLVERS)} (euler: the ODE; renoise: a "
            "distilled student's x0-and-fresh-noise rule)"
        )
    return solver


def normalize_guidance(scales, conditions, generated) -> dict[str, Any]:
    """``{cond: s}`` / ``{cond: {stream: s}}`` (``sample.guidance`` or ``--guidance``; order kept =
    nested order) checked against the model's guidable ``conditions`` and ``generated`` streams;
    per-stream dicts are completed with 1.0 for unnamed generated streams, scales become floats."""
    out = {}
    for c, s in _names("sample.guidance (or --guidance)", scales, conditions, _KEEP_NAMES).items():
        if isinstance(s, Mapping):
            _names(f"sample.guidance.{c} (or --guidance)", s, generated, "generated streams")
            out[c] = {n: _number(f"sample.guidance.{c}", n, s.get(n, 1.0)) for n in generated}
        else:
            out[c] = _number("sample.guidance", c, s)
    return out


def is_full_interval(interval) -> bool:
    """True when ``interval = (lo, hi)`` admits every step's σ ∈ (0, 1]: guidance is not limited."""
    lo, hi = (float(b) for b in interval)
    return lo <= 0.0 and hi >= 1.0


def check_guidance_mode_interval(mode: str, conditions, interval: tuple[float, float]) -> None:
    """``independent`` CFG over two or more conditions never evaluates the fully conditional velocity: with a
    limited ``sample.guidance_interval`` its unguided steps would get ``v_∅ + Σ_k (v_k − v_∅)`` (the composed
    experts at scale 1), not a conditional one. Refused (ValueError naming both fields)."""
    lo, hi = interval
    conditions = list(conditions)
    if mode == "independent" and len(conditions) >= 2 and not is_full_interval(interval):
        raise ValueError(
            f"sample.guidance_mode='independent' with {len(conditions)} guided conditions {conditions} and "
            f"sample.guidance_interval=({lo:g}, {hi:g}): independent CFG has no fully conditional evaluation for the "
            "unguided steps; use guidance_mode='nested', guide one condition, or the full interval (0, 1)"
        )


def check_guidance_interval(interval) -> tuple[float, float]:
    """``sample.guidance_interval`` (or ``--guidance-interval``) as ``(lo, hi)`` floats: CFG applies at the steps
    whose σ lies in ``(lo, hi]``; ValueError naming the field unless ``0 <= lo < hi``."""
    if isinstance(interval, str):
        interval = interval.replace(",", " ").split()
    try:
        lo, hi = (float(b) for b in interval)
    except (TypeError, ValueError):
        raise ValueError(
            f"sample.guidance_interval={interval!r}: give two noise levels (lo, hi), e.g. (0.5, 1.0) to guide only "
            "the steps with 0.5 < sigma <= 1"
        ) from None
    if not (0.0 <= lo < hi) or not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"sample.guidance_interval=({lo:g}, {hi:g}): need 0 <= lo < hi (sigma runs from 1 down to 0)")
    return lo, hi


def _guidance_in_order(guidance: dict, order) -> dict:
    """``guidance`` reordered by ``sample.guidance_order`` (empty: unchanged), which must list exactly its conditions."""
    order = (order,) if isinstance(order, str) else tuple(order or ())
    if not order:
        return guidance
    if sorted(order) != sorted(guidance):
        raise ValueError(
            f"sample.guidance_order={order} must list each condition of sample.guidance ({sorted(guidance)}) once, "
            "in nested-CFG order; fix it or set sample.guidance_order=() (sorted order)"
        )
    return {c: guidance[c] for c in order}


@dataclasses.dataclass(frozen=True)
class FlowSpec:
    """Training noise and loss (``config.flow``)."""

    sigma_dist: str
    sigma_mean: float
    sigma_std: float
    shift: float
    independent_streams: float
    stream_weights: Mapping[str, float]
    condition_dropout: Mapping[str, float]
    chunk_noise: str = "shared"  # flow.CHUNK_NOISE_MODES; other than "shared" only with model.chunk_frames
    silence_dropout: float = 0.0  # fraction of clips put in silence mode (flow.silence_dropout)
    first_frame_weight: float = 1.0  # loss weight of a grid stream's first temporal token position (its key frame)
    temporal_difference_weight: float = 0.0  # weight of flow.temporal_difference_loss on grid streams (0: off)


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """Sampler defaults (``config.sample``); ``guidance`` is plain (condition -> scale or
    condition -> {stream: scale})."""

    steps: int
    shift: float
    stream_shift: Mapping[str, float]
    guidance: Mapping[str, Any]
    guidance_mode: str
    guidance_schedule: str
    tasks: tuple[str, ...]
    num_per_task: int
    solver: str = "euler"  # SAMPLE_SOLVERS
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # guide the steps whose sigma is in (lo, hi]


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """The training loop and optimizer (``config.train``)."""

    steps: int
    global_batch_size: int
    lr: float
    warmup_steps: int
    schedule: str
    weight_decay: float
    grad_clip: float
    b1: float
    b2: float
    ema_decay: float
    grad_accum: int
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    sample_every: int
    async_checkpoint: bool
    init_from: str | None = None  # pretrained start: converted checkpoint / workdir / bundle (mmdit.train.init_from)
    init_from_ignore: tuple[str, ...] = ()  # fnmatch patterns of source params allowed to stay unused
    # training groups (mmdit/util/param_groups.py): param-path patterns; freeze wins over trainable
    trainable: tuple[str, ...] = ("*",)
    freeze: tuple[str, ...] = ()
    lr_groups: tuple[tuple[str, float], ...] = ()  # (pattern, lr multiplier); the last matching pattern wins

    @property
    def param_groups(self) -> ParamGroups:
        return ParamGroups(self.trainable, self.freeze, self.lr_groups)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Record data (``config.data``): ``dir`` None means ``WORKDIR/data``."""

    dir: str | None
    num_workers: int
    num_shards: int | None
    num_train: int
    num_eval: int
    examples_per_shard: int


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Mesh axis sizes (``-1``: fill the devices), DCN split and logical rules (``config.mesh``)."""

    axes: Mapping[str, int]
    dcn: Mapping[str, int] | None
    rules: tuple | None


@dataclasses.dataclass(frozen=True)
class RunSpec:
    model: ModelSpec
    flow: FlowSpec
    tasks: tuple[tuple[str, float], ...]  # (task, weight as configured; tasks.sample_tasks normalises)
    sample: SampleSpec
    train: TrainSpec
    data: DataSpec
    mesh: MeshSpec
    encoders: Mapping[str, dict] = dataclasses.field(default_factory=dict)  # encoders_spec(): configured slots only


def flow_spec(cfg, model: ModelSpec) -> FlowSpec:
    cfg = complete(cfg)
    f = cfg.flow
    weights = _names("flow.stream_weights", f.stream_weights, model.names, "streams")
    drops = _names("flow.condition_dropout", f.condition_dropout, model.keep_names, _KEEP_NAMES)
    for k, v in weights.items():
        _number("flow.stream_weights", k, v, lo=0)
    for k, v in drops.items():
        _number("flow.condition_dropout", k, v, lo=0, hi=1)
    chunk_noise = _choice("flow", "chunk_noise", f.chunk_noise, flow.CHUNK_NOISE_MODES)
    if chunk_noise != "shared" and model.chunk_frames is None:
        raise ValueError(
            f"flow.chunk_noise={chunk_noise!r} draws noise per causal chunk, but model.chunk_frames is not set; "
            "set model.chunk_frames (reference latent frames per chunk) or use flow.chunk_noise='shared'"
        )
    chunks.check_chunking(model)
    return FlowSpec(
        sigma_dist=_choice("flow", "sigma_dist", f.sigma_dist, SIGMA_DISTS),
        sigma_mean=_number("flow", "sigma_mean", f.sigma_mean),
        sigma_std=_number("flow", "sigma_std", f.sigma_std, lo=0, lo_open=True),
        shift=_number("flow", "shift", f.shift, lo=0, lo_open=True),
        independent_streams=_number("flow", "independent_streams", float(f.independent_streams), lo=0, hi=1),
        stream_weights=weights,
        condition_dropout=drops,
        chunk_noise=chunk_noise,
        silence_dropout=_silence_dropout(f.silence_dropout, model),
        first_frame_weight=_number("flow", "first_frame_weight", f.get("first_frame_weight", 1.0), lo=0, lo_open=True),
        temporal_difference_weight=_number("flow", "temporal_difference_weight", f.get("temporal_difference_weight", 0.0), lo=0),
    )


def _silence_dropout(rate, model: ModelSpec) -> float:
    rate = _number("flow", "silence_dropout", rate, lo=0, hi=1)
    if rate > 0 and not any(c.silence_embedding for c in model.conditions):
        raise ValueError(
            f"flow.silence_dropout={rate:g} trains a silence embedding, but no model.conditions.<c>.silence_embedding "
            "is set; set it on the audio condition or set flow.silence_dropout=0"
        )
    return rate


def sample_spec(cfg, model: ModelSpec, *, check_tasks: bool = True) -> SampleSpec:
    """``config.sample`` validated; ``check_tasks=False`` skips checking ``sample.tasks`` against the
    model (a sampler is told its task per call)."""
    cfg = complete(cfg)
    s = cfg.sample
    stream_shift = check_stream_shift(s.stream_shift, model.generated)
    guidance = _guidance_in_order(normalize_guidance(s.guidance, model.keep_names, model.generated), s.guidance_order)
    task_names = tuple(s.tasks) if not isinstance(s.tasks, str) else (s.tasks,)
    if not task_names:
        raise ValueError("sample.tasks is empty: name at least one task, e.g. ('t2av',)")
    unknown = [t for t in task_names if t not in tasks_lib.TASKS]
    if unknown:
        raise ValueError(f"sample.tasks names unknown task(s) {unknown}; known tasks: {sorted(tasks_lib.TASKS)}")
    try:
        if check_tasks:
            tasks_lib.validate_tasks({t: 1.0 for t in task_names}, model, cfg.model)
    except ValueError as e:
        raise ValueError(f"sample.tasks={task_names}: {str(e).replace('config.tasks', 'task')}") from None
    mode = _choice("sample", "guidance_mode", s.guidance_mode, GUIDANCE_MODES)
    interval = check_guidance_interval(s.guidance_interval)
    check_guidance_mode_interval(mode, guidance, interval)
    return SampleSpec(
        steps=_number("sample", "steps", s.steps, lo=1, integer=True),
        shift=_number("sample", "shift", s.shift, lo=0, lo_open=True),
        stream_shift=stream_shift,
        guidance=guidance,
        guidance_mode=mode,
        guidance_schedule=_choice("sample", "guidance_schedule", s.guidance_schedule, GUIDANCE_SCHEDULES),
        tasks=task_names,
        num_per_task=_number("sample", "num_per_task", s.num_per_task, lo=1, integer=True),
        solver=check_solver(s.solver),
        guidance_interval=interval,
    )


def train_spec(cfg) -> TrainSpec:
    cfg = complete(cfg)
    t = cfg.train
    n = lambda name, **kw: _number("train", name, t[name], **kw)  # noqa: E731
    spec = TrainSpec(
        steps=n("steps", lo=1, integer=True),
        global_batch_size=n("global_batch_size", lo=1, integer=True),
        lr=n("lr", lo=0, lo_open=True),
        warmup_steps=n("warmup_steps", lo=0, integer=True),
        schedule=_choice("train", "schedule", t.schedule, LR_SCHEDULES),
        weight_decay=n("weight_decay", lo=0),
        grad_clip=n("grad_clip", lo=0, lo_open=True),
        b1=n("b1", lo=0, hi=1, hi_open=True),
        b2=n("b2", lo=0, hi=1, hi_open=True),
        ema_decay=n("ema_decay", lo=0, hi=1, hi_open=True),
        grad_accum=n("grad_accum", lo=1, integer=True),
        log_every=n("log_every", lo=1, integer=True),
        checkpoint_every=n("checkpoint_every", lo=1, integer=True),
        keep_checkpoints=n("keep_checkpoints", lo=1, integer=True),
        sample_every=n("sample_every", lo=0, integer=True),
        async_checkpoint=bool(t.async_checkpoint),
        init_from=_init_from(t.get("init_from")),
        init_from_ignore=_patterns("train.init_from_ignore", t.get("init_from_ignore", ())),
        trainable=_patterns("train.trainable", t.get("trainable", ("*",))),
        freeze=_patterns("train.freeze", t.get("freeze", ())),
        lr_groups=_lr_groups(t.get("lr_groups")),
    )
    if spec.global_batch_size % spec.grad_accum:
        raise ValueError(
            f"train.global_batch_size={spec.global_batch_size} is not divisible by train.grad_accum="
            f"{spec.grad_accum}; pick a grad_accum that divides the batch"
        )
    return spec


def _init_from(value) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"train.init_from={value!r}: expected a path (converted checkpoint, workdir or bundle) or None")
    return value


def _patterns(field: str, value) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{field}={value!r}: expected a tuple of fnmatch patterns, e.g. ('dit/params/blocks/video/*',)")
    return tuple(value)


def _lr_groups(value) -> tuple[tuple[str, float], ...]:
    groups = plain(value) or {}
    if not isinstance(groups, Mapping):
        raise ValueError(f"train.lr_groups={value!r}: expected a dict param-path pattern -> lr multiplier, e.g. {{'dit/*': 0.5}}")
    return tuple((str(k), _number("train.lr_groups", str(k), v, lo=0, lo_open=True)) for k, v in groups.items())


_PARAM_PATHS: dict[str, list[str]] = {}


def param_paths(cfg) -> list[str]:
    """The ``/``-joined param paths of ``cfg``'s model (what ``train.trainable`` / ``train.freeze`` /
    ``train.lr_groups`` match; shapes only, nothing allocated; cached per model config)."""
    import jax

    from mmdit.model.diffusion import DiffusionModel

    model_cfg = complete(cfg).model
    key = model_cfg.to_json_best_effort(sort_keys=True)
    if key not in _PARAM_PATHS:
        model = DiffusionModel.from_config(complete(cfg))
        _PARAM_PATHS[key] = param_groups.param_paths(jax.eval_shape(model.init, jax.random.key(0)))
    return list(_PARAM_PATHS[key])


def data_spec(cfg) -> DataSpec:
    cfg = complete(cfg)
    d = cfg.data
    n = lambda name, **kw: _number("data", name, d[name], **kw)  # noqa: E731
    return DataSpec(
        dir=d.dir,
        num_workers=n("num_workers", lo=0, integer=True),
        num_shards=None if d.num_shards is None else n("num_shards", lo=1, integer=True),
        num_train=n("num_train", lo=1, integer=True),
        num_eval=n("num_eval", lo=0, integer=True),
        examples_per_shard=n("examples_per_shard", lo=1, integer=True),
    )


def mesh_spec(cfg) -> MeshSpec:
    cfg = complete(cfg)
    m = plain(cfg.mesh)
    return MeshSpec(axes=axis_sizes(m), dcn=m.get("dcn"), rules=m.get("rules"))


ENCODER_SLOTS = {"text": ("umt5", "text"), "audio_features": ("wav2vec2", "audio_features"), "image": ("clip_vision", "image")}


def encoders_spec(cfg, model: ModelSpec) -> dict[str, dict]:
    """``config.encoders`` validated against the model: ``{slot: dict(kind, checkpoint, ..., condition,
    key, mask_key, length, rate, dim)}`` for each configured slot (``text`` / ``audio_features`` /
    ``image``). ``condition`` (default: the slot name) must be a model condition (record ``key`` = its
    name, ``mask_key`` = name + ``_mask``) or a condition stream (``key`` = name + ``_latents``, no
    mask); ``length`` / ``rate`` / ``dim`` are what the model reads there. The feature width of the
    checkpoint is checked against ``dim`` when the encoder is built (mmdit.encoders.registry)."""
    cfg = complete(cfg)
    enc = plain(cfg.encoders) or {}
    unknown = sorted(set(enc) - set(ENCODER_SLOTS))
    if unknown:
        raise ValueError(f"encoders.{unknown[0]}: unknown slot; the slots are {', '.join(ENCODER_SLOTS)}")
    conditions = {c.name: c for c in model.conditions}
    streams = {a.name: a for a in model.streams if a.geometry.condition}
    out = {}
    for slot, s in enc.items():
        field = f"encoders.{slot}"
        if s is None:
            continue
        if not isinstance(s, Mapping):
            raise ValueError(f"{field}={s!r}: expected None or a dict(kind=..., checkpoint=...)")
        s = dict(s)
        kind, default = ENCODER_SLOTS[slot]
        if s.get("kind") == "byte" and slot == "text":
            raise ValueError(
                "encoders.text.kind='byte': the byte text encoder trains inside the model; set model.text_encoder instead"
            )
        if s.get("kind") != kind:
            raise ValueError(f"{field}.kind={s.get('kind')!r}: the {slot} slot takes kind={kind!r}")
        if not isinstance(s.get("checkpoint"), str) or not s["checkpoint"]:
            raise ValueError(
                f"{field}.checkpoint={s.get('checkpoint')!r}: set it to a folder written by `mmdit convert --family {kind}`"
            )
        name = s.pop("condition", None) or default
        if name in conditions:
            c = conditions[name]
            s.update(condition=name, key=name, mask_key=name + "_mask", length=c.length, rate=c.rate, dim=c.dim)
        elif name in streams:
            g = streams[name].geometry
            s.update(condition=name, key=name + "_latents", mask_key=None, length=g.shape[0], rate=g.rate, dim=g.channels)
        else:
            raise ValueError(
                f"{field}.condition={name!r} is not a model condition ({sorted(conditions)}) or condition stream "
                f"({sorted(streams)}); set {field}.condition or add model.conditions.{name}"
            )
        if slot == "text":
            if cfg.model.get("text_encoder") is not None:
                raise ValueError(
                    "encoders.text and model.text_encoder are both set: text features come either from the trainable "
                    "in-model encoder or from a frozen pretrained one; set one of them to None"
                )
            if s.get("max_length") not in (None, s["length"]):
                raise ValueError(f"encoders.text.max_length={s['max_length']} != model.conditions.{name}.length={s['length']}")
        if slot == "audio_features" and not s["rate"]:
            raise ValueError(f"{field}: model.conditions.{name}.rate is not set; the features are resampled to it (Hz)")
        out[slot] = s
    return out


def has_codecs(cfg) -> bool:
    """Whether ``config.codecs`` can decode every stream the model generates: ``codecs.video`` for its
    visual stream and, when it has an audio stream (``mmdit.tasks.roles``), ``codecs.audio``. A
    video-only model (Mirage, TalkingMachines) needs no ``codecs.audio``: its soundtrack is its driving
    audio (``mmdit.sample.run.Soundtrack``). What sampling to MP4 and the training sample hook need."""
    cfg = complete(cfg)
    codecs = plain(cfg.codecs) or {}
    if "video" not in codecs:
        return False
    return "audio" in codecs or tasks_lib.roles(build_spec(cfg.model), cfg.model).audio is None


def task_weights(cfg) -> dict[str, float]:
    """``config.tasks`` as ``{task: weight}`` in config order (checked by :func:`build_run_spec`)."""
    return dict(plain(cfg.tasks))


def build_run_spec(cfg) -> RunSpec:
    """Validates every section of ``cfg`` (see the module docstring); raises ValueError on the
    first bad field."""
    cfg = complete(cfg)
    model = build_spec(cfg.model)
    chunks.check_chunking(model)
    tasks_lib.validate_tasks(task_weights(cfg), model, cfg.model)
    train = train_spec(cfg)
    if not train.param_groups.is_default:  # patterns checked against the model's param paths
        train.param_groups.check(param_paths(cfg))
    codec_registry.check_codec_args(plain(cfg.get("codecs")) or {})
    return RunSpec(
        model=model,
        flow=flow_spec(cfg, model),
        tasks=tuple(task_weights(cfg).items()),
        sample=sample_spec(cfg, model),
        train=train,
        data=data_spec(cfg),
        mesh=mesh_spec(cfg),
        encoders=encoders_spec(cfg, model),
    )


def load(spec: str, overrides=()):
    """``config_lib.load(spec)`` + ``--set`` overrides, every section validated (the entry points'
    one way in). Raises FileNotFoundError / KeyError / ValueError naming the file or field."""
    cfg = config_lib.override(config_lib.load(spec), list(overrides or ()))
    build_run_spec(cfg)
    return cfg
