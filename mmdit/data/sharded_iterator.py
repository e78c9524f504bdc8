"""Which slice of the training records each process reads, as one resumable iterator.

The record set is split into ``cfg.data.num_shards`` shards (default: the process count). The
process whose devices hold global batch block ``b`` of ``n`` (:meth:`ShardedTrain.batch_block`: by
device placement, not by process index) reads shards ``[b·V/n, (b+1)·V/n)`` and concatenates their
per-shard batches (:class:`ConcatShards`, along the batch axis). With ``V`` fixed, the global batch
of every step is the same for any process count that divides ``V`` -- a 1-process run with
``data.num_shards=2`` sees exactly the data of a 2-process run. Each process checkpoints its own
iterator state (grain's ``process_i-of-n.json``), so resuming needs the same process count.
"""

from __future__ import annotations

import json
from typing import Any


class ConcatShards:
    """Iterates several grain iterators in lockstep and concatenates their batches along axis 0.

    Checkpointable by grain's orbax handler (``get_state`` -> bytes, ``set_state(bytes)``)."""

    def __init__(self, iterators):
        self.iterators = list(iterators)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        import numpy as np

        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}

    def get_state(self) -> bytes:
        return json.dumps({"shards": [it.get_state().decode() for it in self.iterators]}).encode()

    def set_state(self, state: bytes) -> None:
        shards = json.loads(state.decode())["shards"]
        if len(shards) != len(self.iterators):
            raise ValueError(
                f"data iterator checkpoint holds {len(shards)} shards, this process reads "
                f"{len(self.iterators)}: resume with the same data.num_shards and process count"
            )
        for it, s in zip(self.iterators, shards):
            it.set_state(s.encode())

    def start_prefetch(self) -> None:
        for it in self.iterators:
            if hasattr(it, "start_prefetch"):
                it.start_prefetch()


def shard_range(block: int, blocks: int, num_shards: int | None) -> range:
    """The data shards the process holding batch block ``block`` of ``blocks`` reads."""
    v = blocks if num_shards is None else int(num_shards)
    if v < 1 or v % blocks:
        raise ValueError(
            f"data.num_shards={v} must be a positive multiple of the {blocks} processes; use e.g. data.num_shards={blocks}"
        )
    per = v // blocks
    return range(block * per, (block + 1) * per)


def data_iterator(cfg, data_dir: str, block: tuple[int, int] = (0, 1)) -> Any:
    """This process's training iterator: per-host batches ``[B / processes, ...]`` (numpy dicts)."""
    import grain

    from mmdit.data import pipeline

    from mmdit import config_spec

    B, data = config_spec.train_spec(cfg).global_batch_size, config_spec.data_spec(cfg)
    num_shards = data.num_shards
    shards = shard_range(block[0], block[1], num_shards)
    v = block[1] * len(shards)
    if B % v:
        raise ValueError(
            f"train.global_batch_size={B} is not divisible by the {v} data shards (data.num_shards); use a multiple of {v}"
        )
    its = [
        pipeline.make_train_iterator(
            data_dir,
            global_batch_size=B,
            seed=int(cfg.seed),
            num_workers=data.num_workers,
            shard_options=grain.sharding.ShardOptions(shard_index=s, shard_count=v, drop_remainder=True),
        )
        for s in shards
    ]
    return its[0] if len(its) == 1 else ConcatShards(its)
