"""mmdit_kernels on CPU: the Pallas GPU kernel in interpret mode, Splash in its interpreter, block
maps, the registry adapter, head-sharded shard_map, CUDA lowering and the benchmark CLI.

Interpreted kernels are jitted with XLA's backend optimisation off: compile time dominates here and
drops ~6x, numerics are unchanged.
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmdit_kernels as mk
from mmdit_kernels import block_map as bm
from mmdit_kernels.flash_gpu import flash_attention_gpu

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def qkv(b, sq, sk, h, d, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, sq, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, sk, h, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, sk, h, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, sq, h, d), jnp.float32).astype(dtype)
    return q, k, v, do


def value_and_grads(attn, q, k, v, do):
    """``(out, (dq, dk, dv))`` for the cotangent ``do``, jitted with fast compilation."""

    def f(q, k, v):
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(do)

    return fast_jit(f)(q, k, v)


def assert_close(got, want, tol, what):
    got_out, got_g = got
    want_out, want_g = want
    assert rel_err(got_out, want_out) < tol, f"{what}: forward error {rel_err(got_out, want_out)}"
    for name, a, b in zip(("dq", "dk", "dv"), got_g, want_g):
        assert np.isfinite(np.asarray(a, np.float32)).all(), f"{what}: non-finite {name}"
        assert rel_err(a, b) < tol, f"{what}: {name} error {rel_err(a, b)}"


# ----------------------------------------------------------------------------------------------
# Hand-written predicates over metadata tuples.


def chunk_causal(qf, kf):  # q: (chunk,), k: (chunk, valid)
    (qc,), (kc, kv) = qf, kf
    return ((kc == 0) | (kc == qc) | (kc == qc - 1)) & kv


def local(qf, kf):  # q: (stream, time), k: (stream, time, valid)
    (qs, qt), (ks, kt, kv) = qf, kf
    return ((qs == ks) | (jnp.abs(qt - kt) <= 1.5)) & kv


def no_peek_chunked(qf, kf):  # q: (chunk, known), k: (chunk, known, valid)
    (qc, qk), (kc, kk, kv) = qf, kf
    return chunk_causal((qc,), (kc, kv)) & ~(qk & ~kk)


def metadata(case, b, sq, sk):
    """``(mask_fn, q_meta, k_meta)`` for a named case; fields ``[1|b, S]``."""
    rng = np.random.default_rng(1)
    if case == "full":
        return None, (), ()
    if case == "chunk_causal":
        cq, ck = (np.arange(sq) * 4 // sq)[None], (np.arange(sk) * 4 // sk)[None]
        valid = np.arange(sk)[None] < np.array([[sk - 5], [sk]])[:b]  # per-batch padding
        return chunk_causal, (cq.astype(np.int32),), (ck.astype(np.int32), valid)
    if case == "local":
        sq_s, sk_s = (np.arange(sq) >= sq // 2)[None], (np.arange(sk) >= sk // 3)[None]
        tq, tk = (np.arange(sq) / sq * 6)[None], (rng.permutation(sk) / sk * 6)[None]
        valid = np.ones((1, sk), bool)
        return local, (sq_s.astype(np.int32), tq.astype(np.float32)), (sk_s.astype(np.int32), tk.astype(np.float32), valid)
    if case == "no_peek":
        cq, ck = (np.arange(sq) * 3 // sq)[None], (np.arange(sk) * 3 // sk)[None]
        kq, kk = (np.arange(sq) < sq // 3)[None], (np.arange(sk) < sk // 3)[None]
        return no_peek_chunked, (cq, kq), (ck, kk, np.ones((b, sk), bool))
    raise ValueError(case)


# (case, dtype, B, Sq, Sk, H, Dh, block_q, block_k, backward tiles); backward tiles smaller than
# the forward ones exercise the refined block maps.
DIRECT = [
    ("full", jnp.float32, 2, 77, 77, 3, 64, 32, 32, {}),
    ("chunk_causal", jnp.float32, 2, 77, 77, 2, 64, 64, 64, {}),  # default backward tiles: 32
    ("local", jnp.bfloat16, 1, 100, 61, 2, 128, 32, 16, {"block_q_bwd": 16}),
    ("no_peek", jnp.float32, 2, 50, 90, 2, 80, 16, 32, {"block_k_bwd": 16}),
]


@pytest.mark.parametrize("case,dtype,b,sq,sk,h,d,bq,bk,bwd", DIRECT)
def test_flash_matches_reference(case, dtype, b, sq, sk, h, d, bq, bk, bwd):
    q, k, v, do = qkv(b, sq, sk, h, d, dtype)
    mask_fn, qm, km = metadata(case, b, sq, sk)
    kw = dict(mask_fn=mask_fn, q_meta=qm, k_meta=km)
    got = value_and_grads(
        lambda q, k, v: mk.flash_attention(q, k, v, block_q=bq, block_k=bk, interpret=True, **kw, **bwd), q, k, v, do
    )
    want = value_and_grads(lambda q, k, v: mk.reference_attention(q, k, v, **kw), q, k, v, do)
    assert got[0].dtype == dtype and got[0].shape == (b, sq, h, d)
    assert_close(got, want, 1e-4 if dtype == jnp.float32 else 3e-2, f"{case}/{jnp.dtype(dtype).name}")


def test_fully_masked_rows_give_zero_output_and_gradients():
    b, s, h, d = 1, 64, 2, 64
    q, k, v, do = qkv(b, s, s, h, d, jnp.float32)
    dead = (np.arange(s) % 7 == 3)[None]  # scattered query rows that see nothing
    mask_fn = lambda qf, kf: ~qf[0] & (kf[0] <= 40)
    kw = dict(mask_fn=mask_fn, q_meta=(dead,), k_meta=(np.arange(s)[None],))
    out, (dq, dk, dv) = value_and_grads(
        lambda q, k, v: mk.flash_attention(q, k, v, block_q=16, block_k=16, interpret=True, **kw), q, k, v, do
    )
    assert np.all(np.asarray(out)[:, dead[0]] == 0) and np.all(np.asarray(dq)[:, dead[0]] == 0)
    assert np.all(np.asarray(dk)[:, 41:] == 0) and np.all(np.asarray(dv)[:, 41:] == 0)
    want = value_and_grads(lambda q, k, v: mk.reference_attention(q, k, v, **kw), q, k, v, do)
    assert_close((out, (dq, dk, dv)), want, 1e-4, "dead rows")


def test_empty_tiles_are_skipped_and_full_tiles_are_unmasked():
    """The kernel follows the block map, not the predicate: an EMPTY tile contributes nothing even
    where the mask allows pairs, a FULL tile attends every pair even where the mask forbids some."""
    b, s, h, d = 1, 64, 1, 64
    q, k, v, do = qkv(b, s, s, h, d, jnp.float32, seed=3)
    chunks = (np.arange(s) // 16)[None].astype(np.int32)
    mask_fn = lambda qf, kf: kf[0] <= qf[0]  # block-causal over chunks of 16
    dense = np.asarray(mk.reference.dense_mask(mask_fn, (chunks,), (chunks,), s, s))[0]
    bmap = np.asarray(mk.block_map_from_dense(dense[None], 32, 32))
    assert bmap.tolist() == [[[mk.PARTIAL, mk.EMPTY], [mk.FULL, mk.PARTIAL]]]
    hacked = bmap.copy()
    hacked[0, 1, 0] = mk.EMPTY  # rows 32..63 x keys 0..31: allowed by the mask, skipped by the map
    hacked[0, 0, 0] = mk.FULL  # rows 0..31 x keys 0..31: partly forbidden, fully attended by the map
    expect = dense.copy()
    expect[32:, :32] = False
    expect[:32, :32] = True
    run = lambda m: value_and_grads(
        lambda q, k, v: mk.flash_attention(
            q,
            k,
            v,
            mask_fn=mask_fn,
            q_meta=(chunks,),
            k_meta=(chunks,),
            block_map=jnp.asarray(m),
            block_q=32,
            block_k=32,
            interpret=True,
        ),
        q,
        k,
        v,
        do,
    )
    ref = lambda m: value_and_grads(
        lambda q, k, v: mk.reference_attention(q, k, v, mask_fn=lambda qf, kf: jnp.asarray(m)[None]), q, k, v, do
    )
    honest, hacked_out = run(bmap), run(hacked)
    assert_close(honest, ref(dense), 1e-4, "honest map")
    assert_close(hacked_out, ref(expect), 1e-4, "hacked map")
    assert rel_err(hacked_out[0], honest[0]) > 0.1


def test_registry_pallas_matches_xla_for_mmdit_rules():
    masks = pytest.importorskip("mmdit.attention.masks")
    from mmdit.attention.registry import AttentionOptions, attend

    nv, na = 48, 29  # video tokens (3 chunks of 16) + audio tokens (last 3 invalid)
    s = nv + na
    fields = dict(
        stream=np.r_[np.zeros(nv), np.ones(na)].astype(np.int32),
        time=np.r_[np.arange(nv) // 16 * 1.0, np.arange(na) * 3.0 / na].astype(np.float32),
        chunk=np.r_[np.arange(nv) // 16, np.minimum(np.arange(na) * 3 // na, 2)].astype(np.int32),
        known=np.r_[np.arange(nv) < 16, np.zeros(na, bool)],
        valid=np.r_[np.ones(nv, bool), np.arange(na) < na - 3],
        group=np.zeros(s, np.int32),
    )
    meta = masks.TokenMeta(**{f: fields[f][None] for f in masks.TokenMeta._fields})
    per_stream = meta._replace(group=meta.stream) if "group" in masks.TokenMeta._fields else meta
    q, k, v, do = qkv(2, s, s, 2, 64, jnp.float32, seed=5)
    cases = [
        ("full", per_stream, jnp.float32),  # per-stream layer: the universal group term matters
        ("chunk_causal & no_peek", meta, jnp.float32),
        ("local(1) | same_stream", meta, jnp.bfloat16),
    ]
    for rule, m, dtype in cases:
        spec = masks.make_mask_spec(rule, ["video", "audio"], m)
        args = [x.astype(dtype) for x in (q, k, v, do)]
        run = lambda impl: value_and_grads(
            lambda q, k, v: attend(q, k, v, spec, AttentionOptions(impl=impl, interpret=True, block_q=32, block_k=32)),
            *args,
        )
        assert_close(run("pallas"), run("xla"), 1e-4 if dtype == jnp.float32 else 3e-2, rule)


def test_registry_raises_unsupported():
    masks = pytest.importorskip("mmdit.attention.masks")
    from mmdit.attention.registry import AttentionOptions, UnsupportedAttention, attend

    s = 16
    fields = {f: np.zeros((1, s), bool if f in ("known", "valid") else np.int32) for f in masks.TokenMeta._fields}
    fields["valid"] = np.ones((1, s), bool)
    meta = masks.TokenMeta(**fields)
    spec = masks.make_mask_spec("no_peek", ["video"], meta)
    q = jnp.ones((1, s, 2, 64))
    if jax.default_backend() == "cpu":
        with pytest.raises(UnsupportedAttention, match="interpret"):
            attend(q, q, q, spec, AttentionOptions(impl="pallas"))
        with pytest.raises(UnsupportedAttention, match="TPU"):
            attend(q, q, q, spec, AttentionOptions(impl="splash"))
    with pytest.raises(UnsupportedAttention, match="head dim"):
        big = jnp.ones((1, s, 1, 512))
        attend(big, big, big, spec, AttentionOptions(impl="pallas", interpret=True))

    def traced(known):  # per-batch known flags from the (traced) batch: splash cannot use them
        spec_t = masks.make_mask_spec("no_peek", ["video"], meta._replace(known=known))
        return attend(q, q, q, spec_t, AttentionOptions(impl="splash", interpret=True))

    with pytest.raises(UnsupportedAttention, match="traced"):
        jax.jit(traced)(jnp.zeros((1, s), bool))


def test_cpu_requires_interpret():
    if jax.default_backend() != "cpu":
        pytest.skip("CPU-only behaviour")
    q = jnp.ones((1, 16, 1, 16))
    with pytest.raises(ValueError, match="interpret=True"):
        mk.flash_attention(q, q, q)


# ----------------------------------------------------------------------------------------------
# Block maps.


def test_block_map_helpers():
    s, bq, bk = 77, 16, 32
    chunks = (np.arange(s) // 20)[None].astype(np.int32)
    valid = (np.arange(s) < 70)[None]
    fn = lambda qf, kf: chunk_causal(qf, (kf[0], kf[1]))
    dense = mk.reference.dense_mask(fn, (chunks,), (chunks, valid), s, s)
    from_dense = np.asarray(mk.block_map_from_dense(dense, bq, bk))
    from_fn = np.asarray(mk.block_map_from_mask_fn(fn, (chunks,), (chunks, valid), s, s, bq, bk))
    np.testing.assert_array_equal(from_dense, from_fn)
    assert from_dense.shape == (1, 5, 3) and set(np.unique(from_dense)) == {mk.EMPTY, mk.PARTIAL, mk.FULL}

    masks = pytest.importorskip("mmdit.attention.masks")
    fields = dict(
        stream=np.zeros((1, s), np.int32),
        time=np.zeros((1, s), np.float32),
        chunk=chunks,
        known=np.zeros((1, s), bool),
        valid=valid,
        group=np.zeros((1, s), np.int32),
    )
    meta = masks.TokenMeta(**{f: fields[f] for f in masks.TokenMeta._fields})
    spec = masks.make_mask_spec("chunk_causal", ["video"], meta)
    np.testing.assert_array_equal(np.asarray(spec.block_map(bq, bk)), from_dense)

    idx, cnt = (np.asarray(x) for x in bm.compact(jnp.asarray(from_dense)))
    for r in range(from_dense.shape[1]):
        row = from_dense[0, r]
        nf, na = cnt[0, r]
        assert sorted(idx[0, r, :nf]) == list(np.flatnonzero(row == mk.FULL))
        assert sorted(idx[0, r, nf:na]) == list(np.flatnonzero(row == mk.PARTIAL))

    # Refining is exact for EMPTY and FULL tiles (conservative for PARTIAL ones).
    fine = np.asarray(bm.clip_to_lengths(bm.refine(jnp.asarray(from_dense), 2, 2), s, s, bq // 2, bk // 2))
    exact = np.asarray(mk.block_map_from_dense(dense, bq // 2, bk // 2))
    assert np.all(fine[..., exact.shape[-1] :] == mk.EMPTY)  # the coarse padding's extra tile
    fine = fine[..., : exact.shape[-1]]
    assert np.all((fine == mk.EMPTY) <= (exact == mk.EMPTY)) and np.all((fine == mk.FULL) <= (exact == mk.FULL))
    assert (fine != exact).any()  # some refined PARTIAL tiles are really EMPTY or FULL

    clipped = np.asarray(bm.clip_to_lengths(jnp.full((1, 3, 3), mk.FULL, jnp.int8), 40, 70, 16, 32))
    assert clipped[0].tolist() == [[2, 2, 1], [2, 2, 1], [2, 2, 1]]
    clipped = np.asarray(bm.clip_to_lengths(jnp.full((1, 3, 3), mk.FULL, jnp.int8), 20, 40, 16, 16))
    assert clipped[0].tolist() == [[2, 2, 1], [2, 2, 1], [0, 0, 0]]


# ----------------------------------------------------------------------------------------------
# Splash (TPU) path through its interpreter.


def test_metadata_mask_matches_dense_and_fingerprints():
    from mmdit_kernels.splash_tpu import MetadataMask, fingerprint

    sq, sk = 200, 150
    cq, ck = np.arange(sq) // 50, np.arange(sk) // 50
    fn = lambda qf, kf: ((kf[0] == 0) | (kf[0] == qf[0])) & (qf[0] < 3)
    m = MetadataMask(fn, (cq,), (ck,), sq, sk, (256, 256), 128, 128, key="t")
    dense = np.zeros((256, 256), bool)
    dense[:sq, :sk] = ((ck[None] == 0) | (ck[None] == cq[:, None])) & (cq[:, None] < 3)
    dense[~dense.any(1), 0] = True  # rows with no key attend key 0 (zeroed afterwards)
    np.testing.assert_array_equal(m.row_any, np.r_[cq < 3, np.zeros(56, bool)])
    got = np.block([[m[slice(i, i + 128), slice(j, j + 128)] for j in (0, 128)] for i in (0, 128)])
    np.testing.assert_array_equal(got, dense)
    col = np.concatenate([m[slice(i, i + 128), slice(128, 256)] for i in (0, 128)])  # column-major walk
    np.testing.assert_array_equal(col, dense[:, 128:])

    masks = pytest.importorskip("mmdit.attention.masks")
    fields = {f: np.zeros((1, 8), np.int32) for f in masks.TokenMeta._fields}
    meta = masks.TokenMeta(**fields)
    a = masks.make_mask_spec("chunk_causal & local(2)", ["v"], meta).kernel_mask_fn()
    b = masks.make_mask_spec("chunk_causal & local(2)", ["v"], meta).kernel_mask_fn()
    c = masks.make_mask_spec("chunk_causal & local(3)", ["v"], meta).kernel_mask_fn()
    assert fingerprint(a) == fingerprint(b) and fingerprint(a) != fingerprint(c)


def test_splash_interpret_matches_reference():
    from mmdit_kernels.splash_tpu import splash_attention as flash_attention_tpu

    b, sq, sk, h, d = 2, 160, 130, 2, 64
    q, k, v, do = qkv(b, sq, sk, h, d, jnp.float32, seed=7)
    cq, ck = (np.arange(sq) * 3 // sq)[None], (np.arange(sk) * 3 // sk)[None]
    fn = lambda qf, kf: ((kf[0] == 0) | (kf[0] == qf[0])) & (qf[0] < 2)  # last chunk's rows see nothing
    kw = dict(mask_fn=fn, q_meta=(cq,), k_meta=(ck,))
    got = value_and_grads(lambda q, k, v: flash_attention_tpu(q, k, v, interpret=True, **kw), q, k, v, do)
    want = value_and_grads(lambda q, k, v: mk.reference_attention(q, k, v, **kw), q, k, v, do)
    assert_close(got, want, 1e-4, "splash")
    assert np.all(np.asarray(got[0])[:, cq[0] == 2] == 0)


# ----------------------------------------------------------------------------------------------
# Heads sharded over 4 devices (Ulysses' local situation), CUDA lowering, benchmark CLI.

SHARD_MAP_SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from mmdit.attention import masks
    from mmdit.attention.registry import AttentionOptions, attend

    s, h, d = 80, 8, 32
    fields = dict(stream=np.zeros(s, np.int32), time=np.arange(s, dtype=np.float32) / 16,
                  chunk=(np.arange(s) // 24).astype(np.int32), known=np.arange(s) < 16,
                  valid=np.arange(s) < 75, group=np.zeros(s, np.int32))
    meta = masks.TokenMeta(**{f: fields[f][None] for f in masks.TokenMeta._fields})
    spec = masks.make_mask_spec("chunk_causal & no_peek", ["video"], meta)
    mesh = jax.make_mesh((4,), ("heads",), axis_types=(jax.sharding.AxisType.Auto,))
    q, k, v, do = jax.random.normal(jax.random.key(0), (4, 2, s, h, d))

    def run(impl):
        opts = AttentionOptions(impl=impl, interpret=True, block_q=32, block_k=32)
        heads = P(None, None, "heads")
        local = lambda q, k, v: attend(q, k, v, spec, opts)
        fn = jax.shard_map(local, mesh=mesh, in_specs=(heads,) * 3, out_specs=heads)
        def f(q, k, v):
            out, vjp = jax.vjp(fn, q, k, v)
            return out, vjp(do)
        return jax.jit(f, compiler_options={"xla_backend_optimization_level": 0})(q, k, v)

    got, want = run("pallas"), run("xla")
    errs = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
    print("ERRS", errs)
    assert max(errs) < 1e-4, errs
    """
)


