"""Multi-host training on one machine: 2 processes x 4 fake CPU devices (gloo collectives), launched
by launch/local.sh, train configs/demo.py:tiny for 3 steps, checkpoint, stop, resume to step 6, and
end with the params of a 1-process x 8-device run of the same 6 steps (same mesh data=2 x fsdp=4,
same data: ``data.num_shards=2`` makes the global batches independent of the process count).

Also: the launchers' ``--dry-run`` output and how :mod:`mmdit.parallel.distributed` reads
config/environment (pure, fast).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mmdit.data import sharded_iterator
from mmdit.parallel import distributed

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-6  # absolute, on params of scale ~1 (see the comparison below)

CONFIG = """
from mmdit import config_lib

def get_config(arg=None):
    c = config_lib.load({demo!r})
    c.train.global_batch_size = 8
    c.train.steps = 6
    c.train.checkpoint_every = 3
    c.train.log_every = 1
    c.train.async_checkpoint = False
    c.mesh = dict(data=2, fsdp=4, sequence=1, tensor=1)
    c.data.num_shards = 2
    c.data.dir = {data!r}
    return c
"""

DRIVER = """
import json, sys
import numpy as np
from mmdit import config_lib
from mmdit.train.loop import train

cfg = config_lib.load(sys.argv[1])
workdir, stop, out = sys.argv[2], int(sys.argv[3]) or None, sys.argv[4]
train(cfg, workdir, progress=False, stop_after=stop)

import jax
from jax.experimental import multihost_utils
from mmdit.model.diffusion import DiffusionModel
from mmdit.train import checkpoint, sharding
from mmdit.train.state import make_optimizer
from mmdit import config_spec

run = sharding.setup(cfg, DiffusionModel.from_config(cfg), make_optimizer(config_spec.train_spec(cfg)))
state = checkpoint.restore(checkpoint.make_manager(workdir, read_only=True), run.abstract_state)
params = multihost_utils.process_allgather(state.params, tiled=True)
flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(params)])
if jax.process_index() == 0:
    np.save(out, flat)
    print(json.dumps(dict(step=int(state.step), processes=jax.process_count(), devices=jax.device_count(),
                          fingerprint=[float(flat.sum()), float(np.square(flat).sum())])))
