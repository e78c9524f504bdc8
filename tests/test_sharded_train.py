"""The sharded (pjit) train step of mmdit.train.sharding on 8 fake CPU devices.

The pytest process stays single-device: the multi-device work runs in subprocesses with
``jax_num_cpu_devices=8`` and reports JSON on its last stdout line (module fixtures, run once).

Model: a tiny joint-attention twin (video grid 3x4x4 patch 1x2x2 -> 12 tokens, audio 12 tokens,
text features cross-attended, 4 heads) under ``local(1) & chunk_causal`` with one-frame chunks.
Gradients are read exactly by stepping with ``optax.sgd(1.0)`` (``params - new_params == grads``);
a separate case runs the real AdamW optimizer for two steps. Tolerance: fp32, 2e-5 relative to the
largest reference value (sharded reductions sum in a different order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# every test here reads one of this module's fixtures: one worker builds them once (pytest.ini's --dist loadgroup)
pytestmark = pytest.mark.xdist_group("sharded_train")

TOL = 2e-5

COMMON = r"""
import json, sys, time
import numpy as np, jax, jax.numpy as jnp, ml_collections as mlc, optax
from mmdit import config_lib
from mmdit.model.diffusion import DiffusionModel
from mmdit.train import sharding, step as step_lib
from mmdit.train.state import init_state, make_optimizer
from mmdit import config_spec

AXES = ("data", "fsdp", "sequence")

def make_cfg(mesh, sp="none", accum=1, batch=8, heads=4):
    c = config_lib.load("configs/base.py")
    with c.unlocked():
        c.model.streams = mlc.ConfigDict(dict(
            video=dict(kind="grid", channels=4, shape=(3, 4, 4), patch=(1, 2, 2), rate=6.25, dim=32, ffn=64, cross=("text",)),
            audio=dict(kind="sequence", channels=6, shape=(12,), patch=(1,), rate=25.0, dim=32, ffn=64, cross=("text",))))
        c.model.conditions = mlc.ConfigDict(dict(text=dict(dim=16, length=5)))
        c.model.num_layers, c.model.heads = 2, heads
        c.model.mask, c.model.chunk_frames = "local(1) & chunk_causal", 1.0
        c.model.sequence_parallel = sp
        c.tasks = dict(t2av=0.5, ti2av=0.5)
        c.train = dict(steps=10, global_batch_size=batch, lr=1e-2, warmup_steps=1, grad_accum=accum, ema_decay=0.9,
                       schedule="constant")
        c.mesh = dict(zip(AXES, mesh), tensor=1)
    return c

def np_batch(model, B, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s.shape).astype(np.float32) for k, s in sharding.batch_shapes(model, B).items()}

def flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(jax.device_get(tree))])

def rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))
"""

EQUIVALENCE = (
    COMMON
    + r"""
out = {}
key = jax.random.key(0)
dev0 = jax.devices()[0]

# ---- reference: plain jax.jit on one device, no mesh, no rules
cfg0 = make_cfg((1, 1, 1))
model = DiffusionModel.from_config(cfg0)
sgd = optax.sgd(1.0)
batch_np = np_batch(model, 8)
ref_state = jax.device_put(init_state(model, sgd, key), dev0)
ref_p0 = flat(ref_state.params)
ref_new, ref_m = jax.jit(step_lib.make_train_step(model, cfg0, sgd))(ref_state, jax.device_put(batch_np, dev0))
ref_g = ref_p0 - flat(ref_new.params)
ref_loss = float(ref_m["loss"])

cases = [((8, 1, 1), "none"), ((2, 4, 1), "none"), ((2, 2, 2), "ulysses"), ((2, 2, 2), "ring"),
         ((1, 2, 4), "ulysses"), ((1, 2, 4), "ring")]
for mesh, sp in cases:
    cfg = make_cfg(mesh, sp)
    run = sharding.setup(cfg, DiffusionModel.from_config(cfg), sgd)
    state = run.init(key)
    p0 = flat(state.params)
    spec = state.params["dit"]["params"]["blocks"]["video"]["ffn"]["up"]["kernel"].sharding.spec
    new, m = run.step(state, run.global_batch(batch_np))
    g = p0 - flat(new.params)
    out[f"{mesh}-{sp}"] = dict(init=rel(p0, ref_p0), loss=abs(float(m["loss"]) - ref_loss) / abs(ref_loss),
                               grads=rel(g, ref_g), grad_scale=float(np.max(np.abs(ref_g))), spec=str(spec),
                               donated=bool(state.params["dit"]["params"]["blocks"]["video"]["ffn"]["up"]["kernel"].is_deleted()))
    print(mesh, sp, out[f"{mesh}-{sp}"], file=sys.stderr, flush=True)

