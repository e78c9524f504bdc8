"""grain input pipeline: batching, per-process sharding, resumable state, orbax hook."""

import gc

import grain
import numpy as np
import pytest

from mmdit.data import pipeline as P
from mmdit.data.records import ShardWriter

N = 24


def add_double(ex: dict) -> dict:  # module level: picklable for grain workers
    return dict(ex, double=ex["x"] * 2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("records")
    with ShardWriter(str(d), "train", 5, producer="pytest fixture") as w:
        for i in range(N):
            w.write({"index": i, "x": np.full((2, 3), i, np.float32), "text": f"t{i}"})
    return str(d)


@pytest.fixture(autouse=True)
def _collect_iterators():
    yield
    gc.collect()  # closes grain workers/threads of finished iterators before the next test


def _indices(batches):
    return [b["index"].tolist() for b in batches]


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_batches_keys_shapes_and_transform(data_dir):
    it = P.make_train_iterator(data_dir, global_batch_size=4, seed=0, transform=add_double)
    b = next(it)
    assert b["x"].shape == (4, 2, 3) and b["x"].dtype == np.float32
    assert b["index"].shape == (4,) and b["text"].shape == (4,)
    np.testing.assert_array_equal(b["double"], 2 * b["x"])
    assert [f"t{i}" for i in b["index"]] == b["text"].tolist()


def test_shuffle_is_seeded_and_covers_each_epoch(data_dir):
    run = lambda seed: _indices(
        _take(
            P.make_train_iterator(  # noqa: E731
                data_dir, global_batch_size=4, seed=seed
            ),
            12,
        )
    )
    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    flat = sum(a, [])
    epoch1, epoch2 = flat[:N], flat[N:]
    assert sorted(epoch1) == list(range(N)) and sorted(epoch2) == list(range(N))
    assert epoch1 != list(range(N)) and epoch1 != epoch2  # shuffled, re-shuffled per epoch


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_state_resume_matches_uninterrupted(data_dir, num_workers):
    kw = dict(global_batch_size=4, seed=7, num_workers=num_workers, transform=add_double)
    it = P.make_train_iterator(data_dir, **kw)
    first = _indices(_take(it, 5))
    state = it.get_state()
    assert isinstance(state, bytes)
    uninterrupted = _indices(_take(it, 5))  # crosses the epoch boundary (6 batches per epoch)
    del it
    resumed = P.make_train_iterator(data_dir, **kw)  # e.g. after a restart
    resumed.set_state(state)
    after = _take(resumed, 5)
    assert _indices(after) == uninterrupted
    assert sorted(sum(first, []) + sum(uninterrupted, [])[:4]) == list(range(N))
    np.testing.assert_array_equal(after[0]["double"], 2 * after[0]["x"])


def test_state_from_another_dataset_is_rejected(data_dir, tmp_path):
    with ShardWriter(str(tmp_path), "other", 5) as w:
        for i in range(N):
            w.write({"index": i + 1000, "x": np.zeros((2, 3), np.float32), "text": "o"})
    it = P.make_train_iterator(data_dir, global_batch_size=4, seed=7)
    next(it)
    other = P.make_train_iterator(str(tmp_path), global_batch_size=4, seed=7)
    with pytest.raises(ValueError, match="DataSource in checkpoint does not match"):
        other.set_state(it.get_state())


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_processes_partition_each_epoch(data_dir, shuffle):
    seen = []
    for i in range(2):
        it = P.make_train_iterator(
            data_dir,
            global_batch_size=4,
            seed=3,
            shuffle=shuffle,
            num_epochs=1,
            shard_options=grain.sharding.ShardOptions(shard_index=i, shard_count=2, drop_remainder=True),
        )
        batches = list(it)
        assert all(b["index"].shape == (2,) for b in batches)  # per-host batch = 4 / 2
        seen.append(sum(_indices(batches), []))
    assert len(seen[0]) == len(seen[1]) == N // 2
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(N))


def test_batch_size_must_divide_over_processes(data_dir):
    with pytest.raises(
        ValueError,
        match=r"global_batch_size=5 is not divisible by the 2 JAX "
        r"processes.*multiple of 2",
    ):
        P.make_train_iterator(data_dir, global_batch_size=5, seed=0, shard_options=grain.sharding.ShardOptions(0, 2, True))
    with pytest.raises(ValueError, match="fewer than one batch of 32"):
        P.make_train_iterator(data_dir, global_batch_size=32, seed=0, num_epochs=1)


def test_eval_iterator_single_ordered_pass(data_dir):
    batches = list(P.make_eval_iterator(data_dir, global_batch_size=5))
    assert sum(_indices(batches), []) == list(range(N))
    assert [len(b["index"]) for b in batches] == [5, 5, 5, 5, 4]
    full = list(P.make_eval_iterator(data_dir, global_batch_size=5, drop_remainder=True))
    assert len(full) == 4


def test_orbax_checkpoint_manager_saves_iterator_with_params(data_dir, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    kw = dict(global_batch_size=4, seed=11)
    reference = _indices(_take(P.make_train_iterator(data_dir, **kw), 7))
    it = P.make_train_iterator(data_dir, **kw)
    _take(it, 4)
    items = ("params", P.DATA_ITER_ITEM)
    params = {"w": np.arange(3.0)}
    with ocp.CheckpointManager(str(tmp_path), item_names=items) as mngr:
        mngr.save(
            4, args=ocp.args.Composite(params=ocp.args.StandardSave(params), **{P.DATA_ITER_ITEM: P.iterator_save_args(it)})
        )
        mngr.wait_until_finished()
    assert (tmp_path / "4" / P.DATA_ITER_ITEM / "process_0-of-1.json").exists()
    fresh = P.make_train_iterator(data_dir, **kw)
    with ocp.CheckpointManager(str(tmp_path), item_names=items) as mngr:
        restored = mngr.restore(
            mngr.latest_step(),
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore({"w": np.zeros(3)}), **{P.DATA_ITER_ITEM: P.iterator_restore_args(fresh)}
            ),
        )
    np.testing.assert_array_equal(restored["params"]["w"], params["w"])
    assert restored[P.DATA_ITER_ITEM] is fresh
    assert _indices(_take(fresh, 3)) == reference[4:]
