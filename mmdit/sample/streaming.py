"""The streaming sampler: audio and video generated together, one causal chunk at a time, forever.

A *chunk* is ``model.chunk_frames`` reference latent frames of the visual stream plus every other
stream's tokens of the same time span (both streams cut at the same instants). The model was trained
with the sparse chunk-causal mask (``chunk_causal``: chunk c sees chunks {0, c-1, c}, TalkingMachines),
so chunk c needs only the *sink* chunk 0 and the previous chunk as context. :class:`StreamingSampler`
keeps their keys/values per layer and stream in a fixed-shape cache and runs the denoising steps of
one chunk in ONE jitted call (an unrolled ``fori_loop`` over the steps, with the chunk's noise drawn
and its latents unpatchified inside), compiled once: the cache, the chunk index and the known tokens
are arguments, so chunk 1,000 reuses chunk 1's executable, and memory and time per chunk do not grow
with the stream. The step rule is ``sample.solver`` (:func:`mmdit.sample.ode.solver_update`: ``euler``,
or ``renoise``, the rule a distilled student is trained with by :mod:`mmdit.distill.cached_rollout`).

**The cache** (:class:`StreamState.cache`): per stream ``s``, ``k``/``v`` ``[*D, L, N, 2·T_s, H, Dh]``
(``L`` layers, ``N = P·B`` rows: every CFG pattern of every sample, ``T_s`` tokens per chunk; slot 0
of the token axis holds the sink chunk, slot 1 the previous chunk, both written with
``lax.dynamic_update_slice``) and ``known`` ``bool [N, 2·T_s]``. Keys are stored *before* RoPE and
rotated when read, at the window position the reader gives them. Two modes (``sample.stream_cache``):

* ``per_step`` (TalkingMachines: "we cache all key-value pairs for chunk c−1 and c0, for each
  timestep"): ``D = (steps,)``; at step i, chunk c attends the context as it was at step i (a chunk
  sees its context at its own noise level, as in training with a shared σ). With absolute positions
  this is exactly the bidirectional sampler on the whole sequence under ``chunk_causal``
  (tests/test_streaming.py).
* ``clean`` (Self-Forcing): ``D = ()``; after a chunk's last step one more forward of the finished
  chunk at σ = 0 writes its clean keys/values -- what a teacher-forcing forward computes.

**Positions** (``sample.stream_positions``): ``absolute`` places chunk c at ``c · chunk_frames``
(grows with the stream; for the equivalence check); ``bounded`` (default) places the window
StreamingLLM-style: the sink at 0, the previous chunk at ``w − 1`` and the current chunk at ``w``
chunk lengths with ``w = min(c, 2)``. From chunk 2 on every chunk sees exactly the geometry chunk 2
saw (a model trained on clips of up to 3 chunks has seen it), so chunk 500's output equals chunk 3's
for the same inputs and context. Audio and video keep their aligned phase: only whole chunk lengths
are added to every stream's aligned time.

Tasks: ``t2av`` (both streams generated), ``a2v`` / ``tv2a`` (the given stream arrives chunk by chunk:
its latents are passed to :meth:`StreamingSampler.step` or pulled from an iterator by
:meth:`StreamingSampler.stream`), ``ti2av`` (the given image is the first latent frame of chunk 0).
Multi-condition CFG as in :class:`~mmdit.sample.sampler.Sampler`: the ``P`` guidance patterns are
batched rows of one forward. Conditions (text...) are encoded once per stream, and their
cross-attention keys/values of every layer are computed once too (``cache["cross"]``).

Not supported (errors name the field): time-aligned conditions (``model.conditions.*.rate``, e.g.
windowed wav2vec2 features) and condition streams, which would have to be cut per chunk too; masks
without ``chunk_causal`` (dense ``causal`` would need an unbounded cache).
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmdit import config_spec
from mmdit import tasks as tasks_lib
from mmdit.model import chunks as chunks_lib
from mmdit.model.derived_conditions import derived_conditions
from mmdit.model.diffusion import DiffusionModel
from mmdit.sample import guidance as guidance_lib
from mmdit.sample import ode, stream_batch
from mmdit.sample.stream_cache import cache_context, cache_shapes, window_offsets, write_cache
from mmdit.sample.sampler import Sampler, canonical_raw_conds

CACHE_MODES = ("per_step", "clean")
POSITIONS = ("bounded", "absolute")

__all__ = [
    "ChunkLayout",
    "chunk_layout",
    "chunk_model",
    "stream_geometry",
    "window_offsets",
    "cache_shapes",
    "cache_context",
    "write_cache",
    "StreamState",
    "StreamingSampler",
]


# ----------------------------------------------------------------------------------------------
# Chunk geometry
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """How a model's streams are cut into causal chunks.

    ``chunk_frames``: reference latent frames per chunk; ``latents[s]``: latent steps of stream ``s``
    per chunk (grid: frames F, sequence: T); ``tokens[s]``: tokens per chunk; ``clip_chunks``: chunks
    in the training clip (the model spec's length)."""

    chunk_frames: float
    latents: Mapping[str, int]
    tokens: Mapping[str, int]
    clip_chunks: int


def chunk_layout(spec) -> ChunkLayout:
    """The chunk layout of a ``ModelSpec``; ValueError naming the config fields when a chunk is not
    a whole number of every stream's tokens."""
    cf = spec.chunk_frames
    if cf is None:
        raise ValueError("streaming needs causal chunks: set model.chunk_frames (reference latent frames per chunk)")
    if "chunk_causal" not in str(spec.rule):
        raise ValueError(
            f"model.mask={str(spec.rule)!r}: streaming keeps only the sink and the previous chunk, so the mask "
            "must contain 'chunk_causal' (sparse chunks {0, c-1, c})"
        )
    for c in spec.conditions:
        if c.rate is not None:
            raise ValueError(
                f"model.conditions.{c.name}.rate is set: streaming time-aligned conditions is not supported yet "
                "(they would be cut per chunk)"
            )
    for a in spec.streams:
        if a.geometry.condition:
            raise ValueError(f"model.streams.{a.name}.condition: streaming condition streams is not supported yet")
    positions = chunks_lib.chunk_token_frames(spec)  # raises naming model.chunk_frames and the streams' fields
    latents = {a.name: positions[a.name] * a.geometry.patch[0] for a in spec.streams}
    return ChunkLayout(float(cf), latents, chunks_lib.chunk_tokens(spec), chunks_lib.num_chunks(spec))


def chunk_model(model: DiffusionModel, layout: ChunkLayout) -> DiffusionModel:
    """The same model (same params) over ONE chunk: every stream's latent length is the chunk's, its
    aligned times those of chunk 0 (``MMDiT(time_offset=)`` moves them)."""
    sp = model.spec
    streams = []
    for a in sp.streams:
        g = dataclasses.replace(a.geometry, shape=(layout.latents[a.name],) + tuple(a.geometry.shape[1:]))
        streams.append(dataclasses.replace(a, geometry=g))
    times = {a.name: np.asarray(sp.times[a.name][: layout.tokens[a.name]]) for a in sp.streams}
    return DiffusionModel(dataclasses.replace(sp, streams=tuple(streams), times=times), model.text_encoder)


def stream_geometry(cfg, cache_mode: str | None = None, positions: str | None = None) -> tuple[str, str]:
    """``(cache mode, positions)``: the overrides, else ``sample.stream_cache`` / ``sample.stream_positions``
    of ``cfg`` (defaults ``per_step`` / ``bounded``); ValueError naming the field for an unknown value."""
    s = cfg.sample
    cache_mode = cache_mode or s.get("stream_cache", "per_step")
    positions = positions or s.get("stream_positions", "bounded")
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"sample.stream_cache={cache_mode!r}: use one of {CACHE_MODES}")
    if positions not in POSITIONS:
        raise ValueError(f"sample.stream_positions={positions!r}: use one of {POSITIONS}")
    return cache_mode, positions


# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StreamState:
    """Everything one stream carries between chunks (a server can hold one per client).

    ``cache``: the KV cache (module docstring); ``chunk``: the index of the next chunk; ``rng``: the
    stream's key (chunk c's noise is ``fold_in(rng, c)``); ``conds``/``cond_masks``: encoded
    conditions ``[B, L_c, D_c]`` (computed once); ``task``, ``batch``, ``guidance``, ``sigmas``;
    ``masks``: the task's ``TaskMasks`` of chunk 0 and of later chunks; ``held0``: chunk 0's known
    visual tokens (ti2av); ``solver``: ``euler`` | ``renoise`` (``sample.solver``); ``needs``: the
    streams every chunk must be given (a2v: audio); ``chunk_inputs``: the jitted chunk's per-task inputs
    of chunk 0 and of later chunks (``held``/``known``/``present``/``scales`` device arrays), made once
    by :meth:`StreamingSampler.start` so a chunk converts nothing; ``signature``: what selects the chunk's
    executable besides the params (batch, steps, guidance structure, solver, the conditions' shapes), so a
    chunk does not describe its hundreds of argument leaves to find it; ``unfinished``: a stream-batch stream
    (:mod:`mmdit.sample.stream_batch`) was closed with chunks in flight, so its cache is ahead of its output
    and :meth:`StreamingSampler.step` refuses it."""

    cache: dict
    chunk: int
    rng: Any
    conds: dict
    cond_masks: dict
    task: str
    batch: int
    guidance: guidance_lib.Guidance
    sigmas: dict
    masks: tuple
    held0: dict
    steps: int
    solver: str = "euler"
    needs: tuple = ()
    chunk_inputs: tuple = ()
    signature: tuple = ()
    unfinished: bool = False

    def follow(self, new_state: StreamState) -> None:
        """Copies ``new_state`` into this object (the caller's state object follows the stream)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(new_state, f.name))


def _timed(source: Iterator, timeout: float | None) -> Iterator:
    """``source``'s items, ending (not raising) if one takes longer than ``timeout`` seconds to arrive."""
    if timeout is None:
        yield from source
        return
    q: queue.Queue = queue.Queue(maxsize=1)
    done = object()

    def pump():
        try:
            for item in source:
                q.put(item)
        except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer
            q.put(e)
        q.put(done)

    threading.Thread(target=pump, daemon=True, name="mmdit-stream-source").start()
    while True:
        try:
            item = q.get(timeout=timeout)
        except queue.Empty:
            return
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


