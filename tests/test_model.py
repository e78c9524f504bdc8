"""The MM-DiT: joint vs per-stream attention, information flow, per-token sigma, determinism, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_cfg

from mmdit.attention import masks as M
from mmdit.attention import registry as reg
from mmdit.model.attention import joint_attention
from mmdit.model.layers import TimestepEmbedding
from mmdit.model.mmdit import MMDiT
from mmdit.model.spec import build_spec


def inputs(spec, batch=2, seed=0, sigma=0.5):
    keys = jax.random.split(jax.random.key(seed), 8)
    tokens = {
        a.name: jax.random.normal(keys[i], (batch, a.geometry.num_tokens, a.geometry.token_dim))
        for i, a in enumerate(spec.streams)
    }
    sig = {a.name: jnp.full((batch, a.geometry.num_tokens), sigma) for a in spec.streams if not a.geometry.condition}
    conds = {c.name: jax.random.normal(keys[5 + i], (batch, c.length, c.dim)) for i, c in enumerate(spec.conditions)}
    return tokens, sig, conds


def build(**over):
    spec = build_spec(tiny_model_cfg(**over))
    model = MMDiT(spec)
    t, s, c = inputs(spec)
    params = model.init(jax.random.key(0), t, s, c)
    return spec, model, params, (t, s, c)


def test_joint_attention_with_cross_pairs_masked_equals_separate_attention():
    k = jax.random.split(jax.random.key(1), 6)
    B, H, D, Sv, Sa = 2, 3, 8, 10, 7
    qs = {"video": jax.random.normal(k[0], (B, Sv, H, D)), "audio": jax.random.normal(k[1], (B, Sa, H, D))}
    ks = {"video": jax.random.normal(k[2], (B, Sv, H, D)), "audio": jax.random.normal(k[3], (B, Sa, H, D))}
    vs = {"video": jax.random.normal(k[4], (B, Sv, H, D)), "audio": jax.random.normal(k[5], (B, Sa, H, D))}
    stream = jnp.concatenate([jnp.zeros(Sv, jnp.int32), jnp.ones(Sa, jnp.int32)])[None]
    S = Sv + Sa
    meta = M.TokenMeta(
        stream=stream,
        time=jnp.zeros((1, S)),
        chunk=jnp.zeros((1, S), jnp.int32),
        known=jnp.zeros((1, S), bool),
        valid=jnp.ones((1, S), bool),
        group=stream,
    )
    opts = reg.AttentionOptions()
    joint = joint_attention(qs, ks, vs, M.make_mask_spec("full", ("video", "audio"), meta), opts)
    for n in ("video", "audio"):
        sep = jax.nn.dot_product_attention(qs[n], ks[n], vs[n])
        np.testing.assert_allclose(joint[n], sep, atol=1e-5)
    # and with joint groups the result differs (the test can fail)
    meta_j = meta._replace(group=jnp.zeros_like(stream))
    joint2 = joint_attention(qs, ks, vs, M.make_mask_spec("full", ("video", "audio"), meta_j), opts)
    assert float(jnp.abs(joint2["video"] - joint["video"]).max()) > 1e-3


def _cross_stream_grad(spec, model, params, data, valid=None):
    t, s, c = data

    def video_out_from_audio(audio_tokens):
        return model.apply(params, {**t, "audio": audio_tokens}, s, c, valid=valid)["video"].sum()

    return jax.grad(video_out_from_audio)(t["audio"])


def test_layers_outside_joint_layers_let_no_information_cross():
    spec, model, params, data = build(joint_layers=())
    g = _cross_stream_grad(spec, model, params, data)
    assert float(jnp.abs(g).max()) == 0.0
    spec, model, params, data = build(joint_layers=(1,))
    g = _cross_stream_grad(spec, model, params, data)
    assert float(jnp.abs(g).max()) > 1e-6


def test_invalid_stream_is_never_attended():
    spec, model, params, data = build()
    B = 2
    valid = {
        "video": jnp.ones((B, spec.stream("video").geometry.num_tokens), bool),
        "audio": jnp.zeros((B, spec.stream("audio").geometry.num_tokens), bool),
    }
    g = _cross_stream_grad(spec, model, params, data, valid=valid)
    assert float(jnp.abs(g).max()) == 0.0


def test_per_token_sigma_changes_only_its_token_modulation():
    m = TimestepEmbedding(dim=16, freq_dim=32)
    sigma = jnp.linspace(0.1, 0.9, 7)[None]
    params = m.init(jax.random.key(0), sigma)
    jac = jax.jacobian(lambda s: m.apply(params, s)[1].sum(axis=(-1, -2)))(sigma)  # [1,7,1,7]
    jac = np.asarray(jac)[0, :, 0, :]
    off = jac - np.diag(np.diag(jac))
    assert np.abs(off).max() == 0.0 and np.abs(np.diag(jac)).min() > 0


def test_same_seed_same_params_and_outputs():
    spec, model, p1, data = build()
    p2 = model.init(jax.random.key(0), *data)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), p1, p2)
    np.testing.assert_array_equal(model.apply(p1, *data)["video"], model.apply(p2, *data)["video"])
    p3 = model.init(jax.random.key(1), *data)
    assert not np.allclose(model.apply(p3, *data)["video"], model.apply(p1, *data)["video"])


def test_remat_and_scan_do_not_change_the_function():
    spec, model, params, data = build()
    ref = model.apply(params, *data)
    spec_r = build_spec(tiny_model_cfg(remat="full"))
    out = MMDiT(spec_r).apply(params, *data)
    for n in ref:
        np.testing.assert_allclose(out[n], ref[n], atol=1e-5)


def test_key_frame_embedding_marks_the_first_frame_of_chunk_0_only():
    """``key_frame_embedding``: a zero-initialised [D] vector; zero leaves the function of the model without it,
    and set it reaches the first temporal position's tokens (then the rest through attention), in chunk 0 only."""
    spec, model, params, data = build()
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), params)  # off the zero heads
    spec_k = build_spec(tiny_model_cfg(**{"streams.video.key_frame_embedding": True}))
    model_k = MMDiT(spec_k)
    params_k = model_k.init(jax.random.key(0), *data)
    vec = params_k["params"]["video"]["key_frame"]
    assert vec.value.shape == (spec_k.stream("video").dim,) and not np.any(np.asarray(vec.value))
    assert vec.names == ("embed",)
    with_zero = {"params": {**params["params"], "video": {**params["params"]["video"], "key_frame": vec}}}
    np.testing.assert_array_equal(model_k.apply(with_zero, *data)["video"], model.apply(params, *data)["video"])
    ref = model.apply(params, *data)["video"]
    with_key = jax.tree.map(lambda a: a, with_zero)
    # (not a constant vector: the blocks' LayerNorm removes a token's mean)
    with_key["params"]["video"]["key_frame"] = vec.replace_boxed(jax.random.normal(jax.random.key(2), vec.value.shape))
    per_token = np.abs(np.asarray(model_k.apply(with_key, *data)["video"] - ref)).mean(axis=(0, 2))
    first = spec_k.stream("video").geometry.tokens_per_frame
    assert per_token[:first].min() > 3 * per_token[first:].max() > 0
    later = model_k.apply(with_key, *data, chunk_index=jnp.int32(1))["video"]  # (one-chunk spec: any chunk > 0)
    np.testing.assert_array_equal(later, ref)


