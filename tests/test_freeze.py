"""Training groups (``train.freeze`` / ``train.trainable`` / ``train.lr_groups``) on ``configs/demo.py:tiny``:
frozen params stay bit-identical and have no optimizer state, lr multipliers scale the update,
bad patterns are config errors, a frozen run checkpoints and resumes, the memory plan shrinks."""

import json
import math
import os

import jax
import numpy as np
import pytest

from mmdit import config_spec
from mmdit.model.diffusion import DiffusionModel
from mmdit.train import checkpoint, plan, sharding
from mmdit.train.state import abstract_state, make_optimizer
from mmdit.util.converted import path_str

CONFIG = "configs/demo.py:tiny"
VIDEO = ("dit/params/blocks/video/*", "dit/params/video/*")
FREEZE_VIDEO = [f"train.freeze={VIDEO!r}", "train.warmup_steps=0", "train.schedule='constant'"]


def flat(tree) -> dict:
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flat_shapes(tree) -> dict:
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def is_video(path: str) -> bool:
    return path.startswith(("dit/params/blocks/video/", "dit/params/video/"))


def random_batch(model, batch_size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for k, s in sharding.batch_shapes(model, batch_size).items():
        if s.dtype == np.bool_:
            out[k] = np.ones(s.shape, bool)
        elif np.issubdtype(s.dtype, np.integer):
            out[k] = rng.integers(0, 200, s.shape).astype(s.dtype)
        else:
            out[k] = rng.standard_normal(s.shape).astype(s.dtype)
    return out


def setup(overrides):
    cfg = config_spec.load(CONFIG, overrides)
    model = DiffusionModel.from_config(cfg)
    run = sharding.setup(cfg, model, make_optimizer(config_spec.train_spec(cfg)))
    return cfg, model, run


def test_frozen_params_have_no_optimizer_state():
    _, _, run = setup(FREEZE_VIDEO)
    state = sharding.strip_boxes(run.boxed_state)  # abstract: nothing allocated or compiled
    params, opt_paths = flat_shapes(state.params), list(flat_shapes(state.opt_state))
    trainable = [p for p in params if not is_video(p)]
    assert trainable and len(trainable) < len(params)
    # no Adam moment exists for a frozen param; each trainable one has exactly one mu and one nu
    assert not [p for p in opt_paths if "/video/" in p], [p for p in opt_paths if "/video/" in p][:3]
    for p in trainable:
        assert sum(o.endswith("/mu/" + p) for o in opt_paths) == 1, p
        assert sum(o.endswith("/nu/" + p) for o in opt_paths) == 1, p
    assert len([o for o in opt_paths if "/mu/" in o or "/nu/" in o]) == 2 * len(trainable)
    # the shardings follow the same (smaller) tree; the EMA keeps every param (exports read it)
    assert len(jax.tree.leaves(run.state_shardings.opt_state)) == len(opt_paths)
    assert list(flat_shapes(state.ema)) == list(params)


@pytest.mark.slow
def test_frozen_video_stream_is_bit_identical_after_three_steps():
    _, model, run = setup(FREEZE_VIDEO)
    state = run.init(jax.random.key(0))
    before = flat(state.params)
    video = [p for p in before if is_video(p)]
    trainable = [p for p in before if not is_video(p)]
    batch = run.global_batch(random_batch(model, run.batch_size))
    for _ in range(3):
        state, metrics = run.step(state, batch)
    after, ema = flat(state.params), flat(state.ema)
    assert int(state.step) == 3 and np.isfinite(float(metrics["loss"]))
    for p in video:
        np.testing.assert_array_equal(after[p], before[p], err_msg=p)
        np.testing.assert_array_equal(ema[p], before[p], err_msg=p)
    changed = [p for p in trainable if not np.array_equal(after[p], before[p])]
    assert len(changed) == len(trainable), sorted(set(trainable) - set(changed))[:5]
    assert any(not np.array_equal(ema[p], before[p]) for p in trainable)


def test_lr_groups_scale_the_update_and_last_pattern_wins():
    base = ["train.warmup_steps=0", "train.schedule='constant'", "train.weight_decay=0.0", "train.grad_clip=1e9"]
    cfg = config_spec.load(CONFIG, base)
    shapes = sharding.strip_boxes(jax.eval_shape(DiffusionModel.from_config(cfg).init, jax.random.key(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    grads = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)

    def second_update(overrides):  # the warmup schedule gives lr 0 at count 0
        tx = make_optimizer(config_spec.train_spec(config_spec.load(CONFIG, base + overrides)))
        update = jax.jit(tx.update)
        _, opt_state = update(grads, tx.init(params), params)
        return flat(update(grads, opt_state, params)[0])

    ref = second_update([])
    groups = "{'*': 0.1, 'dit/params/blocks/audio/*': 1.0, 'dit/params/blocks/audio/ffn/*': 0.5}"
    got = second_update([f"train.lr_groups={groups}"])
    assert any(p.startswith("dit/params/blocks/audio/ffn/") for p in ref)
    for p, u in ref.items():
        assert np.abs(u).min() > 0, p
        want = 0.5 if p.startswith("dit/params/blocks/audio/ffn/") else 1.0 if p.startswith("dit/params/blocks/audio/") else 0.1
        np.testing.assert_allclose(got[p], u * want, rtol=1e-5, err_msg=p)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["train.freeze=('dit/blocks/video/*',)"], "train.freeze"),
        (["train.trainable=('dit/params/blocks/audo/*',)"], "train.trainable"),
        (["train.lr_groups={'nothing/*': 0.5}"], "train.lr_groups"),
        (["train.lr_groups={'dit/*': -1.0}"], "train.lr_groups"),
        (["train.freeze=('*',)"], "train.freeze"),
        (["train.freeze='dit/*'", "train.trainable=('dit/*',)"], "train.freeze"),
    ],
)
def test_bad_patterns_are_config_errors_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as e:
        config_spec.load(CONFIG, overrides)
    if "matches no param" in str(e.value):
        assert "'dit/params/blocks/video/*'" in str(e.value)  # shows what the paths look like


