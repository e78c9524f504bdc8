"""mmdit_kernels' TPU (Mosaic) kernel on CPU, in the Pallas TPU interpreter with out-of-bounds reads
raising and uninitialised memory poisoned with NaN; the blockwise (out, lse) / backward entry points
of both kernels (ring attention's block step); the Mosaic lowering; the ``pallas_tpu`` registry
entry through the model.

Every mmdit mask rule and combination runs against the dense reference, forward and dq/dk/dv, at
odd lengths (not tile multiples) with invalid tokens, joint and per-stream (group = stream) layers,
f32 at a tight and bf16 at a loose tolerance.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_cfg

import mmdit_kernels as mk
from mmdit.attention import masks as M
from mmdit_kernels.flash_gpu import flash_attention_gpu_bwd, flash_attention_gpu_fwd_lse
from mmdit_kernels import flash_tpu
from mmdit_kernels.flash_tpu import flash_attention_tpu, flash_attention_tpu_bwd, flash_attention_tpu_fwd_lse

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST)
STREAMS = ("audio", "video")


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

    return fast_jit(f)(q, k, v)


def assert_close(got, want, tol, what):
    names = ("out", "dq", "dk", "dv")
    for name, a, b in zip(names, jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.isfinite(np.asarray(a, np.float32)).all(), f"{what}: non-finite {name}"
        assert rel_err(a, b) < tol, f"{what}: {name} error {rel_err(a, b)}"


def token_meta(b=1, na=90, nv=150, invalid=7, seed=0):
    """Audio (``na`` tokens) then video (``nv``: 5 latent frames), ``[b, S]`` fields, the last
    ``invalid`` audio tokens padding; the first video frame and (batch 1) the first audio third known."""
    s = na + nv
    per = nv // 5
    stream = np.r_[np.zeros(na), np.ones(nv)].astype(np.int32)
    time = np.r_[np.arange(na) * 5.0 / na, np.arange(nv) // per].astype(np.float32)
    chunk = np.r_[np.minimum(np.arange(na) * 3 // na, 2), np.minimum(np.arange(nv) // per // 2, 2)].astype(np.int32)
    valid = np.r_[np.arange(na) < na - invalid, np.ones(nv, bool)]
    known = np.stack([np.r_[np.zeros(na, bool), np.arange(nv) < per], np.r_[np.arange(na) < na // 3, np.arange(nv) < per]])[:b]
    fields = dict(stream=stream, time=time, chunk=chunk, known=known, valid=valid, group=np.zeros(s, np.int32))
    return M.TokenMeta(**{f: np.broadcast_to(np.asarray(fields[f]).reshape(-1, s), (b, s)) for f in M.TokenMeta._fields})


def kernel_args(spec: M.MaskSpec, block=128):
    return dict(
        mask_fn=spec.kernel_mask_fn(),
        q_meta=tuple(spec.q),
        k_meta=tuple(spec.k),
        block_map=spec.block_map(block, block),
    )


# (rule, layer, dtype): "joint" has group 0 everywhere, "separate" is a per-stream layer (group = stream).
RULES = [
    ("full", "joint", jnp.float32),
    ("full", "separate", jnp.bfloat16),
    ("local(1)", "joint", jnp.float32),
    ("chunk_causal", "joint", jnp.bfloat16),
    ("no_peek", "joint", jnp.float32),
    ("chunk_causal & no_peek", "separate", jnp.float32),
    ("(local(2) | same_stream) & causal", "joint", jnp.bfloat16),
]


@pytest.mark.slow
@pytest.mark.parametrize("rule,layer,dtype", RULES)
def test_tpu_kernel_matches_reference_for_mmdit_rules(rule, layer, dtype):
    meta = token_meta(b=1)
    if layer == "separate":
        meta = meta._replace(group=meta.stream)
    spec = M.make_mask_spec(rule, STREAMS, meta)
    s = meta.stream.shape[1]
    q, k, v, do = qkv(1, s, s, 2, 64, dtype)
    kw = kernel_args(spec)
    got = value_and_grads(lambda q, k, v: flash_attention_tpu(q, k, v, interpret=True, **kw), q, k, v, do)
    kw.pop("block_map")
    want = value_and_grads(lambda q, k, v: mk.reference_attention(q, k, v, **kw), q, k, v, do)
    assert got[0].dtype == dtype and got[0].shape == q.shape
    assert_close(got, want, 2e-5 if dtype == jnp.float32 else 3e-2, f"{rule}/{layer}/{jnp.dtype(dtype).name}")


def test_traced_per_sample_metadata_and_maps_under_jit():
    """The point of the kernel: metadata and block maps computed inside ``jit`` per sample (here the
    known flags differ per batch element and arrive as a traced argument), Sq != Sk, 256-key tiles."""
    meta = token_meta(b=2)
    known = jnp.asarray(meta.known)
    q, k, v, do = qkv(2, meta.stream.shape[1], meta.stream.shape[1], 2, 64, jnp.float32, seed=1)

    def attn(q, k, v, known, impl):
        spec = M.make_mask_spec("chunk_causal & no_peek", STREAMS, meta._replace(known=known))
        if impl == "ref":
            return mk.reference_attention(q, k, v, mask_fn=spec.kernel_mask_fn(), q_meta=tuple(spec.q), k_meta=tuple(spec.k))
        kw = dict(mask_fn=spec.kernel_mask_fn(), q_meta=tuple(spec.q), k_meta=tuple(spec.k), block_map=spec.block_map(128, 256))
        return flash_attention_tpu(q, k, v, interpret=True, block_k=256, **kw)

    def run(impl):
        def f(q, k, v, known):
            out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, known, impl), q, k, v)
            return out, vjp(do)

        return fast_jit(f)(q, k, v, known)

    got, want = run("kernel"), run("ref")
    assert_close(got, want, 2e-5, "traced metadata")
    # the two samples' masks differ, so their outputs differ in the known audio rows
    assert rel_err(want[0][0, :30], want[0][1, :30]) > 0.1


def test_dead_rows_give_zero_output_and_gradients():
    """Rows with no attended key output 0 and get zero gradients; keys nobody attends get zero dk/dv."""
    b, s, h, d = 1, 200, 2, 64
    q, k, v, do = qkv(b, s, s, h, d, jnp.float32, seed=2)
    dead = (np.arange(s) % 9 == 4)[None]
    kw = dict(mask_fn=lambda qf, kf: ~qf[0] & (kf[0] <= 150), q_meta=(dead,), k_meta=(np.arange(s)[None],))
    out, (dq, dk, dv) = value_and_grads(lambda q, k, v: flash_attention_tpu(q, k, v, interpret=True, **kw), q, k, v, do)
    assert np.all(np.asarray(out)[:, dead[0]] == 0) and np.all(np.asarray(dq)[:, dead[0]] == 0)
    assert np.all(np.asarray(dk)[:, 151:] == 0) and np.all(np.asarray(dv)[:, 151:] == 0)
    want = value_and_grads(lambda q, k, v: mk.reference_attention(q, k, v, **kw), q, k, v, do)
    assert_close((out, (dq, dk, dv)), want, 2e-5, "dead rows")  # (their lse = -inf: the blockwise test)


def test_tpu_kernel_follows_the_block_map(monkeypatch):
    """EMPTY tiles contribute nothing even where the mask allows pairs; FULL tiles attend every pair
    (no mask arithmetic) even where the mask forbids some. With an SMEM budget of one grid row, every
    kernel runs as one pallas_call per row group (what long sequences do on a real TPU)."""
    monkeypatch.setattr(flash_tpu, "SMEM_LIST_BYTES", 16)
    b, s, h, d = 1, 256, 1, 128
    q, k, v, do = qkv(b, s, s, h, d, jnp.float32, seed=3)
    chunks = (np.arange(s) // 64)[None].astype(np.int32)
    fn = lambda qf, kf: kf[0] <= qf[0]
    dense = np.asarray(mk.reference.dense_mask(fn, (chunks,), (chunks,), s, s))[0]
    bmap = np.asarray(mk.block_map_from_dense(dense[None], 128, 128))
    assert bmap.tolist() == [[[mk.PARTIAL, mk.EMPTY], [mk.FULL, mk.PARTIAL]]]
    hacked = bmap.copy()
    hacked[0, 1, 0] = mk.EMPTY
    hacked[0, 0, 0] = mk.FULL
    expect = dense.copy()
    expect[128:, :128] = False
    expect[:128, :128] = True
    kw = dict(mask_fn=fn, q_meta=(chunks,), k_meta=(chunks,))
    run = lambda m: value_and_grads(
        lambda q, k, v: flash_attention_tpu(q, k, v, block_map=jnp.asarray(m), interpret=True, **kw), q, k, v, do
    )
    ref = lambda m: value_and_grads(
        lambda q, k, v: mk.reference_attention(q, k, v, mask_fn=lambda qf, kf: jnp.asarray(m)[None]), q, k, v, do
    )
    assert_close(run(hacked), ref(expect), 2e-5, "hacked map")


def test_tpu_kernel_argument_errors():
    q = jnp.zeros((1, 130, 2, 64))
    with pytest.raises(ValueError, match="multiples of 128"):
        flash_attention_tpu(q, q, q, block_q=64, interpret=True)
    with pytest.raises(ValueError, match="block_map has shape"):
        flash_attention_tpu(q, q, q, block_map=jnp.ones((1, 1, 1), jnp.int8), interpret=True)
    with pytest.raises(ValueError, match="metadata fields"):
        flash_attention_tpu(q, q, q, mask_fn=lambda a, b: True, q_meta=(np.zeros((1, 7)),), interpret=True)


# ----------------------------------------------------------------------------------------------
# Blockwise entry points (ring attention's block step), both kernels.


def dense_lse(q, k, mask):
    """``float32 [B, H, Sq]`` natural-log log-sum-exp of the masked scaled scores (-inf: no key)."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    return jax.nn.logsumexp(jnp.where(mask[:, None], s, -jnp.inf), axis=-1)