def test_dropping_a_condition_removes_its_contribution():
    spec, model, params, (t, s, c) = build()
    keep = {"text": jnp.array([True, False])}
    out = model.apply(params, t, s, c, cond_keep=keep)
    c_zero_effect = model.apply(params, t, s, {"text": c["text"] * 10}, cond_keep=keep)
    np.testing.assert_allclose(out["video"][1], c_zero_effect["video"][1], atol=1e-5)  # dropped sample ignores text
    assert float(jnp.abs(out["video"][0] - c_zero_effect["video"][0]).max()) > 1e-4


def test_chunk_causal_mask_blocks_future_chunks():
    spec, model, params, (t, s, c) = build(mask="chunk_causal", chunk_frames=1.0)
    # video has 3 latent frames = chunks 0, 1, 2; chunk 1 sees {0, 1} only, not 2.
    v = spec.stream("video").geometry

    def out_chunk1(video_tokens):
        o = model.apply(params, {**t, "video": video_tokens}, s, c)["video"]
        return o[:, v.tokens_per_frame : 2 * v.tokens_per_frame].sum()

    g = jax.grad(out_chunk1)(t["video"])
    assert float(jnp.abs(g[:, 2 * v.tokens_per_frame :]).max()) == 0.0
    assert float(jnp.abs(g[:, : v.tokens_per_frame]).max()) > 0