def test_freeze_wins_over_trainable():
    groups = config_spec.train_spec(
        config_spec.load(CONFIG, ["train.trainable=('dit/*',)", "train.freeze=('dit/params/blocks/video/*',)"])
    ).param_groups
    assert groups.trains("dit/params/blocks/audio/ffn/up/kernel")
    assert not groups.trains("dit/params/blocks/video/ffn/up/kernel")
    assert not groups.trains("text_encoder/params/final_norm/scale")  # not in trainable


def test_plan_counts_optimizer_state_of_trainable_params_only():
    full = config_spec.load(CONFIG)
    frozen = config_spec.load(CONFIG, FREEZE_VIDEO)
    model = DiffusionModel.from_config(full)
    rules = sharding.rules_of(full)
    parts = {}
    for name, cfg in (("full", full), ("frozen", frozen)):
        boxed = abstract_state(model, make_optimizer(config_spec.train_spec(cfg)), boxed=True)
        parts[name] = plan.estimate(cfg, model, boxed, {"data": 1}, rules).parts
    shapes = jax.tree_util.tree_flatten_with_path(
        sharding.strip_boxes(abstract_state(model, make_optimizer(config_spec.train_spec(full))).params)
    )[0]
    video_bytes = sum(4 * math.prod(x.shape) for p, x in shapes if is_video(path_str(p)))
    rest_bytes = sum(4 * math.prod(x.shape) for p, x in shapes if not is_video(path_str(p)))
    assert parts["full"]["optimizer"] - parts["frozen"]["optimizer"] == 2 * video_bytes  # Adam mu + nu
    assert parts["frozen"]["grads"] == rest_bytes and parts["full"]["grads"] == video_bytes + rest_bytes
    assert parts["frozen"]["params"] == parts["full"]["params"] and parts["frozen"]["ema"] == parts["full"]["ema"]


@pytest.mark.slow
def test_frozen_run_checkpoints_resumes_and_exports(tmp_path):
    from mmdit.data.synth_records import synth
    from mmdit.serve.export import export_bundle
    from mmdit.train.loop import train

    overrides = FREEZE_VIDEO + [
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.sample_every=0",
        "train.async_checkpoint=False",
    ]
    cfg = config_spec.load(CONFIG, overrides)
    wd = tmp_path / "run"
    synth(cfg, str(wd / "data"), num_eval=0, progress=False)
    notes = []
    train(cfg, str(wd), stop_after=2, progress=False, log=notes.append)
    _, ema2, step2 = checkpoint.restore_inference(str(wd))
    _, params2, _ = checkpoint.restore_inference(str(wd), which="params")
    train(cfg, str(wd), progress=False, log=notes.append)  # resumes at step 2
    assert any("resum" in n for n in notes), notes
    _, ema4, step4 = checkpoint.restore_inference(str(wd))
    _, params4, _ = checkpoint.restore_inference(str(wd), which="params")
    assert (step2, step4) == (2, 4)
    with open(wd / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert sorted(set(steps)) == [1, 2, 3, 4]
    p2, p4, e4 = flat(params2), flat(params4), flat(ema4)
    for p in p2:
        if is_video(p):
            np.testing.assert_array_equal(p4[p], p2[p], err_msg=p)
            np.testing.assert_array_equal(e4[p], p2[p], err_msg=p)
    assert any(not np.array_equal(p4[p], p2[p]) for p in p2 if not is_video(p))
    out = export_bundle(cfg, ema4, str(tmp_path / "bundle"), step=step4, platforms=["cpu"])
    assert os.path.isfile(os.path.join(out, "bundle.json"))


def test_mmdit_info_lists_param_paths_with_their_group(capsys):
    from mmdit.cli.info import main

    overrides = ["--set", f"train.freeze={VIDEO!r}", "--set", "train.lr_groups={'text_encoder/*': 0.5}"]
    assert main(["--config", CONFIG, "--params", "--json", *overrides]) == 0
    labels = json.loads(capsys.readouterr().out)
    assert labels["dit/params/blocks/video/ffn/up/kernel"] == "frozen"
    assert labels["dit/params/blocks/audio/ffn/up/kernel"] == "lr_x1.0"
    assert labels["text_encoder/params/final_norm/scale"] == "lr_x0.5"


def test_frozen_params_get_no_weight_gradient_matmuls():
    from mmdit.train.step import make_grad_fn

    def matmuls(overrides):
        cfg = config_spec.load(CONFIG, overrides)
        model = DiffusionModel.from_config(cfg)
        params = sharding.strip_boxes(jax.eval_shape(model.init, jax.random.key(0)))
        batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype) for k, s in sharding.batch_shapes(model, 2).items()}
        jaxpr = jax.make_jaxpr(make_grad_fn(model, cfg))(params, batch, jax.random.key(0))
        return str(jaxpr).count("dot_general")

    full, frozen = matmuls([]), matmuls(FREEZE_VIDEO)
    # the video stream's weight-gradient matmuls are gone (stop_gradient inside the loss)
    assert frozen < full * 0.95, (frozen, full)