# ----------------------------------------------------------------------------------------------
# The sampler
# ----------------------------------------------------------------------------------------------


class StreamingSampler:
    """Chunk-by-chunk sampling with a KV cache (module docstring).

    Args:
      model: the trained ``DiffusionModel`` (its spec: a clip of several chunks, ``chunk_causal``).
      cfg: the experiment config (``sample.*`` defaults: steps, shift, guidance, ``stream_cache``,
        ``stream_positions``).
      cache_mode, positions: override ``sample.stream_cache`` / ``sample.stream_positions``.
      stream_batch: override ``sample.stream_batch``: :meth:`stream` runs the denoising steps of consecutive
        chunks as row groups of one forward (:mod:`mmdit.sample.stream_batch`; ``per_step`` cache and
        ``bounded`` positions only). Throughput up to ``steps``x, latency ``steps - 1`` chunk calls more.
      compiler_options: XLA options for the chunk executable (as :class:`Sampler`).

    Attributes: ``layout`` (:class:`ChunkLayout`), ``model`` (the one-chunk model), ``compilations``
    (executables built so far: 1 after the first chunk, and it stays 1).
    """

    def __init__(
        self,
        model: DiffusionModel,
        cfg,
        *,
        cache_mode: str | None = None,
        positions: str | None = None,
        stream_batch: bool | None = None,
        compiler_options=None,
    ):
        self.full_model, self.cfg = model, cfg
        self.layout = chunk_layout(model.spec)
        self.model = chunk_model(model, self.layout)
        self.spec = self.model.spec
        self.sampler = Sampler(self.model, cfg, compiler_options=compiler_options)
        self.defaults = self.sampler.defaults
        self.cache_mode, self.positions = stream_geometry(cfg, cache_mode, positions)
        self.stream_batch = bool(cfg.sample.get("stream_batch", False) if stream_batch is None else stream_batch)
        if self.stream_batch and (self.cache_mode, self.positions) != ("per_step", "bounded"):
            raise ValueError(
                f"sample.stream_batch needs sample.stream_cache='per_step' and sample.stream_positions='bounded' "
                f"(got {self.cache_mode!r}, {self.positions!r}): a chunk's step i may then run beside the previous "
                "chunk's step i + 1 (mmdit.sample.stream_batch)"
            )
        self.compiler_options = dict(compiler_options) if compiler_options else None
        self.generated = list(self.spec.generated)
        self.compilations = 0
        self._compiled: dict[tuple, Callable] = {}
        self._encode = jax.jit(self._encode_fn)
        self._tasks: dict[tuple, dict] = {}  # (task, batch) -> see _task_constants
        self._sigmas: dict[tuple, dict] = {}  # (steps, shift, stream_shift) -> σ schedules
        self._cache_fns: dict[tuple, Callable] = {}  # (rows, steps) -> jitted empty cache
        self._cross_fn = None
        self._dit = None  # (params["dit"] object, unboxed, signature): see _unboxed_dit
        self._params = None  # (params' top-level entries, unboxed tree): see _unboxed
        self._zeros: dict[int, dict] = {}  # batch -> placeholders of what a chunk is not given: see _zero_inputs
        self._noise_fn: dict[int, Callable] = {}  # batch -> compiled noise(): see noise

    # -- setup ---------------------------------------------------------------------------------

    @property
    def seconds_per_chunk(self) -> float:
        return self.layout.chunk_frames / self.spec.reference_rate

    def cache_shapes(self, rows: int, steps: int) -> dict:
        """``{"k"|"v": {s: shape}, "known": {s: shape}}`` of the cache for ``rows`` rows."""
        return cache_shapes(self.spec, self.layout, rows, steps, self.cache_mode)

    def start(
        self,
        params,
        rng,
        *,
        task: str,
        batch: int,
        raw_conds: Mapping,
        image_latents=None,
        steps: int | None = None,
        shift: float | None = None,
        stream_shift: Mapping[str, float] | None = None,
        guidance=None,
        guidance_mode: str | None = None,
        guidance_schedule: str | None = None,
        solver: str | None = None,
        guidance_interval=None,
    ) -> StreamState:
        """A new stream: encodes the conditions, resolves guidance, allocates the (empty) cache.

        ``image_latents``: ti2av's given first latent frame ``[B, 1, h, w, C]`` of the visual stream
        (chunk 0's first frame; a ``first_frame`` condition gives it, tiled, to every chunk). ``solver``:
        ``euler`` | ``renoise`` (default ``sample.solver``; :func:`mmdit.sample.ode.solver_update`)."""
        if task not in ("t2av", "ti2av", "a2v", "tv2a"):
            raise ValueError(f"streaming task {task!r}: use t2av, ti2av, a2v or tv2a")
        steps = int(steps if steps is not None else self.defaults.steps)
        shift = float(shift if shift is not None else self.defaults.shift)
        solver = self.defaults.solver if solver is None else config_spec.check_solver(solver)
        _, k_noise = jax.random.split(rng)  # (the first key drew nothing: the streaming tasks' masks are fixed)
        t = self._task_constants(task, batch)
        zero_tokens = self._zero_inputs(batch)["tokens"]
        first, later, held0 = t["masks"][0], t["masks"][1], zero_tokens
        if task == "ti2av":
            visual = tasks_lib.roles(self.spec, self.cfg.model).visual
            if image_latents is None:
                raise ValueError("task 'ti2av' needs image_latents [B, 1, h, w, C] (the given first latent frame)")
            g = self.spec.stream(visual).geometry
            img = jnp.asarray(image_latents, jnp.float32)
            want = (batch, 1) + tuple(g.latent_shape[1:])
            if tuple(img.shape) != want:
                raise ValueError(f"image_latents has shape {tuple(img.shape)}, expected {want} (model.streams.{visual})")
            frames = jnp.zeros((batch,) + tuple(g.latent_shape), jnp.float32).at[:, :1].set(img)
            held0 = {**held0, visual: g.patchify(frames)}
        g = self.sampler.resolve_guidance(
            guidance, guidance_mode, guidance_schedule, present=first.present, interval=guidance_interval
        )
        raw = canonical_raw_conds(self.model, raw_conds, batch)
        # Derived conditions come from chunk 0's held tokens (ti2av: the given image tiled over the chunk), and
        # every chunk reuses them: the reference stays in view after the given frame has left the window.
        unboxed = self._unboxed(params)
        conds, cmasks = self._encode(unboxed, raw, held0)
        rows = len(g.plan()) * batch
        cache = {
            **self._empty_cache(rows, steps),
            "cross": self._cross_kv(unboxed["dit"], conds, cmasks, len(g.plan()), batch),
        }
        sig_key = (steps, shift, None if stream_shift is None else tuple(sorted(dict(stream_shift).items())))
        if sig_key not in self._sigmas:
            self._sigmas[sig_key] = self.sampler.schedules(steps, shift, stream_shift)
        scales = g.scale_arrays()
        chunk_inputs = tuple(
            {**inputs, "held": held, "scales": scales}
            for inputs, held in ((t["inputs"][0], held0), (t["inputs"][1], zero_tokens))
        )
        leaves, treedef = jax.tree.flatten((conds, cmasks))
        signature = (batch, steps, g.structure(), solver, treedef, tuple((tuple(a.shape), str(a.dtype)) for a in leaves))
        return StreamState(
            cache,
            0,
            k_noise,
            conds,
            cmasks,
            task,
            batch,
            g,
            self._sigmas[sig_key],
            (first, later),
            held0,
            steps,
            solver,
            t["needs"],
            chunk_inputs,
            signature,
        )

    def _encode_fn(self, params, raw, held0):
        conds, cmasks = self.model.encode_conditions(params, raw)
        return {**conds, **derived_conditions(self.spec, held0)}, cmasks

    def _task_constants(self, task: str, batch: int) -> dict:
        """What a stream of ``task`` and ``batch`` starts from and does not vary between streams, made once:
        ``masks`` (``TaskMasks`` of chunk 0 and of later chunks: ti2av gives its image in chunk 0 only),
        ``needs`` (the streams every chunk must be given: a2v audio, tv2a video) and ``inputs`` (the jitted chunk's ``known``/``present`` device arrays of
        chunk 0 and of later chunks)."""
        key = (task, batch)
        if key not in self._tasks:
            first = self.sampler.task_masks(task, jax.random.key(0), batch)
            later = first
            if task == "ti2av":
                visual = tasks_lib.roles(self.spec, self.cfg.model).visual
                later = dataclasses.replace(first, known={**first.known, visual: jnp.zeros_like(first.known[visual])})
            inputs = tuple(
                {
                    "known": {n: jnp.asarray(m.known[n]) for n in self.generated},
                    "present": {c: jnp.asarray(m.present.get(c, jnp.ones((batch,), bool)), bool) for c in self.spec.keep_names},
                }
                for m in (first, later)
            )
            needs = tuple(n for n in self.generated if bool(np.any(np.asarray(later.known[n]))))
            self._tasks[key] = {"masks": (first, later), "needs": needs, "inputs": inputs}
        return self._tasks[key]

    def _empty_cache(self, rows: int, steps: int) -> dict:
        """A fresh zero cache (``k``, ``v``, ``known``) for ``rows`` rows: one compiled call that allocates
        every buffer (the chunk donates them, so each stream needs its own)."""
        key = (rows, steps)
        if key not in self._cache_fns:
            shapes = self.cache_shapes(rows, steps)

            def empty():
                return {
                    "k": {s: jnp.zeros(v, self.spec.dtype) for s, v in shapes["k"].items()},
                    "v": {s: jnp.zeros(v, self.spec.dtype) for s, v in shapes["v"].items()},
                    "known": {s: jnp.zeros(v, bool) for s, v in shapes["known"].items()},
                }

            self._cache_fns[key] = jax.jit(empty)
        return self._cache_fns[key]()

    def _cross_kv(self, dit_params, conds, cmasks, patterns: int, batch: int) -> dict:
        """The conditions' cross-attention keys/values of every layer and stream, ``{s: {c: {"k", "v"}}}``
        ``[L, P·B, L_c, H, Dh]``: they depend on the conditions only, so a stream computes them once."""
        if self._cross_fn is None:
            model = self.model

            def fn(params, conds, cmasks, patterns, batch):
                rep = lambda t: jax.tree.map(lambda a: jnp.concatenate([a] * patterns, 0), t)  # noqa: E731
                n = patterns * batch
                tokens = {a.name: jnp.zeros((n, a.geometry.num_tokens, a.geometry.token_dim)) for a in model.spec.streams}
                sigma = {a.name: jnp.zeros((n, a.geometry.num_tokens)) for a in model.spec.streams}
                _, kv = model.dit.apply(params, tokens, sigma, rep(conds), rep(cmasks), return_kv=True)
                return kv["cross"]

            self._cross_fn = jax.jit(fn, static_argnums=(3, 4))  # one function for every batch size
        return self._cross_fn(dit_params, conds, cmasks, patterns, batch)

    def noise(self, state: StreamState, chunk: int) -> dict:
        """Chunk ``chunk``'s initial noise ``{s: float32 [B, T_s, C_s]}`` (``fold_in(rng, chunk)``), bit for
        bit what the jitted chunk draws itself: compiled with the chunk's ``compiler_options`` (XLA's
        optimisation level changes the normal draw's last bits), so ``step(noise=ss.noise(state, c))``
        equals ``step()``; with the default options it also equals the eager draw."""
        args = (state.rng, jnp.int32(chunk))
        if state.batch not in self._noise_fn:
            fn = jax.jit(self._chunk_noise, static_argnums=2).lower(*args, state.batch)
            self._noise_fn[state.batch] = fn.compile(compiler_options=self.compiler_options)
        return self._noise_fn[state.batch](*args)

    def _chunk_noise(self, rng, chunk, batch: int) -> dict:
        return self.sampler.noise(jax.random.fold_in(rng, chunk), batch)

    # -- one chunk -----------------------------------------------------------------------------

    def given_inputs(self, state: StreamState, given: Mapping | None, c: int) -> tuple[dict, dict]:
        """``(given, given_flags)`` for chunk ``c``'s call: ``given`` checked (ValueError naming the stream, the
        expected shape and the config field) and completed with zeros for every generated stream the task does
        not give, ``given_flags`` ``{s: numpy bool}``: every generated stream has a slot, so one executable serves
        every task."""
        given = dict(given or {})
        for n, lat in given.items():
            if n not in self.generated:
                raise ValueError(f"given stream {n!r} is not a generated stream ({self.generated})")
            if n not in state.needs:
                raise ValueError(f"task {state.task!r} takes no given {n!r} chunks (its given streams: {list(state.needs)})")
            want = (state.batch,) + tuple(self.spec.stream(n).geometry.latent_shape)
            if tuple(np.shape(lat)) != want:
                raise ValueError(
                    f"given[{n!r}] chunk {c} has shape {tuple(np.shape(lat))}, expected {want} "
                    f"({self.layout.latents[n]} latent steps = model.chunk_frames={self.layout.chunk_frames:g} reference frames)"
                )
            if getattr(lat, "dtype", None) != np.float32:
                given[n] = jnp.asarray(lat, jnp.float32)
        missing = [n for n in state.needs if n not in given]
        if missing:
            raise ValueError(f"task {state.task!r}: chunk {c} needs the given stream(s) {missing} (given=...)")
        zeros = self._zero_inputs(state.batch)
        given_flags = {n: np.bool_(n in given) for n in self.generated}
        return {n: given.get(n, zeros["latents"][n]) for n in self.generated}, given_flags

    def step(self, params, state: StreamState, given: Mapping | None = None, noise: Mapping | None = None):
        """Generates the next chunk. Returns ``({generated s: float32 [B, *chunk_latent_shape]}, state)``.

        ``given``: ``{stream: latents [B, *chunk_latent_shape]}`` of the task's given stream for this
        chunk (a2v: audio, tv2a: video; no other stream). ``noise``: override the chunk's initial noise
        tokens ``{s: [B, T_s, C]}`` (tests compare with the bidirectional sampler on the same noise); by
        default the jitted chunk draws :meth:`noise` itself. The ``renoise`` solver's fresh noise of step
        ``k`` is ``ode.chunk_noise(state.rng, chunk, 1 + k, stream index)``, the distill rollouts' draw."""
        c = state.chunk
        if state.unfinished:
            raise ValueError(
                "this stream was closed with chunks still in flight (sample.stream_batch): its cache is ahead of its "
                "output; start a new stream"
            )
        given, given_flags = self.given_inputs(state, given, c)
        zeros = self._zero_inputs(state.batch)
        if noise is None:
            noise_given, noise = np.bool_(False), zeros["tokens"]
        else:
            want = {n: tuple(v.shape) for n, v in zeros["tokens"].items()}
            got = {n: tuple(np.shape(v)) for n, v in noise.items()}
            if got != want:
                raise ValueError(f"noise= has shapes {got}, expected {want} (one chunk's tokens of every generated stream)")
            noise_given, noise = np.bool_(True), {n: jnp.asarray(v, jnp.float32) for n, v in noise.items()}
        dit_params, dit_signature = self._unboxed_dit(params)
        args = (
            dit_params,
            state.cache,
            np.int32(c),
            state.rng,
            noise,
            noise_given,
            given,
            given_flags,
            state.chunk_inputs[0 if c == 0 else 1],
            state.conds,
            state.cond_masks,
            state.sigmas,
        )
        latents, cache = self._executable(state, dit_signature, args)(*args)
        return latents, dataclasses.replace(state, cache=cache, chunk=c + 1)

    def stream(
        self,
        params,
        state: StreamState,
        *,
        given: Iterator[Mapping] | None = None,
        num_chunks: int | None = None,
        source_timeout: float | None = None,
    ) -> Iterator[dict]:
        """Yields ``{generated s: latents [B, *chunk_latent_shape]}`` chunk after chunk.

        ``given``: an iterator of per-chunk given latents (a2v/tv2a), e.g. from
        :func:`latent_chunks`; the stream ends cleanly when it ends, or when an item takes longer
        than ``source_timeout`` seconds (a stalled source). ``num_chunks``: stop after that many
        (None: forever, or until ``given`` ends). With ``stream_batch`` the chunks come out in the same order
        and agree with the sequential ones to float rounding; each leaves ``steps - 1`` calls after it entered,
        and the last ones when the source ends or ``num_chunks`` have entered."""
        source = _timed(iter(given), source_timeout) if given is not None else None
        batched = self.stream_batch and state.steps > 1
        produced = 0
        while num_chunks is None or produced < num_chunks:
            if batched and state.chunk >= stream_batch.FIRST_BATCHED_CHUNK:  # the rest in batched calls
                yield from stream_batch.stream(self, params, state, source, None if num_chunks is None else num_chunks - produced)
                return
            chunk_given = None
            if source is not None:
                chunk_given = next(source, None)
                if chunk_given is None:
                    return
            out, new_state = self.step(params, state, chunk_given)
            state.follow(new_state)
            produced += 1
            yield out

    # -- the jitted chunk ----------------------------------------------------------------------

    def _unboxed_dit(self, params) -> tuple:
        """``(unboxed params["dit"], its tree structure and leaf shapes/dtypes)``, computed once per
        ``params["dit"]`` object: a stream passes the same tree every chunk, and unboxing and describing
        its hundreds of leaves took milliseconds of every chunk."""
        dit = params["dit"]
        if self._dit is None or self._dit[0] is not dit:
            unboxed = nn.meta.unbox(dit)
            leaves, treedef = jax.tree.flatten(unboxed)
            self._dit = (dit, unboxed, (treedef, tuple((tuple(np.shape(a)), str(a.dtype)) for a in leaves)))
        return self._dit[1], self._dit[2]

    def _unboxed(self, params) -> dict:
        """The whole unboxed ``params`` tree, remade only when one of its top-level entries is another object
        than last time (``"dit"`` shared with :meth:`_unboxed_dit`): a server starts many streams on one tree."""
        dit, _ = self._unboxed_dit(params)
        entries = tuple(params.items())
        cached = self._params
        if (
            cached is None
            or len(cached[0]) != len(entries)
            or any(a[0] != b[0] or a[1] is not b[1] for a, b in zip(cached[0], entries))
        ):
            cached = self._params = (entries, {k: dit if k == "dit" else nn.meta.unbox(v) for k, v in entries})
        return cached[1]

    def _zero_inputs(self, batch: int) -> dict:
        """Placeholders of batch ``batch`` for the chunk's arguments that are not given, made once: ``tokens``
        (``{s: float32 [B, T_s, C_s]}`` zeros: the noise when the chunk draws its own, and the held tokens of a
        chunk given nothing) and ``latents`` (``{s: float32 [B, *chunk_latent_shape]}`` zeros, for streams the
        task does not give). The chunk keeps one executable with and without ``noise=`` and for every task."""
        if batch not in self._zeros:
            tokens = jax.tree.map(jnp.zeros_like, self.sampler.noise(jax.random.key(0), batch))
            latents = {n: jnp.zeros((batch,) + tuple(self.spec.stream(n).geometry.latent_shape)) for n in self.generated}
            self._zeros[batch] = {"tokens": tokens, "latents": latents}
        return self._zeros[batch]

    def _executable(self, state: StreamState, dit_signature, args):
        """The compiled chunk, cached per (batch, steps, guidance structure, solver, arg avals): the state's
        ``signature`` stands for the avals when :meth:`start` made it (every other argument's shape follows
        from it), else they are read off ``args``."""
        if state.signature:
            key = (state.signature, dit_signature)
        else:
            leaves, treedef = jax.tree.flatten(args[1:])
            avals = tuple((tuple(np.shape(a)), str(getattr(a, "dtype", type(a)))) for a in leaves)
            key = (state.batch, state.steps, state.guidance.structure(), state.solver, dit_signature, treedef, avals)
        return self.compiled(key, lambda: self._chunk_fn(state.batch, state.steps, state.guidance, state.solver), args)

    def compiled(self, key, make: Callable[[], Callable], args, donate_argnums=(1,)):
        """The executable cached under ``key``, else ``make()`` jitted (``donate_argnums``: the cache and whatever
        else the call replaces), compiled for ``args`` with the sampler's ``compiler_options`` and counted in
        ``compilations``; shared by the sequential chunk and :mod:`mmdit.sample.stream_batch`."""
        if key not in self._compiled:
            fn = jax.jit(make(), donate_argnums=donate_argnums)
            self._compiled[key] = fn.lower(*args).compile(compiler_options=self.compiler_options)
            self.compilations += 1
        return self._compiled[key]

    def _context(self, cache, c, offsets, step_index):
        return cache_context(self.spec, self.layout, cache, c, offsets, step_index, self.cache_mode)

    def _write(self, cache, c, kv, known):
        return write_cache(self.spec, self.layout, cache, c, kv, known)

    def _chunk_fn(self, batch: int, steps: int, g: guidance_lib.Guidance, solver: str):
        """The chunk as one function of arrays (:meth:`step`'s ``args``): draws the chunk's noise (or
        takes ``noise`` when ``noise_given``), holds the given streams' tokens (``given_flags``), runs the ``steps`` steps of ``solver`` over the cached
        context and returns ``(latents {s: [B, *chunk_latent_shape]}, the updated cache)``."""
        model, gen, plan = self.model, self.generated, g.plan()
        order = sorted(gen)  # a stream's index in the re-noising draw (ode.chunk_noise), as the distill rollouts
        rep = lambda tree: guidance_lib.repeat_for_cfg(tree, plan)  # noqa: E731
        flags = guidance_lib.cfg_keep_flags(plan, batch)

        def forward(dit_params, x, sig, known, conds, cmasks, keep, kvc, c, q_off):
            return model.dit.apply(
                dit_params,
                rep(x),
                rep(sig),
                rep(conds),
                rep(cmasks),
                keep,
                rep(known),
                rep({n: jnp.ones_like(known[n]) for n in gen}),
                kv_context=kvc,
                chunk_index=c,
                time_offset=q_off,
                return_kv=True,
            )

        def run(dit_params, cache, c, rng, noise, noise_given, given, given_flags, inputs, conds, cmasks, sigmas):
            known, present, scales = inputs["known"], inputs["present"], inputs["scales"]
            patchify = lambda n: model.spec.stream(n).geometry.patchify(given[n])  # noqa: E731
            held = {n: jnp.where(given_flags[n], patchify(n), inputs["held"][n]) for n in gen}
            offsets = window_offsets(c, self.layout.chunk_frames, self.positions)
            # = StreamingSampler.noise(state, c) bit for bit: the barrier keeps XLA from fusing the draw's
            # arithmetic into its consumers (which changes the last bits)
            drawn = jax.lax.optimization_barrier(self._chunk_noise(rng, c, batch))
            x0 = {n: jnp.where(noise_given, noise[n], drawn[n]) for n in gen}
            keep = {}
            for name in self.spec.keep_names:
                keep[name] = rep(present[name]) & flags[name] if name in flags else rep(present[name])
            hold = lambda x: {n: jnp.where(known[n][..., None], held[n], x[n]) for n in gen}  # noqa: E731
            rows = len(plan) * batch
            kv_shapes = {
                n: (steps, model.spec.num_layers, rows, self.layout.tokens[n], model.spec.heads, model.spec.head_dim) for n in gen
            }

            def body(i, carry):
                x, fresh = carry
                s = {n: sigmas[n][i] for n in gen}
                s_next = {n: sigmas[n][i + 1] for n in gen}
                sig = {n: jnp.where(known[n], 0.0, s[n]) for n in gen}
                kvc = self._context(cache, c, offsets, i)
                v_rows, kv = forward(dit_params, x, sig, known, conds, cmasks, keep, kvc, c, offsets[0])
                sc = g.scale_at(scales, i, steps, s)
                v = guidance_lib.combine_cfg(v_rows, plan, sc)
                x_next = hold(ode.streams_update(solver, x, v, s, s_next, rng, c, i, order))
                if self.cache_mode == "per_step":
                    fresh = {f: {n: fresh[f][n].at[i].set(kv[f][n].astype(fresh[f][n].dtype)) for n in gen} for f in ("k", "v")}
                return x_next, fresh

            fresh0 = None
            if self.cache_mode == "per_step":
                fresh0 = {f: {n: jnp.zeros(kv_shapes[n], self.spec.dtype) for n in gen} for f in ("k", "v")}
            x, fresh = jax.lax.fori_loop(0, steps, body, (hold(x0), fresh0), unroll=True)
            if self.cache_mode == "per_step":
                new_known = {n: rep(known[n]) for n in gen}
            else:  # one clean forward of the finished chunk refreshes the cache (Self-Forcing)
                clean = {n: jnp.ones_like(known[n]) for n in gen}
                zero = {n: jnp.zeros(known[n].shape, jnp.float32) for n in gen}
                _, fresh = forward(
                    dit_params, x, zero, clean, conds, cmasks, keep, self._context(cache, c, offsets, 0), c, offsets[0]
                )
                new_known = {n: rep(clean[n]) for n in gen}
            return model.latents(x), self._write(cache, c, fresh, new_known)

        return run


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def latent_chunks(latents, chunk_latents: int, *, axis: int = 1) -> Iterator:
    """Splits ``latents [B, T, ...]`` (e.g. a whole audio file through the codec) into chunks of
    ``chunk_latents`` along ``axis``; a partial last chunk is dropped (the stream ends with the
    last whole chunk). A NumPy array yields NumPy views (the chunk's call copies them to the device)."""
    n = np.shape(latents)[axis] // chunk_latents
    if isinstance(latents, np.ndarray):
        for i in range(n):
            yield latents[(slice(None),) * (axis % latents.ndim) + (slice(i * chunk_latents, (i + 1) * chunk_latents),)]
        return
    latents = jnp.asarray(latents)  # once, not per chunk
    for i in range(n):
        yield jax.lax.slice_in_dim(latents, i * chunk_latents, (i + 1) * chunk_latents, axis=axis)


def chunks_for_seconds(seconds: float, sampler: StreamingSampler) -> int:
    return int(math.ceil(seconds / sampler.seconds_per_chunk - 1e-9))