def test_condition_stream_has_no_output_and_drives_video():
    over = {
        "streams.audio.condition": True,
        "streams.audio.cross": (),
        "mask": "no_peek",
    }
    spec, model, params, (t, s, c) = build(**over)
    s = {"video": s["video"]}
    out = model.apply(params, t, s, c)
    assert set(out) == {"video"}
    g = jax.grad(lambda a: model.apply(params, {**t, "audio": a}, s, c)["video"].sum())(t["audio"])
    assert float(jnp.abs(g).max()) > 0


@pytest.mark.parametrize(
    "over,match",
    [
        ({"heads": 5}, r"model.streams.(audio|video).dim=32 is not divisible by model.heads=5"),
        ({"mask": "no_peek('motion')"}, r"model.mask.*'motion'"),
        ({"joint_layers": (0, 3)}, r"model.joint_layers has index\(es\) \[3\] outside \[0, 3\)"),
        ({"streams.video.cross": ("txt",)}, r"model.streams.video.cross names condition 'txt'"),
        ({"streams.video.shape": (3, 5, 4)}, r"model.streams.video: latent H=5 is not divisible by patch 2"),
        ({"attention": {"impl": "flash9"}}, r"model.attention.impl='flash9'"),
        ({"remat": "some"}, r"model.remat='some'"),
        ({"streams.audio.key_frame_embedding": True}, r"model.streams.audio.key_frame_embedding=True: only a generated grid"),
        ({"streams.video.key_frame_embedding": 1}, r"model.streams.video.key_frame_embedding=1: use True or False"),
    ],
)
def test_bad_configs_name_the_field(over, match):
    with pytest.raises(ValueError, match=match):
        build_spec(tiny_model_cfg(**over))


def test_wrong_token_shape_is_reported():
    spec, model, params, (t, s, c) = build()
    t = {**t, "audio": t["audio"][:, :5]}
    with pytest.raises(ValueError, match="stream 'audio'.*model.streams.audio"):
        model.apply(params, t, s, c)


def test_cudnn_impl_refuses_masks_and_falls_back_when_configured():
    _, _, params, data = build(mask="chunk_causal", chunk_frames=1.0)
    spec = build_spec(tiny_model_cfg(mask="chunk_causal", chunk_frames=1.0, attention={"impl": "cudnn"}))
    with pytest.raises(reg.UnsupportedAttention, match="fallback"):
        MMDiT(spec).apply(params, *data)
    spec_fb = build_spec(tiny_model_cfg(mask="chunk_causal", chunk_frames=1.0, attention={"impl": "cudnn", "fallback": "xla"}))
    spec_x = build_spec(tiny_model_cfg(mask="chunk_causal", chunk_frames=1.0))
    np.testing.assert_allclose(
        MMDiT(spec_fb).apply(params, *data)["video"], MMDiT(spec_x).apply(params, *data)["video"], atol=1e-6
    )
    # full mask: cudnn (XLA on CPU) matches the reference
    spec_c = build_spec(tiny_model_cfg(attention={"impl": "cudnn"}))
    spec_r = build_spec(tiny_model_cfg())
    np.testing.assert_allclose(
        MMDiT(spec_c).apply(params, *data)["video"], MMDiT(spec_r).apply(params, *data)["video"], atol=1e-5
    )


# -- CPU fast paths: each equals the plain computation it replaces ------------------------------------


def _per_token_embedding(params, sigma, freq_dim):
    """The time embedding run on every token (the reference of the palette path)."""
    from mmdit.model.layers import timestep_mlp

    p = params["params"]
    w = tuple((p[n]["kernel"], p[n]["bias"]) for n in ("linear_1", "linear_2", "time_proj"))
    temb, mod = timestep_mlp(w, sigma, freq_dim)
    return temb, mod.reshape(mod.shape[:-1] + (6, -1))


