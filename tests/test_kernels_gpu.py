"""mmdit_kernels compiled on a CUDA GPU (Triton): the CPU suite's checks at larger, odd shapes.

Run on a GPU machine with ``pytest -m gpu tests/test_kernels_gpu.py``; skipped elsewhere.
References run with f32 matmuls at ``highest`` precision (the GPU default would be TF32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmdit_kernels as mk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU"),
]


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def qkv(b, sq, sk, h, d, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    shapes = ((b, sq, h, d), (b, sk, h, d), (b, sk, h, d), (b, sq, h, d))
    return tuple(jax.random.normal(kk, sh, jnp.float32).astype(dtype) for kk, sh in zip(ks, shapes))


def value_and_grads(attn, q, k, v, do):
    def f(q, k, v):
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(do)

    with jax.default_matmul_precision("highest"):
        return jax.jit(f)(q, k, v)


def check(got, want, tol, what):
    assert rel_err(got[0], want[0]) < tol, f"{what}: forward error {rel_err(got[0], want[0])}"
    for name, a, b in zip(("dq", "dk", "dv"), got[1], want[1]):
        assert np.isfinite(np.asarray(a, np.float32)).all(), f"{what}: non-finite {name}"
        assert rel_err(a, b) < tol, f"{what}: {name} error {rel_err(a, b)}"


def chunk_causal(qf, kf):
    (qc,), (kc, kv) = qf, kf
    return ((kc == 0) | (kc == qc) | (kc == qc - 1)) & kv


def local(qf, kf):
    (qs, qt), (ks, kt, kv) = qf, kf
    return ((qs == ks) | (jnp.abs(qt - kt) <= 1.5)) & kv


def no_peek(qf, kf):
    (qc, qk), (kc, kk, kv) = qf, kf
    return chunk_causal((qc,), (kc, kv)) & ~(qk & ~kk)


def metadata(case, b, sq, sk):
    if case == "full":
        return None, (), ()
    cq, ck = (np.arange(sq) * 6 // sq)[None].astype(np.int32), (np.arange(sk) * 6 // sk)[None].astype(np.int32)
    valid = np.arange(sk)[None] < np.array([[sk - 37], [sk]])[:b]
    if case == "chunk_causal":
        return chunk_causal, (cq,), (ck, valid)
    if case == "local":
        tq, tk = (np.arange(sq) / sq * 8)[None], (np.random.default_rng(0).permutation(sk) / sk * 8)[None]
        sq_s, sk_s = (np.arange(sq) >= sq // 2)[None], (np.arange(sk) >= sk // 3)[None]
        return local, (sq_s.astype(np.int32), tq.astype(np.float32)), (sk_s.astype(np.int32), tk.astype(np.float32), valid)
    if case == "no_peek":
        kq, kk = (np.arange(sq) < sq // 4)[None], (np.arange(sk) < sk // 4)[None]
        return no_peek, (cq, kq), (ck, kk, valid)
    raise ValueError(case)


CASES = [
    ("full", jnp.bfloat16, 2, 1000, 1000, 4, 128),
    ("full", jnp.float32, 1, 777, 1200, 2, 64),
    ("chunk_causal", jnp.bfloat16, 2, 1500, 1500, 3, 128),
    ("chunk_causal", jnp.float32, 2, 1000, 1000, 2, 64),
    ("local", jnp.bfloat16, 1, 900, 640, 2, 64),
    ("no_peek", jnp.bfloat16, 2, 1111, 1111, 2, 128),
    ("no_peek", jnp.float32, 1, 513, 700, 2, 96),
]


@pytest.mark.parametrize("case,dtype,b,sq,sk,h,d", CASES)
@pytest.mark.parametrize("blocks", [(128, 128), (64, 128)])
def test_compiled_matches_reference(case, dtype, b, sq, sk, h, d, blocks):
    q, k, v, do = qkv(b, sq, sk, h, d, dtype)
    mask_fn, qm, km = metadata(case, b, sq, sk)
    kw = dict(mask_fn=mask_fn, q_meta=qm, k_meta=km)
    got = value_and_grads(lambda q, k, v: mk.flash_attention(q, k, v, block_q=blocks[0], block_k=blocks[1], **kw), q, k, v, do)
    want = value_and_grads(lambda q, k, v: mk.reference_attention(q, k, v, **kw), q, k, v, do)
    check(got, want, 2e-4 if dtype == jnp.float32 else 3e-2, f"{case}/{jnp.dtype(dtype).name}")


def test_compiled_fully_masked_rows_and_skipped_tiles():
    s, h, d = 512, 2, 128
    q, k, v, do = qkv(1, s, s, h, d, jnp.bfloat16, seed=2)
    dead = (np.arange(s) % 9 == 4)[None]
    chunks = (np.arange(s) // 128)[None].astype(np.int32)
    fn = lambda qf, kf: ~qf[0] & (kf[0] <= qf[1])
    kw = dict(mask_fn=fn, q_meta=(dead, chunks), k_meta=(chunks,))
    out, (dq, dk, dv) = value_and_grads(lambda q, k, v: mk.flash_attention(q, k, v, **kw), q, k, v, do)
    assert np.all(np.asarray(out)[:, dead[0]] == 0) and np.all(np.asarray(dq)[:, dead[0]] == 0)
    want = value_and_grads(lambda q, k, v: mk.reference_attention(q, k, v, **kw), q, k, v, do)
    check((out, (dq, dk, dv)), want, 3e-2, "dead rows")

    # A map that skips an allowed tile changes the result exactly as masking that tile would.
    bmap = np.array(mk.block_map_from_mask_fn(fn, (dead, chunks), (chunks,), s, s, 128, 128))
    bmap[0, 3, 1] = mk.EMPTY
    got = value_and_grads(lambda q, k, v: mk.flash_attention(q, k, v, block_map=jnp.asarray(bmap), **kw), q, k, v, do)
    pos = np.arange(s)
    fn_cut = lambda qf, kf: fn(qf[:2], kf[:1]) & ~((qf[2] // 128 == 3) & (kf[1] // 128 == 1))
    kw_cut = dict(mask_fn=fn_cut, q_meta=(dead, chunks, pos[None]), k_meta=(chunks, pos[None]))
    want = value_and_grads(lambda q, k, v: mk.reference_attention(q, k, v, **kw_cut), q, k, v, do)
    check(got, want, 3e-2, "skipped tile")


def test_compiled_registry_matches_xla():
    masks = pytest.importorskip("mmdit.attention.masks")
    from mmdit.attention.registry import AttentionOptions, attend

    nv, na = 1560, 157  # 5 latent frames of 312 video tokens + 5 s of audio latents
    s = nv + na
    fields = dict(
        stream=np.r_[np.zeros(nv), np.ones(na)].astype(np.int32),
        time=np.r_[np.arange(nv) // 312 * 1.0, np.arange(na) * 5.0 / na].astype(np.float32),
        chunk=np.r_[np.arange(nv) // 624, np.minimum(np.arange(na) * 3 // na, 2)].astype(np.int32),
        known=np.r_[np.arange(nv) < 312, np.zeros(na, bool)],
        valid=np.r_[np.ones(nv, bool), np.arange(na) < na - 7],
        group=np.zeros(s, np.int32),
    )
    meta = masks.TokenMeta(**{f: fields[f][None] for f in masks.TokenMeta._fields})
    q, k, v, do = qkv(1, s, s, 4, 128, jnp.bfloat16, seed=4)
    for rule in ("full", "chunk_causal & no_peek", "local(1) | same_stream"):
        spec = masks.make_mask_spec(rule, ["video", "audio"], meta)
        run = lambda impl: value_and_grads(lambda q, k, v: attend(q, k, v, spec, AttentionOptions(impl=impl)), q, k, v, do)
        check(run("pallas"), run("xla"), 3e-2, rule)