BLOCKWISE = {
    "tpu": (flash_attention_tpu_fwd_lse, flash_attention_tpu_bwd, 128),
    "gpu": (flash_attention_gpu_fwd_lse, flash_attention_gpu_bwd, 32),
}


@pytest.mark.parametrize("kind", ["tpu", "gpu"])
def test_blockwise_halves_merge_to_full_attention_and_gradient(kind):
    """Two key halves: their (out, lse) merged by log-sum-exp equal full attention; the backward of
    each half given the *global* out/lse sums (dq) / concatenates (dk, dv) to the full gradient."""
    fwd_lse, bwd, block = BLOCKWISE[kind]
    b, s, h, d = 1, 250, 2, 64
    half = 130
    q, k, v, do = qkv(b, s, s, h, d, jnp.float32, seed=4)
    chunks = (np.arange(s) // 50)[None].astype(np.int32)  # chunk 4 (rows 200..249) sees keys 150..249 only
    dead = (np.arange(s) == 7)[None]  # one query row with no key at all
    valid = (np.arange(s) < 240)[None]
    fn = lambda qf, kf: ((kf[0] == qf[0]) | (kf[0] == qf[0] - 1)) & kf[1] & ~qf[1]
    qm, km = (chunks, dead), (chunks, valid)
    parts = [slice(0, half), slice(half, s)]

    def block_kw(sl):
        kmeta = tuple(f[:, sl] for f in km)
        return dict(mask_fn=fn, q_meta=qm, k_meta=kmeta, block_q=block, block_k=block, interpret=True)

    @fast_jit
    def blockwise(q, k, v, do):
        outs = [fwd_lse(q, k[:, sl], v[:, sl], **block_kw(sl)) for sl in parts]
        lse = jnp.logaddexp(outs[0][1], outs[1][1])
        safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
        w = [jnp.where(jnp.isneginf(lse), 0.0, jnp.exp(l - safe)).transpose(0, 2, 1)[..., None] for _, l in outs]
        out = (w[0] * outs[0][0] + w[1] * outs[1][0]).astype(q.dtype)
        grads = [bwd(q, k[:, sl], v[:, sl], out, lse, do, **block_kw(sl)) for sl in parts]
        dq = grads[0][0] + grads[1][0]
        dk = jnp.concatenate([g[1] for g in grads], axis=1)
        dv = jnp.concatenate([g[2] for g in grads], axis=1)
        return out, lse, outs[0][1], (dq, dk, dv)

    out, lse, lse_first, grads = blockwise(q, k, v, do)
    kw = dict(mask_fn=fn, q_meta=qm, k_meta=km)
    want_out, want_grads = value_and_grads(lambda q, k, v: mk.reference_attention(q, k, v, **kw), q, k, v, do)
    assert_close((out, grads), (want_out, want_grads), 2e-5, f"{kind} blockwise")
    dense = mk.reference.dense_mask(fn, qm, km, s, s)
    want_lse = dense_lse(q, k, dense)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    np.testing.assert_allclose(np.where(np.isneginf(lse), 0, lse), np.where(np.isneginf(want_lse), 0, want_lse), atol=2e-5)
    # the first half alone: rows attending only keys of the second half have lse -inf there
    want_first = dense_lse(q[:, :], k[:, :half], dense[:, :, :half])
    np.testing.assert_array_equal(np.isneginf(lse_first), np.isneginf(want_first))
    assert np.isneginf(want_first).sum() > np.isneginf(want_lse).sum()  # some rows see only the second half


# ----------------------------------------------------------------------------------------------
# Mosaic lowering and the model.


def test_tpu_kernels_lower_to_mosaic():
    """Forward, dq and dk/dv lower to Mosaic for the ``tpu`` platform from this CPU host (catches
    Pallas-TPU lowering errors without a TPU; Mosaic's own compilation needs one)."""
    meta = token_meta(b=2)
    spec_of = lambda known: M.make_mask_spec("chunk_causal & local(2) & no_peek", STREAMS, meta._replace(known=known))

    def f(q, k, v, known):
        spec = spec_of(known)
        attn = lambda q, k, v: flash_attention_tpu(q, k, v, **kernel_args(spec))
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(out)

    s = meta.stream.shape[1]
    for dtype in (jnp.bfloat16, jnp.float32):
        x = jax.ShapeDtypeStruct((2, s, 2, 64), dtype)
        known = jax.ShapeDtypeStruct((2, s), jnp.bool_)
        text = jax.jit(f).trace(x, x, x, known).lower(lowering_platforms=("tpu",)).as_text()
        for name in ("mmdit_flash_tpu_fwd", "mmdit_flash_tpu_bwd_dq", "mmdit_flash_tpu_bwd_dkv"):
            assert name in text, f"{name} missing from the {jnp.dtype(dtype).name} lowering"


@pytest.mark.slow
def test_model_with_pallas_tpu_matches_xla(monkeypatch):
    """``model.attention.impl=pallas_tpu`` (interpreted) through the MM-DiT: a loss and its parameter
    gradients equal the ``xla`` impl's, under a structured mask with a per-stream and a joint layer."""
    from mmdit.model.mmdit import MMDiT
    from mmdit.model.spec import build_spec

    traced = []
    forward = flash_tpu._forward
    monkeypatch.setattr(flash_tpu, "_forward", lambda *a, **k: traced.append(1) or forward(*a, **k))

    def build(impl):
        cfg = tiny_model_cfg(
            mask="chunk_causal & no_peek",
            chunk_frames=1.0,
            num_layers=2,
            joint_layers=(1,),
            attention={"impl": impl, "interpret": True},
        )
        return MMDiT(build_spec(cfg))

    ref_model = build("xla")
    keys = jax.random.split(jax.random.key(0), 8)
    spec = ref_model.spec
    tokens = {
        a.name: jax.random.normal(keys[i], (2, a.geometry.num_tokens, a.geometry.token_dim)) for i, a in enumerate(spec.streams)
    }
    sigma = {a.name: jnp.full((2, a.geometry.num_tokens), 0.5) for a in spec.streams if not a.geometry.condition}
    conds = {c.name: jax.random.normal(keys[5 + i], (2, c.length, c.dim)) for i, c in enumerate(spec.conditions)}
    params = fast_jit(ref_model.init)(jax.random.key(1), tokens, sigma, conds)

    def loss_and_grads(model):
        def loss(p):
            out = model.apply(p, tokens, sigma, conds)
            return sum(jnp.mean(jnp.square(o)) for o in jax.tree.leaves(out))

        return fast_jit(jax.value_and_grad(loss))(params)

    got, want = loss_and_grads(build("pallas_tpu")), loss_and_grads(ref_model)
    assert len(traced) >= 2  # the joint and the per-stream layer ran the kernel (no silent fallback)
    assert abs(float(got[0]) - float(want[0])) < 1e-5 * abs(float(want[0]))
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        assert rel_err(a, b) < 1e-4


def test_registry_entries():
    """``pallas_tpu`` / ``pallas_gpu`` / ``pallas`` are registered with block maps and blockwise pairs;
    ``pallas_tpu``'s pair agrees with the ``xla`` pair (the ring contract); errors name the field."""
    from mmdit.attention import registry as reg

    meta = token_meta(b=1, na=40, nv=100)
    spec = M.make_mask_spec("chunk_causal & no_peek", STREAMS, meta)
    s = meta.stream.shape[1]
    q, k, v, do = qkv(1, s, s, 2, 64, jnp.float32, seed=5)
    for name in ("pallas", "pallas_gpu", "pallas_tpu"):
        assert reg.needs_block_map(name) and reg.blockwise(name) is not None, name
    opts = reg.AttentionOptions(impl="pallas_tpu", interpret=True)
    got = fast_jit(lambda q, k, v: reg.blockwise("pallas_tpu")[0](q, k, v, spec, opts))(q, k, v)
    want = reg.blockwise("xla")[0](q, k, v, spec, opts)
    assert_close(got[0], want[0], 2e-5, "pallas_tpu fwd_lse out")
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), atol=2e-5)

    with pytest.raises(reg.UnsupportedAttention, match=r"model.attention.block_q=64.*multiples of 128"):
        reg.attend(q, k, v, spec, reg.AttentionOptions(impl="pallas_tpu", interpret=True, block_q=64))
    if jax.default_backend() == "cpu":
        with pytest.raises(reg.UnsupportedAttention, match="model.attention.interpret=True"):
            reg.attend(q, k, v, spec, reg.AttentionOptions(impl="pallas_tpu"))

    def traced(known):  # splash builds static masks: traced metadata is refused, naming the rule
        spec_t = M.make_mask_spec("no_peek", STREAMS, meta._replace(known=known))
        return reg.attend(q, k, v, spec_t, reg.AttentionOptions(impl="splash", interpret=True))

    with pytest.raises(reg.UnsupportedAttention, match=r"splash: mask no_peek has traced metadata.*pallas"):
        jax.jit(traced)(jnp.asarray(meta.known))


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="compiles the kernels with Mosaic: needs a TPU")
@pytest.mark.parametrize("rule,block", [("full", 128), ("chunk_causal & no_peek", 256), ("local(1) | same_stream", 512)])
def test_compiled_on_tpu_matches_reference(rule, block):
    """On a TPU: the compiled kernels (not the interpreter) at a longer odd length, bf16."""
    meta = token_meta(b=2, na=400, nv=1000, invalid=13)
    spec = M.make_mask_spec(rule, STREAMS, meta)
    s = meta.stream.shape[1]
    q, k, v, do = qkv(2, s, s, 4, 128, jnp.bfloat16, seed=6)
    kw = dict(kernel_args(spec, block), block_q=block, block_k=block)
    got = value_and_grads(lambda q, k, v: flash_attention_tpu(q, k, v, **kw), q, k, v, do)
    kw = {key: kw[key] for key in ("mask_fn", "q_meta", "k_meta")}
    with jax.default_matmul_precision("highest"):
        want = value_and_grads(lambda q, k, v: mk.reference_attention(q, k, v, **kw), q, k, v, do)
    assert_close(got, want, 3e-2, f"{rule} compiled")