@pytest.mark.parametrize(
    "sigma, by_palette",
    [
        ([[0.3] * 12 + [0.0] * 8, [0.7] * 20], True),  # training: one sigma per sample, 0 on known tokens
        ([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8] + [0.5] * 12, [0.5] * 20], False),  # 8 distinct > SIGMA_PALETTE
        ([[0.3] * 5 + [0.0] * 3, [0.7] * 8], False),  # fewer than PALETTE_MIN_TOKENS (a streaming chunk): per token
    ],
)
def test_time_embedding_by_palette_equals_per_token(sigma, by_palette):
    import flax.linen as nn

    from mmdit.model.layers import PALETTE_MIN_TOKENS, sigma_palette

    sigma = jnp.asarray(sigma, jnp.float32)
    m = TimestepEmbedding(dim=16, freq_dim=32)
    params = nn.unbox(m.init(jax.random.key(0), sigma))
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), params)  # nonzero biases
    got = jax.jit(m.apply)(params, sigma)
    want = _per_token_embedding(params, sigma, 32)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
    loss = lambda f: lambda p, s: sum(jnp.sum(jnp.sin(x)) for x in f(p, s))  # noqa: E731
    g_got = jax.jit(jax.grad(loss(m.apply), argnums=(0, 1)))(params, sigma)
    g_want = jax.grad(loss(lambda p, s: _per_token_embedding(p, s, 32)), argnums=(0, 1))(params, sigma)
    for g, w in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=1e-4 * float(np.abs(w).max()))
    values, onehot, fits = sigma_palette(sigma)
    long_enough = sigma.shape[1] >= PALETTE_MIN_TOKENS
    assert bool(fits and long_enough) == by_palette
    assert ("cond" in str(jax.make_jaxpr(m.apply)(params, sigma))) == long_enough  # the run-time check exists
    if by_palette:  # every token selects exactly the column holding its value
        np.testing.assert_array_equal(np.asarray(onehot.sum(-1)), 1.0)
        np.testing.assert_array_equal(np.asarray(jnp.einsum("bsk,bk->bs", onehot, values)), np.asarray(sigma))


def _random_mask_spec(key, B, S, full):
    k1, k2 = jax.random.split(key)
    valid = jax.random.bernoulli(k1, 0.7, (B, S)).at[:, 0].set(True).at[:, -1].set(False)
    group = jax.random.randint(k2, (B, S), 0, 2).at[:, -1].set(2)  # the last query's group has no valid key
    meta = M.TokenMeta(
        stream=jnp.zeros((B, S), jnp.int32),
        time=jnp.zeros((B, S), jnp.float32),
        chunk=jnp.zeros((B, S), jnp.int32),
        known=jnp.zeros((B, S), bool),
        valid=jnp.ones((B, S), bool) if full else valid,
        group=jnp.zeros((B, S), jnp.int32) if full else group,
    )
    return M.make_mask_spec("full", ("video",), meta)


