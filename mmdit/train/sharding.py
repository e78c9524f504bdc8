"""The train step as a pjit: mesh + logical rules -> validated shardings -> sharded state and step.

::

    run = setup(cfg, model, tx)          # mesh, rules, checks, shardings -- nothing compiled yet
    state = run.init(jax.random.key(0))  # created directly sharded (jit with out_shardings)
    batch = run.global_batch(local)      # per-host numpy [B / processes, ...] -> global arrays
    state, metrics = run.step(state, batch)

**Mesh and rules.** ``cfg.mesh`` (``configs/base.py``'s default: pure data parallelism) is built by
:func:`mmdit.parallel.make_mesh`; ``cfg.mesh.rules`` (default ``DEFAULT_RULES``) maps logical axis
names to mesh axes. Tracing and compiling run under ``jax.set_mesh(mesh)`` +
``nn.logical_axis_rules(rules)`` (:meth:`ShardedTrain.context`), which activates the model's
activation constraints and its sequence-parallel attention (``model.sequence_parallel``).

**State shardings** come from the *boxed* abstract state (:func:`mmdit.train.state.abstract_state`):
``nn.get_partition_spec`` gives every param's logical spec, optax's Adam moments and the EMA are
built by ``tree_map`` over the same boxes and so follow their params; scalars (step, Adam count,
rng) are replicated.

**Checks before compiling** (:func:`validate`): every logical name mapped, every sharded param
dimension divisible, the global batch divisible by the batch axes × ``train.grad_accum``, heads by
``tensor`` (× ``sequence`` for Ulysses), the mesh product equal to the device count (make_mesh),
each process holding a distinct 1/N slice of the batch; then ``check_not_replicated`` refuses a
run whose large params would be replicated on an fsdp/tensor mesh. Every message names the config
field and the fix.

**The step** is :func:`mmdit.train.step.make_step`: the plain step, or (``train.grad_accum`` > 1)
the gradient-accumulating one over strided microbatches (see ``mmdit/train/step.py``), given the
params' shardings and the batch mesh axes; it is jitted here with the state / batch shardings and
a donated state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mmdit import config_spec
from mmdit import parallel
from mmdit.train import step as step_lib
from mmdit.train.state import TrainState, abstract_state, init_state

# Logical names the model's activation constraints use (checked to be mapped by the rules).
ACTIVATION_NAMES = ("batch", "length", "embed", "heads", "kv", "mlp")


# ------------------------------------------------------------------------------------------------
# config -> mesh, rules, batch layout


def mesh_config(cfg) -> dict:
    """The validated ``cfg.mesh`` axis sizes (+ ``dcn``), without its ``rules``."""
    m = config_spec.mesh_spec(cfg)
    return {**m.axes, **({"dcn": m.dcn} if m.dcn else {})}


def rules_of(cfg) -> parallel.rules.Rules:
    return parallel.rules_from_config(config_spec.mesh_spec(cfg).rules)


def batch_axes(rules) -> tuple[str, ...]:
    """Mesh axes the logical ``batch`` dimension is sharded over (e.g. ``("data", "fsdp")``)."""
    entry = parallel.logical_to_spec(("batch",), rules)[0]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def input_keys(model) -> list[str]:
    """Record fields the train step consumes (``model.input_spec()``'s required fields)."""
    return model.input_spec().record_keys()


def batch_shapes(model, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes of one train batch (what the records hold, stacked ``[B, ...]``)."""
    return model.input_spec().batch_shapes(batch_size)


def strip_boxes(tree):
    """``tree`` with every ``nn.Partitioned`` box replaced by its value (``nn.unbox`` would apply a
    sharding constraint when rules are active)."""
    is_box = lambda x: isinstance(x, nn.Partitioned)
    return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


@contextlib.contextmanager
def activate(mesh, rules):
    """The context every sharded trace runs in: the mesh (for ``get_abstract_mesh`` and sharding
    constraints) and the logical rules (for flax's ``nn.with_logical_constraint``)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


# ------------------------------------------------------------------------------------------------
# checks


def validate(cfg, model, mesh, rules, boxed_params, *, min_replicated_bytes: int = 1 << 20) -> None:
    """All sharding checks, before anything compiles (see module docstring). Raises ``ValueError``."""
    B, k = int(cfg.train.global_batch_size), step_lib.grad_accum(cfg)
    spec = model.spec
    parallel.validate_rules(
        rules,
        mesh,
        params_shapes=boxed_params,
        batch_size=B,
        num_heads=spec.heads,
        seq_len=spec.num_tokens,
        sequence_strategy=spec.sequence_parallel,
        logical_names=ACTIVATION_NAMES,
    )
    dp = math.prod(mesh.shape[a] for a in batch_axes(rules))
    if k > 1 and B % (k * dp):
        raise ValueError(
            f"train.global_batch_size={B} must split into train.grad_accum={k} microbatches that each "
            f"divide over the batch mesh axes {batch_axes(rules)} (size {dp}): make the batch a multiple "
            f"of {k * dp}, or lower train.grad_accum"
        )
    if B % jax.process_count():
        raise ValueError(
            f"train.global_batch_size={B} is not divisible by the {jax.process_count()} processes; "
            f"use a multiple of {jax.process_count()}"
        )
    shardings = parallel.logical_to_sharding(boxed_params, mesh, rules)
    parallel.check_not_replicated(boxed_params, shardings, min_bytes=min_replicated_bytes)


def process_batch_block(sharding: NamedSharding, batch_size: int) -> tuple[int, int]:
    """``(block, blocks)``: this process's devices hold global batch rows
    ``[block·B/blocks, (block+1)·B/blocks)`` with ``blocks == process_count``; the data pipeline
    reads data shard ``block`` so the global batch is the same whatever the device order."""
    n = jax.process_count()
    rows = set()
    for dev, idx in sharding.devices_indices_map((batch_size,)).items():
        if dev.process_index == jax.process_index():
            rows.update(range(*idx[0].indices(batch_size)))
    per = batch_size // n
    lo = min(rows)
    if len(rows) != per or rows != set(range(lo, lo + per)) or lo % per:
        raise ValueError(
            f"with {n} processes each must hold a distinct 1/{n} of the batch, but process "
            f"{jax.process_index()}'s devices hold {len(rows)} of {batch_size} rows over the batch mesh "
            f"axes {tuple(sharding.spec[0] or ())}: shard the batch across hosts (make mesh.data or "
            f"mesh.fsdp span the processes, e.g. mesh.dcn.data={n}) or map 'batch' to them in mesh.rules"
        )
    return lo // per, n


# ------------------------------------------------------------------------------------------------
# everything together


@dataclasses.dataclass
class ShardedTrain:
    """A validated, sharded training setup. Nothing is compiled until the first :meth:`step`
    (or :meth:`lower`)."""

    cfg: Any
    model: Any
    tx: Any
    mesh: jax.sharding.Mesh
    rules: tuple
    boxed_state: TrainState  # abstract, logically boxed (ShapeDtypeStruct leaves)
    state_shardings: TrainState  # NamedSharding per leaf, structure of the real (unboxed) state
    batch_shardings: dict  # record field -> NamedSharding of [B, ...]
    _step: Any = None

    @property
    def batch_size(self) -> int:
        return int(self.cfg.train.global_batch_size)

    @property
    def abstract_state(self) -> TrainState:
        """``ShapeDtypeStruct`` s carrying the target shardings (orbax restore onto this mesh, AOT)."""
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), strip_boxes(self.boxed_state), self.state_shardings
        )

    def abstract_batch(self) -> dict:
        return {
            k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.batch_shardings[k])
            for k, s in batch_shapes(self.model, self.batch_size).items()
        }

    def context(self):
        return activate(self.mesh, self.rules)

    def init(self, rng) -> TrainState:
        """A fresh state, created directly in its shardings (no full copy on any device)."""
        fn = jax.jit(lambda r: init_state(self.model, self.tx, r), out_shardings=self.state_shardings)
        with self.context():
            return fn(rng)

    @property
    def jitted_step(self):
        if self._step is None:
            param_sh = self.state_shardings.params
            fn = step_lib.make_step(self.model, self.cfg, self.tx, param_sh, batch_axes(self.rules))
            self._step = jax.jit(
                fn,
                in_shardings=(self.state_shardings, self.batch_shardings),
                out_shardings=(self.state_shardings, NamedSharding(self.mesh, PartitionSpec())),
                donate_argnums=(0,),
            )
        return self._step

    def step(self, state: TrainState, batch: dict):
        """One update; ``state`` is donated (do not reuse it)."""
        with self.context():
            return self.jitted_step(state, batch)

    def lower(self):
        """AOT ``jax.stages.Lowered`` of the step for this mesh (``.compile().memory_analysis()``)."""
        with self.context():
            return self.jitted_step.lower(self.abstract_state, self.abstract_batch())

    def batch_block(self) -> tuple[int, int]:
        key = next(iter(self.batch_shardings))
        return process_batch_block(self.batch_shardings[key], self.batch_size)

    def global_batch(self, local: dict) -> dict:
        """Per-host numpy batch (``[B / processes, ...]`` per field) -> global sharded arrays."""
        missing = [k for k in self.batch_shardings if k not in local]
        if missing:
            raise ValueError(
                f"training records lack field(s) {missing} the model needs (have {sorted(local)}); "
                f"re-create the data for this config"
            )
        out = {}
        for k, sh in self.batch_shardings.items():
            x = np.asarray(local[k])
            shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
            if shape[0] != self.batch_size:
                raise ValueError(
                    f"batch field {k!r} has {x.shape[0]} rows per process; train.global_batch_size="
                    f"{self.batch_size} over {jax.process_count()} processes needs "
                    f"{self.batch_size // jax.process_count()}"
                )
            out[k] = jax.make_array_from_process_local_data(sh, x, shape)
        return out


def setup(cfg, model, tx, *, devices=None, min_replicated_bytes: int = 1 << 20) -> ShardedTrain:
    """Mesh, rules, checks and shardings for training ``model`` with ``tx`` under ``cfg``.

    ``devices`` defaults to every device of every process (``jax.devices()``); pass abstract
    devices (e.g. from a TPU topology) to compile for hardware that is not attached. Raises
    ``ValueError`` naming the config field on any misconfiguration, before compiling.
    """
    mesh = parallel.make_mesh(mesh_config(cfg), devices)
    rules = rules_of(cfg)
    boxed = abstract_state(model, tx, boxed=True)
    validate(cfg, model, mesh, rules, boxed.params, min_replicated_bytes=min_replicated_bytes)
    state_sh = parallel.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
    axes = batch_axes(rules)
    batch_sh = {k: NamedSharding(mesh, PartitionSpec(axes or None)) for k in input_keys(model)}
    return ShardedTrain(cfg, model, tx, mesh, rules, boxed, state_sh, batch_sh)