def test_pallas_inside_head_sharded_shard_map():
    pytest.importorskip("mmdit.attention.masks")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", SHARD_MAP_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "ERRS" in res.stdout


def test_kernels_lower_to_triton_for_cuda():
    """The forward and both backward kernels lower to Triton IR (catches Triton-only lowering
    errors on machines without a GPU; PTX compilation itself needs a GPU)."""
    b, s, h, d = 1, 300, 2, 128
    cq = (np.arange(s) // 40)[None].astype(np.int32)
    meta = (cq, np.arange(s)[None] < 50, (np.arange(s) / 7.0)[None].astype(np.float32))
    fn = lambda qf, kf: chunk_causal((qf[0],), (kf[0], jnp.abs(qf[2] - kf[2]) < 9)) & ~(qf[1] & ~kf[1])

    def f(q, k, v):
        attn = lambda q, k, v: flash_attention_gpu(q, k, v, mask_fn=fn, q_meta=meta, k_meta=meta)
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(out)

    x = jax.ShapeDtypeStruct((b, s, h, d), jnp.bfloat16)
    text = jax.jit(f).trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
    for name in ("mmdit_flash_fwd", "mmdit_flash_bwd_dq", "mmdit_flash_bwd_dkv"):
        assert f'name = "{name}"' in text


def test_bench_cli_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_attention", os.path.join(REPO, "bench", "attention.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(
        [
            "--interpret",
            "--seqs",
            "128",
            "--heads",
            "1",
            "--head-dim",
            "64",
            "--block-q",
            "64",
            "--block-k",
            "64",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--masks",
            "chunk_causal",
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert report["device"] and report["flops_convention"]
    done = [r for r in report["results"] if "ms" in r]
    assert {(r["impl"], r["pass"]) for r in done} == {(i, p) for i in ("pallas", "xla") for p in ("fwd", "fwd+bwd")}
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in done)
    assert [r["impl"] for r in report["results"] if "skipped" in r] == ["cudnn"]  # masked: cudnn skips
    assert abs(done[0]["density"] - 21 / 64) < 0.02  # 8 chunks: (3n - 3) / n^2 of the pairs