@pytest.mark.parametrize("full", [True, False])
def test_xla_attention_equals_reference_in_value_and_gradient(full):
    """The xla impl (no mask when ``is_full``; masked softmax whose backward reads only the
    probabilities otherwise, rows without keys included) against mmdit_kernels.reference_attention."""
    from mmdit_kernels import reference_attention

    B, S, H, D = 2, 12, 2, 8
    ks = jax.random.split(jax.random.key(3), 5)
    q, k, v, do = (jax.random.normal(ks[i], (B, S, H, D)) for i in range(4))
    spec = _random_mask_spec(ks[4], B, S, full)
    assert spec.is_full == full
    if not full:  # a query whose group has no valid key exists: its row must be exactly 0
        assert not bool(jnp.all(jnp.any(spec.dense(), axis=-1)))

    def ref(q, k, v):
        return reference_attention(q, k, v, mask_fn=spec.kernel_mask_fn(), q_meta=tuple(spec.q), k_meta=tuple(spec.k))

    got, vjp_got = jax.vjp(lambda q, k, v: reg.xla_attention(q, k, v, spec, reg.AttentionOptions()), q, k, v)
    want, vjp_want = jax.vjp(ref, q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    for g, w in zip(vjp_got(do), vjp_want(do)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_dense_kernel_gradient_equals_autodiff_and_dots_stay_saveable():
    from jax._src.ad_checkpoint import saved_residuals

    from mmdit.model.layers import dense_dot_general

    ks = jax.random.split(jax.random.key(4), 3)
    x, w, g = jax.random.normal(ks[0], (2, 5, 8)), jax.random.normal(ks[1], (8, 3)), jax.random.normal(ks[2], (2, 5, 3))
    dims = (((2,), (0,)), ((), ()))
    ours = lambda x, w: jnp.sum(jnp.tanh(dense_dot_general(x, w, dims)) * g)  # noqa: E731
    plain = lambda x, w: jnp.sum(jnp.tanh(jax.lax.dot_general(x, w, dims)) * g)  # noqa: E731
    np.testing.assert_allclose(ours(x, w), plain(x, w), rtol=1e-6)
    for a, b in zip(jax.grad(ours, argnums=(0, 1))(x, w), jax.grad(plain, argnums=(0, 1))(x, w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # remat=dots still keeps the product (it is a plain dot_general) instead of recomputing it
    saved = saved_residuals(jax.checkpoint(ours, policy=jax.checkpoint_policies.checkpoint_dots), x, w)
    assert any("dot_general" in why for _, why in saved), saved


def test_stacked_dense_equals_separate_layers_in_value_and_gradient():
    from mmdit.model.layers import stacked_dense

    ks = jax.random.split(jax.random.key(5), 8)
    x, g = jax.random.normal(ks[0], (2, 5, 8)), jax.random.normal(ks[1], (2, 5, 3, 4))
    params = [(jax.random.normal(ks[2 + i], (8, 4)), jax.random.normal(ks[5 + i], (4,))) for i in range(3)]
    ours = lambda x, p: jnp.sum(jnp.tanh(stacked_dense(x, p, jnp.float32)) * g)  # noqa: E731
    plain = lambda x, p: jnp.sum(jnp.tanh(jnp.stack([x @ k + b for k, b in p], axis=-2)) * g)  # noqa: E731
    np.testing.assert_allclose(ours(x, params), plain(x, params), rtol=1e-6)
    got, want = jax.grad(ours, argnums=(0, 1))(x, params), jax.grad(plain, argnums=(0, 1))(x, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_qkv_params_equal_three_dense_layers():
    """The stacked projection declares the params three ``dense`` layers did (names, shapes, init values),
    so checkpoints and converters are unchanged; its q/k/v equal theirs."""
    import flax.linen as nn

    from mmdit.model.attention import QKV
    from mmdit.model.layers import dense

    class ThreeDense(nn.Module):
        @nn.compact
        def __call__(self, x):
            return [dense(8, ("embed", "heads"), jnp.float32, jnp.float32, name=n)(x) for n in ("to_q", "to_k", "to_v")]

    x = jax.random.normal(jax.random.key(1), (1, 3, 16))
    got = nn.unbox(QKV(2, 4).init(jax.random.key(0), x, None)["params"])
    want = nn.unbox(ThreeDense().init(jax.random.key(0), x)["params"])
    assert sorted(got) == ["norm_k", "norm_q", "to_k", "to_q", "to_v"]
    for n in ("to_q", "to_k", "to_v"):
        jax.tree.map(np.testing.assert_array_equal, got[n], want[n])
    params = {**got, "norm_q": {"scale": jnp.ones(8)}, "norm_k": {"scale": jnp.ones(8)}}
    q, k, v = QKV(2, 4).apply({"params": params}, x, None)
    rms = lambda t: t * jax.lax.rsqrt(jnp.mean(t * t, -1, keepdims=True) + 1e-6)  # noqa: E731
    ref = ThreeDense().apply({"params": want}, x)
    for ours, theirs in zip((q, k, v), (rms(ref[0]), rms(ref[1]), ref[2])):
        np.testing.assert_allclose(np.asarray(ours).reshape(theirs.shape), np.asarray(theirs), rtol=1e-5, atol=1e-5)