"""


def _env(**extra):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_backend_optimization_level=0",
        PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    for k in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        env.pop(k, None)
    env.update(extra)
    return env


def _run(cmd, env, timeout=900):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # ~3-5 min on 2 shared cores: three training runs (two of them 2-process)
def test_two_processes_checkpoint_resume_match_single_process(tmp_path):
    from mmdit import config_lib
    from mmdit.data.synth_records import synth

    synth(config_lib.load("configs/demo.py:tiny"), str(tmp_path / "data"), num_eval=0, progress=False)
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text(CONFIG.format(demo=str(REPO / "configs/demo.py") + ":tiny", data=str(tmp_path / "data/train")))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    multi, single = tmp_path / "multi", tmp_path / "single"
    logs = tmp_path / "logs"

    local = [
        str(REPO / "launch/local.sh"),
        "-n",
        "2",
        "-d",
        "4",
        "--logdir",
        str(logs),
        "--",
        sys.executable,
        str(driver),
        str(cfg_file),
    ]
    first = _run(local + [str(multi), "3", str(tmp_path / "multi_3.npy")], _env())
    assert first == {**first, "step": 3, "processes": 2, "devices": 8}
    ckpt = multi / "checkpoints" / "3"
    assert sorted(f for f in os.listdir(ckpt / "data_iter") if f.endswith(".json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]  # each process saved its own iterator
    resumed = _run(local + [str(multi), "0", str(tmp_path / "multi_6.npy")], _env())
    assert resumed["step"] == 6 and resumed["processes"] == 2

    ref = _run(
        [sys.executable, str(driver), str(cfg_file), str(single), "0", str(tmp_path / "single_6.npy")],
        _env(XLA_FLAGS="--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8"),
    )
    assert ref["step"] == 6 and ref["processes"] == 1 and ref["devices"] == 8

    a, b = np.load(tmp_path / "multi_6.npy"), np.load(tmp_path / "single_6.npy")
    p3 = np.load(tmp_path / "multi_3.npy")
    assert a.shape == b.shape
    np.testing.assert_allclose(resumed["fingerprint"], ref["fingerprint"], rtol=1e-6)
    # Params: cross-process reductions sum in another order (~1e-7 relative in the grads); Adam's
    # m / sqrt(v) turns that into visible differences only for the few weights whose gradient is ~0
    # (measured: 0.02% of weights above 1e-6, max 4e-5, median 0). Different data or a wrong resume
    # would move most weights by about one update (lr = 1e-3).
    diff = np.abs(a - b)
    assert np.median(diff) < 1e-7 and np.mean(diff > TOL) < 1e-3, (np.median(diff), np.mean(diff > TOL))
    assert diff.max() < 1e-4, diff.max()
    assert np.median(np.abs(a - p3)) > 1e-4  # steps 4-6 really trained after the resume
    losses = {
        name: [json.loads(line)["loss"] for line in open(tmp_path / name / "metrics.jsonl")] for name in ("multi", "single")
    }
    np.testing.assert_allclose(losses["multi"], losses["single"], rtol=1e-5)

    # only process 0 logs: each step once per run (steps 1-3 from the first run, 4-6 from the resume)
    with open(multi / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not (logs / "process_1.log").read_text().count("Traceback")


# ------------------------------------------------------------------------------------------------
# fast checks


def test_resolve_reads_config_then_env_then_cluster():
    env = {
        distributed.ENV_COORDINATOR: "10.0.0.1:1234",
        distributed.ENV_NUM_PROCESSES: "4",
        distributed.ENV_PROCESS_ID: "3",
        distributed.ENV_LOCAL_DEVICE_IDS: "0,1",
    }
    assert distributed.resolve(None, env) == dict(
        coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3, local_device_ids=[0, 1]
    )
    cfg = {"distributed": {"coordinator": "h:1", "num_processes": 2, "process_id": 0}}
    assert distributed.resolve(cfg, env)["coordinator_address"] == "h:1"
    assert distributed.resolve(None, {}) is None  # single process
    assert distributed.resolve(None, {"SLURM_NTASKS": "1"}) is None
    assert distributed.resolve(None, {"SLURM_NTASKS": "16"}) == {}  # jax auto-detects SLURM
    assert distributed.resolve(None, {"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == {}
    assert distributed.resolve(None, {distributed.ENV_MODE: "auto"}) == {}


@pytest.mark.parametrize(
    "env, needles",
    [
        ({"MMDIT_COORDINATOR": "h:1", "MMDIT_NUM_PROCESSES": "2"}, ["MMDIT_PROCESS_ID", "set both"]),
        ({"MMDIT_COORDINATOR": "h:1", "MMDIT_NUM_PROCESSES": "2", "MMDIT_PROCESS_ID": "2"}, ["MMDIT_PROCESS_ID=2", "[0, 2)"]),
        ({"MMDIT_COORDINATOR": "h:1", "MMDIT_NUM_PROCESSES": "two", "MMDIT_PROCESS_ID": "0"}, ["MMDIT_NUM_PROCESSES", "integer"]),
    ],
)
def test_resolve_errors_name_the_variable(env, needles):
    with pytest.raises(ValueError) as e:
        distributed.resolve(None, env)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_shard_range_and_concat_state_roundtrip():
    assert list(sharded_iterator.shard_range(0, 1, 2)) == [0, 1]  # 1 process reads both shards
    assert list(sharded_iterator.shard_range(1, 2, 2)) == [1]
    assert list(sharded_iterator.shard_range(1, 2, None)) == [1]
    with pytest.raises(ValueError, match="data.num_shards=3"):
        sharded_iterator.shard_range(0, 2, 3)

    class Fake:
        def __init__(self, i):
            self.i, self.n = i, 0

        def __next__(self):
            self.n += 1
            return {"x": np.full((2,), self.i * 100 + self.n)}

        def get_state(self):
            return json.dumps({"n": self.n}).encode()

        def set_state(self, s):
            self.n = json.loads(s)["n"]

    it = sharded_iterator.ConcatShards([Fake(0), Fake(1)])
    assert next(it)["x"].tolist() == [1, 1, 101, 101]
    state = it.get_state()
    next(it)
    it2 = sharded_iterator.ConcatShards([Fake(0), Fake(1)])
    it2.set_state(state)
    assert next(it2)["x"].tolist() == [2, 2, 102, 102]


def _dry(*args):
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_launchers_dry_run_print_what_they_would_run():
    out = _dry("launch/local.sh", "--dry-run", "-n", "2", "-d", "4", "-p", "4321", "--", "--config", "c.py")
    lines = out.strip().splitlines()
    assert len(lines) == 3 and lines[-1] == "wait"
    for i in range(2):
        assert f"MMDIT_PROCESS_ID={i}" in lines[i] and "MMDIT_COORDINATOR=127.0.0.1:4321" in lines[i]
        assert "--xla_force_host_platform_device_count=4" in lines[i] and "mmdit.cli.train --config c.py" in lines[i]
    out = _dry("launch/tpu_pod.sh", "--dry-run", "--tpu", "pod", "--zone", "us-east5-a", "--", "--config", "c.py")
    assert "gcloud compute tpus tpu-vm ssh pod" in out and "--worker=all" in out and "MMDIT_DISTRIBUTED=auto" in out
    out = _dry(
        "launch/xpk.sh",
        "--dry-run",
        "--cluster",
        "k",
        "--workload",
        "w",
        "--image",
        "img",
        "--tpu-type",
        "v5p-64",
        "--num-slices",
        "2",
        "--",
        "--config",
        "c.py",
    )
    assert out.startswith("xpk workload create") and "--tpu-type v5p-64 --num-slices 2" in out
    out = _dry("launch/slurm.sh", "--dry-run", "--config", "c.py")
    assert "MMDIT_NUM_PROCESSES=" in out and "mmdit.cli.train --no-progress --config c.py" in out
    out = _dry("bash", "launch/slurm.sbatch", "--dry-run", "--config", "c.py")
    assert out.startswith("srun") and "launch/slurm.sh --config c.py" in out