# ---- gradient accumulation: 2 strided microbatches == mean of their single-device gradients
cfg = make_cfg((2, 2, 2), "none", accum=2)
run = sharding.setup(cfg, DiffusionModel.from_config(cfg), sgd)
state = run.init(key)
p0 = flat(state.params)
new, m = run.step(state, run.global_batch(batch_np))
g_acc = p0 - flat(new.params)
rng = jax.random.fold_in(jax.random.wrap_key_data(ref_state.rng), 0)
grad_fn = jax.jit(lambda p, b, r: jax.value_and_grad(step_lib.make_loss_fn(model, cfg0), has_aux=True)(p, b, r))
gs, ls = [], []
for j in range(2):
    mb = {k: v[j::2] for k, v in batch_np.items()}
    (l, _), g = grad_fn(ref_state.params, mb, jax.random.fold_in(rng, j))
    gs.append(flat(g)); ls.append(float(l))
ref_acc = (gs[0] + gs[1]) / 2
def implied_decay(new_state):  # ema' = d * ema + (1 - d) * params'  ->  d, from the update itself
    e0, p1, e1 = flat(ref_state.ema), flat(new_state.params), flat(new_state.ema)
    ok = np.abs(e0 - p1) > 1e-3
    return float(np.median((e1 - p1)[ok] / (e0 - p1)[ok]))
out["accum"] = dict(grads=rel(g_acc, ref_acc), loss=abs(float(m["loss"]) - np.mean(ls)) / abs(np.mean(ls)),
                    differs_from_full_batch=rel(g_acc, ref_g), ema_decay=[implied_decay(new), implied_decay(ref_new)])

# ---- the real optimizer (clip + AdamW, moments sharded like params), two steps
adam = make_optimizer(config_spec.train_spec(cfg0))
r_state = jax.device_put(init_state(model, adam, key), dev0)
r_step = jax.jit(step_lib.make_train_step(model, cfg0, adam))
cfg = make_cfg((2, 4, 1))
run = sharding.setup(cfg, DiffusionModel.from_config(cfg), adam)
s_state = run.init(key)
for i in range(2):
    b = np_batch(model, 8, seed=i)
    r_state, _ = r_step(r_state, jax.device_put(b, dev0))
    s_state, _ = run.step(s_state, run.global_batch(b))
mu = s_state.opt_state[1][0].mu["dit"]["params"]["blocks"]["video"]["ffn"]["up"]["kernel"]
out["adamw"] = dict(params=rel(flat(s_state.params), flat(r_state.params)), ema=rel(flat(s_state.ema), flat(r_state.ema)),
                    opt=rel(flat(s_state.opt_state), flat(r_state.opt_state)), mu_spec=str(mu.sharding.spec),
                    step=int(s_state.step))

# ---- checkpoint on mesh (2, 4, 1), restore onto (1, 2, 4)
from mmdit.train import checkpoint
wd = sys.argv[1]
mngr = checkpoint.make_manager(wd, mlc.ConfigDict(dict(keep_checkpoints=1, async_checkpoint=False)))
checkpoint.save(mngr, 2, s_state)
mngr.wait_until_finished()
cfg2 = make_cfg((1, 2, 4), "ring")
run2 = sharding.setup(cfg2, DiffusionModel.from_config(cfg2), adam)
mngr2 = checkpoint.make_manager(wd, mlc.ConfigDict(dict(keep_checkpoints=1, async_checkpoint=False)))
restored = checkpoint.restore(mngr2, run2.abstract_state)
k2 = restored.params["dit"]["params"]["blocks"]["video"]["ffn"]["up"]["kernel"]
out["restore"] = dict(values=rel(flat(restored), flat(s_state)), step=int(restored.step),
                      spec=str(k2.sharding.spec), mesh=dict(k2.sharding.mesh.shape))
