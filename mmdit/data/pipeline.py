"""The grain input pipeline: records on disk → per-host batches with resumable iterator state.

Each JAX process reads its own slice of the dataset (``grain.sharding.ShardByJaxProcess``: the
record keys are split into ``process_count`` contiguous, equal ranges, the remainder dropped) and
shuffles it globally within that slice, re-shuffling every epoch. It batches
``global_batch_size / process_count`` examples, stacking every key (strings become ``<U``
arrays); a train step then assembles the per-host batches into one global array, e.g. with
``jax.make_array_from_process_local_data``.

**Resuming.** The iterator is a ``grain.DataLoaderIterator``: ``get_state()`` returns small JSON
bytes (the next record index per worker), ``set_state()`` on a fresh iterator built with the same
arguments continues with exactly the batches the old one would have produced. grain checks that the
sampler, worker count and data source (``repr``: dataset content id, not path) match.

**Orbax.** Save the iterator in the same ``CheckpointManager`` step as the params::

    mngr = ocp.CheckpointManager(workdir, item_names=("state", DATA_ITER_ITEM))
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            **{DATA_ITER_ITEM: iterator_save_args(it)}))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        **{DATA_ITER_ITEM: iterator_restore_args(it)}))   # restores `it` in place

File layout: every process writes its own state file,
``{workdir}/{step}/data_iter/process_{i}-of-{n}.json`` (grain's ``CheckpointHandler``). Restoring
therefore needs the same process count *and* the same ``num_workers``; a different host count
needs grain's ``ElasticIterator`` (not used here).

**Multiprocessing workers (``num_workers > 0``).** grain's ``mp_prefetch`` reads absl flags;
outside ``absl.app.run`` they are unparsed and grain raises ``UnparsedFlagAccessError``. This
module marks absl flags parsed (with their defaults) when it builds a loader with workers and
nobody parsed them; programs that define their own absl flags should run under ``absl.app.run``.
Workers start with ``spawn``-like semantics: transforms and the data source must be picklable
(module-level functions/classes) and each worker re-imports this package (and the ``__main__``
module: guard scripts with ``if __name__ == "__main__":``). Worker startup costs seconds (each
imports grain, which imports jax).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import grain

from mmdit.data.records import RecordDataSource, Schema, open_dataset

DATA_ITER_ITEM = "data_iter"
DEFAULT_READ_OPTIONS = dict(num_threads=4, prefetch_buffer_size=64)

Transform = Callable[[dict], dict] | grain.transforms.Map | grain.transforms.RandomMap | grain.transforms.Filter


@dataclasses.dataclass(frozen=True)
class _FnMap(grain.transforms.Map):
    """Wraps a plain callable ``example -> example`` as a grain Map (picklable if ``fn`` is)."""

    fn: Callable[[dict], dict]

    def map(self, element):
        return self.fn(element)


def _as_operations(transform) -> list:
    if transform is None:
        return []
    if isinstance(transform, (list, tuple)):
        return [op for t in transform for op in _as_operations(t)]
    if isinstance(transform, grain.transforms.Transformation):  # Map, RandomMap, Filter, Batch...
        return [transform]
    if callable(transform):
        return [_FnMap(transform)]
    raise TypeError(f"transform must be a callable, a grain transform or a list of them, got {type(transform).__name__}")


def ensure_absl_flags_parsed() -> None:
    """Marks absl flags as parsed (defaults) if no one parsed them; grain workers read them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def per_host_batch_size(global_batch_size: int, shard_count: int) -> int:
    """``global_batch_size / shard_count``; ``ValueError`` unless it divides evenly."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by the {shard_count} JAX "
            f"processes reading data; use a multiple of {shard_count} (e.g. "
            f"{(global_batch_size // shard_count + 1) * shard_count})"
        )
    return global_batch_size // shard_count


def _make_loader(
    source: RecordDataSource,
    *,
    batch_size: int,
    seed: int | None,
    shuffle: bool,
    num_epochs: int | None,
    num_workers: int,
    worker_buffer_size: int,
    drop_remainder: bool,
    transform,
    shard_options: grain.sharding.ShardOptions,
    read_options: grain.ReadOptions | None,
) -> grain.DataLoader:
    if len(source) == 0:
        raise ValueError(
            f"{source.data_dir} holds no examples (skipped: "
            f"{source.manifest.get('skipped')}); fix the inputs and re-run "
            f"{source.manifest.get('producer')}"
        )
    per_shard = len(source) // shard_options.shard_count
    if num_epochs is not None and drop_remainder and per_shard * num_epochs < batch_size:
        raise ValueError(
            f"{source.data_dir}: each of {shard_options.shard_count} processes gets {per_shard} "
            f"examples x {num_epochs} epochs, fewer than one batch of {batch_size}: lower the "
            "batch size, add epochs or data, or pass drop_remainder=False"
        )
    if num_workers > 0:
        ensure_absl_flags_parsed()
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shard_options=shard_options, shuffle=shuffle, num_epochs=num_epochs, seed=seed
    )
    ops = _as_operations(transform) + [grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder)]
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=ops,
        worker_count=num_workers,
        worker_buffer_size=worker_buffer_size,
        shard_options=shard_options,
        read_options=read_options or grain.ReadOptions(**DEFAULT_READ_OPTIONS),
    )


def make_train_iterator(
    data_dir: str,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_workers: int = 0,
    worker_buffer_size: int = 2,
    drop_remainder: bool = True,
    transform: Transform | Sequence[Transform] | None = None,
    num_epochs: int | None = None,
    shard_options: grain.sharding.ShardOptions | None = None,
    read_options: grain.ReadOptions | None = None,
    expected_schema: Schema | None = None,
) -> grain.DataLoaderIterator:
    """A resumable iterator of per-host training batches from the records in ``data_dir``.

    Args:
      data_dir: a directory written by :class:`mmdit.data.records.ShardWriter`.
      global_batch_size: examples per step over all processes; each process yields
        ``global_batch_size / shard_count`` (``ValueError`` unless divisible).
      seed: shuffle seed (non-negative, < 2**32); the same seed gives the same order.
      shuffle: shuffle within this process's slice, a new permutation every epoch.
      num_workers: grain worker processes (0 = decode in this process with ``read_options``
        threads). See the module docstring for the absl/pickling caveats.
      worker_buffer_size: batches each worker prepares ahead.
      drop_remainder: drop a final partial batch (only reachable with ``num_epochs``).
      transform: per-example ``example -> example`` callable(s) or grain transforms (Map,
        RandomMap for deterministic per-record randomness, Filter), applied before batching.
      num_epochs: ``None`` repeats forever.
      shard_options: defaults to ``ShardByJaxProcess(drop_remainder=True)``; pass
        ``grain.sharding.ShardOptions(i, n)`` to simulate process ``i`` of ``n``.
      read_options: ``grain.ReadOptions``; default ``DEFAULT_READ_OPTIONS``.
      expected_schema: checked against the dataset manifest (see ``open_dataset``).

    Returns:
      A ``grain.DataLoaderIterator``; ``next(it)`` is a dict of stacked numpy arrays, each
      ``[per_host_batch, ...]`` (keys with varying shapes cannot be stacked: pad them in
      ``transform``).
    """
    shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    batch = per_host_batch_size(global_batch_size, shard_options.shard_count)
    source = open_dataset(data_dir, expected_schema=expected_schema)
    return iter(
        _make_loader(
            source,
            batch_size=batch,
            seed=seed,
            shuffle=shuffle,
            num_epochs=num_epochs,
            num_workers=num_workers,
            worker_buffer_size=worker_buffer_size,
            drop_remainder=drop_remainder,
            transform=transform,
            shard_options=shard_options,
            read_options=read_options,
        )
    )


def make_eval_iterator(
    data_dir: str,
    *,
    global_batch_size: int,
    num_workers: int = 0,
    drop_remainder: bool = False,
    transform: Transform | Sequence[Transform] | None = None,
    shard_options: grain.sharding.ShardOptions | None = None,
    read_options: grain.ReadOptions | None = None,
    expected_schema: Schema | None = None,
) -> grain.DataLoaderIterator:
    """One pass over ``data_dir`` in record order, per host (same arguments as training).

    Every process gets the same number of examples (the ``< process_count`` remainder is dropped)
    so multi-host eval loops stay in step; with ``drop_remainder=False`` the last batch may be
    smaller than ``global_batch_size / process_count``.
    """
    shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    batch = per_host_batch_size(global_batch_size, shard_options.shard_count)
    source = open_dataset(data_dir, expected_schema=expected_schema)
    return iter(
        _make_loader(
            source,
            batch_size=batch,
            seed=None,
            shuffle=False,
            num_epochs=1,
            num_workers=num_workers,
            worker_buffer_size=1,
            drop_remainder=drop_remainder,
            transform=transform,
            shard_options=shard_options,
            read_options=read_options,
        )
    )


def iterator_save_args(iterator: grain.DataLoaderIterator) -> Any:
    """Orbax args that save ``iterator``'s state (``grain.checkpoint.CheckpointSave``)."""
    return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DataLoaderIterator) -> Any:
    """Orbax args that restore a checkpointed state *into* ``iterator`` (a fresh one built with
    the same arguments); ``mngr.restore(...)[DATA_ITER_ITEM]`` is that same iterator."""
    return grain.checkpoint.CheckpointRestore(iterator)
