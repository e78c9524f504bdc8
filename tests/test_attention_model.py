"""Every registered attention implementation inside the model, against ``xla``.

The bugs this file exists for: ``cudnn`` refused every model step (the model always passes ``valid``,
so the mask was never "full"), and ``splash``/``pallas`` on TPU raised on traced metadata -- while
the kernels' own tests (``tests/test_kernels.py``) passed. So the checks here go through the
model's call path:

* :func:`test_attend_matches_xla` -- ``registry.attend`` on model-like metadata (two streams, known
  tokens, invalid tokens, a batch row whose groups are the streams -- a non-joint layer -- and rows
  with no key), forward and ``(dq, dk, dv)``, every mask rule the presets use;
* :func:`test_model_matches_xla` -- ``loss_fn`` value and gradients and one sampler step of a
  2-layer model (layer 0 joint, layer 1 per-stream) with ``model.attention.impl`` set to the impl;
* the ``cudnn`` lengths path (permutation + ``query/key_value_seq_lengths``) on CPU (XLA's path,
  same logic), its refusal of structured masks, ``fallback``, and ``impl="auto"``.

Pallas kernels run in interpret mode (``model.attention.interpret=True``), jitted with XLA's
backend optimisation off (compile time dominates; numerics unchanged).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta as flax_meta

from mmdit import config_lib
from mmdit.attention import masks
from mmdit.attention import registry
from mmdit.attention.registry import AttentionOptions, UnsupportedAttention

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
KERNELS = ("pallas_gpu", "pallas_tpu")  # interpret mode on CPU
IMPLS = ("cudnn",) + KERNELS
# The preset combinations (``local(w) & no_peek``, ``chunk_causal & no_peek``) run through the model below.
RULES = ("full", "local(1)", "chunk_causal", "causal", "no_peek")
# The GPU kernel tiles at 16 here (several tiles per 33-token sequence); the TPU kernel's tiles are
# lane-aligned (multiples of 128; the sequence is padded inside the kernel).
BLOCKS = {"pallas_gpu": 16, "pallas_tpu": 128, "cudnn": 128}


def _opts(impl: str) -> AttentionOptions:
    b = BLOCKS.get(impl, 128)
    return AttentionOptions(impl=impl, interpret=True, block_q=b, block_k=b)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


# ------------------------------------------------------------------------------------------------
# registry.attend on model-like metadata


def model_like_meta() -> masks.TokenMeta:
    """Batch of 2 over 20 video tokens (5 frames x 4, chunks of 2 frames, frame 0 known) + 13 audio
    tokens. Row 0: a joint layer (group 0), two invalid audio tokens. Row 1: a per-stream layer
    (group = stream) whose audio stream is absent (all invalid), so its audio queries see no key."""
    f = np.repeat(np.arange(5), 4)
    t = np.arange(13) * 5.0 / 13.0
    stream = np.concatenate([np.zeros(20, np.int32), np.ones(13, np.int32)])[None]
    time = np.concatenate([f, t]).astype(np.float32)[None]
    chunk = (time // 2).astype(np.int32)
    known = np.concatenate([f < 1, np.zeros(13, bool)])[None]
    valid = np.ones((2, 33), bool)
    valid[0, -2:] = False
    valid[1, 20:] = False
    group = np.stack([np.zeros(33, np.int32), stream[0]])
    bcast = lambda x: np.broadcast_to(x, (2, 33))
    return masks.TokenMeta(bcast(stream), bcast(time), bcast(chunk), bcast(known), valid, group)


def _attend_with_grads(impl: str, rule: str):
    meta = model_like_meta()
    spec = dataclasses.replace(masks.make_mask_spec(rule, ("video", "audio"), meta), num_groups=2)
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, (2, 33, 2, 32), jnp.float32) for kk in ks)
    opts = _opts(impl)

    def f(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: registry.attend(q, k, v, spec, opts), q, k, v)
        return (out,) + vjp(do)

    return jax.jit(f, compiler_options=FAST)(q, k, v)


@functools.lru_cache(maxsize=None)
def _attend_reference(rule: str):
    return _attend_with_grads("xla", rule)


def _check(got, want, what, tol=2e-5):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert np.isfinite(np.asarray(a)).all(), f"{what}: non-finite {name}"
        assert _rel(a, b) < tol, f"{what}: {name} relative error {_rel(a, b):.2e}"


@pytest.mark.slow  # ~6 s (CPU time) per interpreted kernel case
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("impl", KERNELS)
def test_attend_matches_xla(impl, rule):
    got = _attend_with_grads(impl, rule)
    _check(got, _attend_reference(rule), f"{impl} / {rule}")
    assert float(jnp.abs(got[0][1, 20:]).max()) == 0.0  # absent stream in a per-stream layer: no key, zeros


def test_cudnn_lengths_path_matches_xla():
    """``full`` with invalid tokens and per-stream groups: permutation + sequence lengths (XLA's
    implementation of ``jax.nn.dot_product_attention`` on CPU, the same call cuDNN gets on GPU)."""
    got = _attend_with_grads("cudnn", "full")
    _check(got, _attend_reference("full"), "cudnn / full")
    assert float(jnp.abs(got[0][1, 20:]).max()) == 0.0


def test_cudnn_refuses_structured_masks_naming_the_impls_and_falls_back():
    meta = model_like_meta()
    spec = dataclasses.replace(masks.make_mask_spec("chunk_causal & no_peek", ("video", "audio"), meta), num_groups=2)
    q = jnp.ones((2, 33, 2, 32))
    with pytest.raises(UnsupportedAttention) as e:
        registry.attend(q, q, q, spec, AttentionOptions(impl="cudnn"))
    for needle in ("chunk_causal", "pallas", "model.attention.fallback"):
        assert needle in str(e.value), str(e.value)
    got = registry.attend(q, q, q, spec, AttentionOptions(impl="cudnn", fallback="xla"))
    want = registry.attend(q, q, q, spec, AttentionOptions(impl="xla"))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_cudnn_traced_groups_need_num_groups():
    meta = model_like_meta()
    spec = masks.make_mask_spec("full", ("video", "audio"), meta)
    q = jnp.ones((2, 33, 2, 32))

    def traced(group):
        s = dataclasses.replace(spec, q=spec.q._replace(group=group), k=spec.k._replace(group=group))
        return registry.attend(q, q, q, s, AttentionOptions(impl="cudnn"))

    with pytest.raises(UnsupportedAttention, match="num_groups"):
        jax.jit(traced)(jnp.asarray(meta.group))


def test_is_full_only_when_every_pair_is_attended():
    meta = model_like_meta()
    assert not masks.make_mask_spec("full", ("video", "audio"), meta).is_full  # invalid keys
    all_valid = meta._replace(valid=np.ones_like(meta.valid), group=np.zeros_like(meta.group))
    assert masks.make_mask_spec("full", ("video", "audio"), all_valid).is_full
    assert not masks.make_mask_spec("local(1)", ("video", "audio"), all_valid).is_full


@pytest.mark.parametrize(
    "platform, rule, dtype, want",
    [
        ("gpu", "full", "bfloat16", ("cudnn", "pallas")),
        ("cuda", "full", "float32", ("pallas", None)),
        ("gpu", "chunk_causal & no_peek", "bfloat16", ("pallas", None)),
        ("tpu", "full", "bfloat16", ("pallas", None)),
        ("tpu", "local(1) & no_peek", "bfloat16", ("pallas", None)),
        ("cpu", "full", "bfloat16", ("xla", None)),
    ],
)
def test_auto_resolution(platform, rule, dtype, want):
    assert registry.resolve_auto(masks.parse_rule(rule), platform, dtype) == want


def test_auto_is_resolved_when_the_spec_is_built(capsys):
    from mmdit.model.spec import build_spec

    cfg = config_lib.override(
        config_lib.load("configs/demo.py:tiny"), ["model.attention.impl='auto'", "model.attention.cross_impl='auto'"]
    )
    spec = build_spec(cfg.model, platform="tpu")
    assert (spec.attention.impl, spec.cross_attention.impl) == ("pallas", "pallas")
    cpu = build_spec(cfg.model)
    assert cpu.attention.impl == "xla" and cpu.cross_attention.impl == "xla"
    with pytest.raises(ValueError, match="resolved when the model spec is built"):
        registry.get("auto")


def test_blockwise_pairs_registered():
    assert registry.blockwise("xla") is not None
    assert registry.blockwise("cudnn") is None  # ring falls back to the fallback's / xla's pair


def test_xla_blockwise_pair_matches_autodiff():
    """The reference pair: (out, lse) forward and the block backward from the global out/lse equal
    ``jax.vjp`` of the reference attention; empty rows have lse = -inf and zero gradients."""
    meta = model_like_meta()
    spec = dataclasses.replace(masks.make_mask_spec("chunk_causal & no_peek", ("video", "audio"), meta), num_groups=2)
    ks = jax.random.split(jax.random.key(1), 4)
    q, k, v, do = (jax.random.normal(kk, (2, 33, 2, 16)) for kk in ks)
    fwd, bwd = registry.blockwise("xla")
    out, lse = fwd(q, k, v, spec, AttentionOptions())
    ref, vjp = jax.vjp(lambda q, k, v: registry.xla_attention(q, k, v, spec, AttentionOptions()), q, k, v)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert lse.shape == (2, 2, 33) and bool(jnp.isneginf(lse[1, :, 20:]).all())
    for a, b in zip(bwd(q, k, v, spec, AttentionOptions(), out, lse, do), vjp(do)):
        np.testing.assert_allclose(a, b, atol=2e-5)


# ------------------------------------------------------------------------------------------------
# through the model: loss_fn value and gradients, one sampler step


def model_cfg(impl: str, rule: str):
    """``configs/demo.py:tiny`` shrunk: 2 layers (layer 0 joint, layer 1 per-stream), 9 frames (9 video
    + 9 audio tokens), 64-wide, 2 heads of 32, chunks of 3 frames, precomputed text features."""
    b = BLOCKS.get(impl, 128)
    sets = [
        f"model.attention.impl={impl!r}",
        # cross-attention: the kernel's cases are the joint ones (interpreted kernels are slow to compile)
        f"model.attention.cross_impl={impl if impl == 'cudnn' else 'xla'!r}",
        "model.attention.interpret=True",
        f"model.attention.block_q={b}",
        f"model.attention.block_k={b}",
        f"model.mask={rule!r}",
        "model.joint_layers=(0,)",
        "model.chunk_frames=3.0",
        "model.text_encoder=None",
    ]
    for s in ("video", "audio"):
        sets += [f"model.streams.{s}.dim=64", f"model.streams.{s}.ffn=64"]
    sets += ["model.streams.video.shape=(9, 4, 4)", "model.streams.audio.shape=(9,)"]
    cfg = config_lib.override(config_lib.load("configs/demo.py:tiny"), sets)
    with cfg.unlocked():
        # tts: an absent (invalid) video stream; tv2a / a2v: known tokens (they need no_peek)
        cfg.tasks = dict(t2av=1.0, tts=1.0, tv2a=1.0, a2v=1.0) if "no_peek" in rule else dict(t2av=1.0, tts=1.0, ti2av=1.0)
    return cfg


def _model_outputs(impl: str, rule: str):
    """(loss, grads, velocity of one sampler step) of the same params and batch under ``impl``."""
    from mmdit import tasks
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.sample.sampler import denoise_step_fn
    from mmdit.train import sharding
    from mmdit.train import step as step_lib

    cfg = model_cfg(impl, rule)
    model = DiffusionModel.from_config(cfg)
    assert model.spec.attention.impl == impl
    params = flax_meta.unbox(jax.jit(model.init, compiler_options=FAST)(jax.random.key(0)))
    B = 4
    rng = np.random.default_rng(0)
    batch = {}
    for name, s in sharding.batch_shapes(model, B).items():
        batch[name] = rng.random(s.shape) > 0.2 if s.dtype == bool else rng.standard_normal(s.shape).astype(s.dtype)
    # one sampler step: noisy tokens, a task with absent or known tokens
    tokens, _, raw = model.dummy_inputs(B)
    task = tasks.task_masks("a2v" if "no_peek" in rule else "tts", jax.random.key(2), model.spec, B, cfg.model)
    keys = jax.random.split(jax.random.key(3), len(tokens))
    x = {n: jax.random.normal(kk, t.shape) for (n, t), kk in zip(tokens.items(), keys)}
    sigma = {n: jnp.where(task.known[n], 0.0, 0.7) for n in model.spec.generated}
    raw = {n: jnp.asarray(batch[n]) if n in batch else r for n, r in raw.items()}
    keep = {n: jnp.ones((B,), bool) for n in model.spec.keep_names}
    loss_grad = jax.value_and_grad(step_lib.make_loss_fn(model, cfg), has_aux=True)
    step = denoise_step_fn(model)

    def f(params, batch, x, sigma, raw, keep, known, valid):
        (loss, _), grads = loss_grad(params, batch, jax.random.key(1))
        return loss, grads, step(params, x, sigma, raw, keep, known, valid)

    return jax.jit(f, compiler_options=FAST)(params, batch, x, sigma, raw, keep, task.known, task.valid)


@functools.lru_cache(maxsize=None)
def _model_reference(rule: str):
    return _model_outputs("xla", rule)


# The presets' masks: talkingmachines (chunk_causal & no_peek), demo / jamflow-like (local(w) & no_peek).
MODEL_CASES = [("cudnn", "full"), ("pallas_gpu", "chunk_causal & no_peek"), ("pallas_tpu", "local(1) & no_peek")]


@pytest.mark.slow  # two model compiles per case (the xla reference and the impl): 25-35 s each
@pytest.mark.parametrize("impl, rule", MODEL_CASES)
def test_model_matches_xla(impl, rule):
    loss, grads, v = _model_outputs(impl, rule)
    ref_loss, ref_grads, ref_v = _model_reference(rule)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)), (float(loss), float(ref_loss))
    flat = lambda t: np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(t)])
    assert np.isfinite(flat(grads)).all()
    assert _rel(flat(grads), flat(ref_grads)) < 1e-4, _rel(flat(grads), flat(ref_grads))
    for n in ref_v:
        assert _rel(v[n], ref_v[n]) < 1e-4, (n, _rel(v[n], ref_v[n]))


def test_bench_quick_smoke(tmp_path):
    """``bench/attention.py --quick`` (shrunk further): every impl through the registry, JSON out."""
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "attention.py")
    spec = importlib.util.spec_from_file_location("bench_attention_quick", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "quick.json"
    argv = ["--quick", "--seqs", "128", "--heads", "1", "--head-dim", "64", "--masks", "nonjoint", "chunk_causal"]
    bench.main(argv + ["--impls", "xla", "cudnn", "pallas_gpu", "--block-q", "64", "--block-k", "64", "--out", str(out)])
    report = json.loads(out.read_text())
    done = {(r["impl"], r["mask"], r["pass"]) for r in report["results"] if "ms" in r}
    assert ("cudnn", "nonjoint", "fwd+bwd") in done and ("pallas_gpu", "chunk_causal", "fwd+bwd") in done, done
    skipped = {(r["impl"], r["mask"]) for r in report["results"] if "skipped" in r}
    assert skipped == {("cudnn", "chunk_causal")}
    density = {r["mask"]: r["density"] for r in report["results"]}
    assert density["nonjoint"] == (96**2 + 32**2) / 128**2  # block-diagonal: 3/4 video, 1/4 audio