restored, m = run2.step(restored, run2.global_batch(np_batch(model, 8, seed=5)))
out["restore"]["steps_after"] = bool(np.isfinite(float(m["loss"])))
print(json.dumps(out))
"""
)

MISCONFIG = (
    COMMON
    + r"""
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: compiles.append(name) if "backend_compile" in name else None)

def attempt(cfg, **kw):
    try:
        sharding.setup(cfg, DiffusionModel.from_config(cfg), optax.sgd(1.0), **kw)
    except ValueError as e:
        return str(e)
    return None

out = {}
out["product"] = attempt(make_cfg((3, 1, 1)))
out["ulysses_heads"] = attempt(make_cfg((1, 1, 8), "ulysses"))
out["batch"] = attempt(make_cfg((4, 2, 1), batch=6))
out["accum"] = attempt(make_cfg((4, 1, 2), accum=3))
cfg = make_cfg((1, 8, 1))
with cfg.unlocked():
    cfg.mesh.rules = [list(r) if r[0] not in ("embed", "heads", "mlp") else [r[0], None] for r in sharding.rules_of(cfg)]
out["replicated"] = attempt(cfg, min_replicated_bytes=1024)
out["compiles"] = len(compiles)
print(json.dumps(out))
"""
)


def run_script(script: str, *args, timeout: int = 900) -> dict:
    code = "import jax\njax.config.update('jax_num_cpu_devices', 8)\n" + textwrap.dedent(script)
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_backend_optimization_level=0",
        PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_script(EQUIVALENCE, str(tmp_path_factory.mktemp("ckpt")))


CASES = ["(8, 1, 1)-none", "(2, 4, 1)-none", "(2, 2, 2)-ulysses", "(2, 2, 2)-ring", "(1, 2, 4)-ulysses", "(1, 2, 4)-ring"]


@pytest.mark.slow  # one ~2-3 min subprocess (10 compiles) shared by the tests below
@pytest.mark.parametrize("case", CASES)
def test_sharded_step_matches_single_device(results, case):
    r = results[case]
    assert r["init"] < 1e-6, r  # created directly sharded, the values of a plain init
    assert r["loss"] < TOL, r
    assert r["grad_scale"] > 1e-3, r  # the comparison is not vacuous
    assert r["grads"] < TOL, r
    assert r["donated"], r  # donate_argnums=(0,): the input state's buffers were reused
    if int(case.split(",")[1]) > 1:
        assert "fsdp" in r["spec"], r  # FSDP shards the weights on embed


@pytest.mark.slow
def test_grad_accumulation_is_the_mean_of_strided_microbatches(results):
    r = results["accum"]
    assert r["grads"] < TOL and r["loss"] < TOL, r
    assert r["differs_from_full_batch"] > 1e-3, r  # different noise draws: a real check of the split
    assert r["ema_decay"][0] == pytest.approx(r["ema_decay"][1], abs=1e-4), r  # same EMA rule as step.py


@pytest.mark.slow
def test_adamw_moments_follow_params_and_match_single_device(results):
    r = results["adamw"]
    assert r["step"] == 2
    assert max(r["params"], r["ema"], r["opt"]) < TOL, r
    assert "fsdp" in r["mu_spec"], r


@pytest.mark.slow
def test_checkpoint_restores_onto_a_different_mesh(results):
    r = results["restore"]
    assert r["values"] == 0.0 and r["step"] == 2, r
    assert r["mesh"] == {"data": 1, "fsdp": 2, "sequence": 4, "tensor": 1}, r
    assert "fsdp" in r["spec"], r
    assert r["steps_after"]


@pytest.fixture(scope="module")
def misconfig():
    return run_script(MISCONFIG, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, needles",
    [
        ("product", ["multiply to 3", "8 devices", "-1"]),
        ("ulysses_heads", ["heads=4", "mesh.sequence=8", "ring"]),
        ("batch", ["global batch size 6", "multiple of 8"]),
        ("accum", ["train.grad_accum=3", "not divisible by train.grad_accum=3"]),  # config_spec, before the mesh check
        ("replicated", ["fully replicated", "mesh.rules"]),
    ],
)
def test_misconfigured_meshes_fail_before_compiling(misconfig, case, needles):
    msg = misconfig[case]
    assert msg is not None, case
    for n in needles:
        assert n in msg, (n, msg)
    assert misconfig["compiles"] == 0  # every check ran before anything compiled
