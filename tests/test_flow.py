"""Tests for mmdit.flow: the flow convention, σ sampling, noising, masked loss and condition dropout
(samplers: tests/test_ode.py; CFG: tests/test_guidance.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdit import flow


def _streams(key, b=3):
    kv, ka = jax.random.split(key)
    return {"video": jax.random.normal(kv, (b, 6, 4)), "audio": jax.random.normal(ka, (b, 5, 2))}


# ------------------------------------------------------------------------------------ schedules


def test_shift_identity_monotone_fixed_points():
    s = jnp.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(flow.shift_sigma(s, 1.0), s, atol=1e-7)
    for shift in (0.5, 3.0, 5.0):
        out = np.asarray(flow.shift_sigma(s, shift))
        assert np.all(np.diff(out) > 0), shift
        np.testing.assert_allclose(out[[0, -1]], [0.0, 1.0], atol=1e-7)
    # s > 1 pushes towards noise; the formula at one point: 3·0.5 / (1 + 2·0.5) = 0.75.
    assert np.all(np.asarray(flow.shift_sigma(s[1:-1], 3.0)) > np.asarray(s[1:-1]))
    np.testing.assert_allclose(flow.shift_sigma(0.5, 3.0), 0.75, rtol=1e-6)
    np.testing.assert_allclose(flow.timestep_input(jnp.array([0.0, 0.25, 1.0])), [0, 250, 1000])


def test_logit_normal_statistics():
    key = jax.random.PRNGKey(0)
    s = np.asarray(flow.sample_sigma(key, (20000,)))
    assert s.min() > 0 and s.max() < 1
    assert abs(np.median(s) - 0.5) < 0.02
    # The logit of σ is N(mean, std).
    logit = np.log(s / (1 - s))
    assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1.0) < 0.03
    shifted = np.asarray(flow.sample_sigma(key, (20000,), shift=3.0))
    assert abs(np.median(shifted) - 0.75) < 0.02  # the median maps through the shift
    m = np.asarray(flow.sample_sigma(key, (20000,), mean=1.0, std=0.5))
    assert abs(np.median(m) - jax.nn.sigmoid(1.0)) < 0.02
    u = np.asarray(flow.sample_sigma(key, (20000,), dist="uniform"))
    assert abs(u.mean() - 0.5) < 0.02 and u.min() >= 0 and u.max() < 1
    with pytest.raises(ValueError):
        flow.sample_sigma(key, (2,), dist="beta")


def test_sample_token_sigmas_shared_independent_known():
    b = 64
    known = {"video": jnp.zeros((b, 6), bool).at[:, 0].set(True), "audio": jnp.zeros((b, 5), bool).at[0].set(True)}
    key = jax.random.PRNGKey(1)
    sig = flow.sample_token_sigmas(key, known)
    v, a = np.asarray(sig["video"]), np.asarray(sig["audio"])
    assert v.shape == (b, 6) and a.shape == (b, 5)
    assert np.all(v[:, 0] == 0) and np.all(a[0] == 0)
    # One σ per sample, shared by all of its unknown tokens in all streams.
    assert np.all(v[:, 1:] == v[:, 1:2]) and np.all(a[1:] == v[1:, 1:2])
    assert len(np.unique(v[:, 1])) == b
    ind = flow.sample_token_sigmas(key, known, independent_streams=True)
    vi, ai = np.asarray(ind["video"]), np.asarray(ind["audio"])
    assert np.all(vi[:, 1:] == vi[:, 1:2]) and np.all(ai[1:] == ai[1:, :1])
    assert not np.any(vi[1:, 1] == ai[1:, 0])
    assert np.all(ai[0] == 0)
    # Deterministic under a fixed key and independent of dict order.
    again = flow.sample_token_sigmas(key, {"audio": known["audio"], "video": known["video"]}, independent_streams=True)
    np.testing.assert_array_equal(again["video"], vi)
    # A fraction: about that share of the samples draws independent σ's, the rest share one.
    big = {"video": jnp.zeros((2000, 3), bool), "audio": jnp.zeros((2000, 2), bool)}
    half = flow.sample_token_sigmas(key, big, independent_streams=0.3)
    differ = np.asarray(half["video"][:, 0] != half["audio"][:, 0])
    assert 0.25 < differ.mean() < 0.35
    with pytest.raises(ValueError, match="independent_streams"):
        flow.sample_token_sigmas(key, big, independent_streams=1.5)


# -------------------------------------------------------------------------------------- noising


def test_interpolation_endpoints_and_known_tokens():
    key = jax.random.PRNGKey(2)
    x = _streams(key)
    known = {"video": jnp.zeros((3, 6), bool).at[:, :2].set(True), "audio": jnp.zeros((3, 5), bool)}
    sig = flow.sample_token_sigmas(jax.random.PRNGKey(3), known)
    xs, noise, target = flow.noisy_inputs(jax.random.PRNGKey(4), x, sig)
    for n in x:
        np.testing.assert_allclose(target[n], noise[n] - x[n], atol=1e-6)
        s = np.asarray(sig[n])[..., None]
        np.testing.assert_allclose(xs[n], (1 - s) * x[n] + s * noise[n], atol=1e-6)
    # Known tokens come back bit-exact.
    np.testing.assert_array_equal(np.asarray(xs["video"])[:, :2], np.asarray(x["video"])[:, :2])
    # Endpoints: σ = 0 is data, σ = 1 is noise; works on plain arrays too.
    xv, ev = x["video"], noise["video"]
    np.testing.assert_array_equal(flow.interpolate(xv, ev, jnp.zeros((3, 6))), xv)
    np.testing.assert_allclose(flow.interpolate(xv, ev, jnp.ones((3, 6))), ev, atol=1e-7)
    # Determinism; different keys give different noise.
    xs2, noise2, _ = flow.noisy_inputs(jax.random.PRNGKey(4), x, sig)
    np.testing.assert_array_equal(noise2["audio"], noise["audio"])
    _, noise3, _ = flow.noisy_inputs(jax.random.PRNGKey(5), x, sig)
    assert not np.allclose(noise3["audio"], noise["audio"])
    # bf16 data stays bf16.
    xb = flow.interpolate(xv.astype(jnp.bfloat16), ev, jnp.zeros((3, 6)))
    assert xb.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------- loss


def test_loss_value_and_masking():
    key = jax.random.PRNGKey(6)
    kp, kt = jax.random.split(key)
    pred, target = _streams(kp, b=2), _streams(kt, b=2)
    known = {
        "video": jnp.array([[1, 1, 0, 0, 0, 0], [0] * 6], bool),
        "audio": jnp.array([[1] * 5, [0, 0, 0, 1, 1]], bool),
    }  # audio fully known in sample 0
    valid = {"video": jnp.array([[1] * 6, [1, 1, 1, 1, 0, 0]], bool)}
    weights = {"video": 1.0, "audio": 0.5}
    total, metrics = flow.flow_loss(pred, target, known, stream_weights=weights, valid=valid)

    # Reference in numpy.
    def per_sample(n, b, w):
        mse = ((np.asarray(pred[n][b]) - np.asarray(target[n][b])) ** 2).mean(-1)
        return (mse * w).sum() / max(w.sum(), 1)

    wv = [np.array([0, 0, 1, 1, 1, 1.0]), np.array([1, 1, 1, 1, 0, 0.0])]
    wa = [np.zeros(5), np.array([1, 1, 1, 0, 0.0])]
    lv = [per_sample("video", b, wv[b]) for b in range(2)]
    la = [per_sample("audio", b, wa[b]) for b in range(2)]
    ref = np.mean([lv[b] + 0.5 * la[b] for b in range(2)])
    np.testing.assert_allclose(total, ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/video"], np.mean(lv), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/audio"], la[1], rtol=1e-5)  # only sample 1 is active
    np.testing.assert_allclose(metrics["loss/total"], total)

    # Predictions at known or invalid tokens change neither the loss nor its gradient.
    junk = {
        "video": pred["video"].at[0, :2].set(1e3).at[1, 4:].set(-1e3),
        "audio": pred["audio"].at[0].set(5.0).at[1, 3:].set(7.0),
    }
    loss_fn = jax.jit(lambda p: flow.flow_loss(p, target, known, stream_weights=weights, valid=valid)[0])
    np.testing.assert_allclose(loss_fn(junk), total, rtol=1e-6)
    g, g_junk = jax.grad(loss_fn)(pred), jax.grad(loss_fn)(junk)
    for n in pred:
        np.testing.assert_allclose(g[n], g_junk[n], rtol=1e-6, atol=1e-8)
        assert np.all(np.isfinite(g[n]))
    assert np.all(np.asarray(g["video"])[0, :2] == 0) and np.all(np.asarray(g["audio"])[0] == 0)
    assert np.all(np.asarray(g["video"])[1, 4:] == 0)
    assert np.any(np.asarray(g["video"])[0, 2:] != 0)


def test_loss_sample_weights_and_fully_known_batch():
    key = jax.random.PRNGKey(7)
    kp, kt = jax.random.split(key)
    pred, target = _streams(kp, b=2), _streams(kt, b=2)
    none_known = {n: jnp.zeros(pred[n].shape[:2], bool) for n in pred}
    total, _ = flow.flow_loss(pred, target, None)
    np.testing.assert_allclose(total, flow.flow_loss(pred, target, none_known)[0])
    per = [
        flow.flow_loss({n: v[b : b + 1] for n, v in pred.items()}, {n: v[b : b + 1] for n, v in target.items()}, None)[0]
        for b in range(2)
    ]
    np.testing.assert_allclose(total, np.mean(per), rtol=1e-6)
    w_total, _ = flow.flow_loss(pred, target, None, sample_weights=jnp.array([2.0, 0.0]))
    np.testing.assert_allclose(w_total, per[0], rtol=1e-6)
    # A padding sample (no valid token) neither contributes nor dilutes the mean over samples.
    pad = lambda d: {n: jnp.concatenate([v, 9.0 + v[:1]]) for n, v in d.items()}
    valid = {n: jnp.array([True, True, False])[:, None].repeat(pred[n].shape[1], 1) for n in pred}
    np.testing.assert_allclose(flow.flow_loss(pad(pred), pad(target), None, valid=valid)[0], total, rtol=1e-6)
    # Everything known: zero loss, zero finite gradient, no NaN in any metric.
    all_known = {n: jnp.ones(pred[n].shape[:2], bool) for n in pred}
    fn = jax.jit(lambda p: flow.flow_loss(p, target, all_known))
    (loss, metrics), g = fn(pred), jax.grad(lambda p: fn(p)[0])(pred)
    assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in metrics.values())
    assert all(np.all(np.asarray(v) == 0) for v in g.values())


def test_loss_token_weights():
    """``token_weights``: a per-token relative weight inside each sample's mean (train's ``flow.first_frame_weight``)."""
    target = {"video": jnp.zeros((1, 5, 3)), "audio": jnp.zeros((1, 4, 2))}
    pred = {"video": jnp.zeros((1, 5, 3)).at[:, 0].set(1.0), "audio": jnp.ones((1, 4, 2))}
    base, _ = flow.flow_loss(pred, target, None)
    np.testing.assert_allclose(base, 1 / 5 + 1, rtol=1e-6)
    w = {"video": jnp.array([8.0, 1, 1, 1, 1])}  # audio missing: all 1
    weighted, _ = flow.flow_loss(pred, target, None, token_weights=w)
    np.testing.assert_allclose(weighted, 8 / 12 + 1, rtol=1e-6)
    # a known token drops out of both the sum and the normaliser, weighted or not
    known = {"video": jnp.array([[True, False, False, False, False]])}
    np.testing.assert_allclose(flow.flow_loss(pred, target, known, token_weights=w)[0], 0 + 1, rtol=1e-6)


def test_first_frame_weight_reaches_the_train_loss():
    """``flow.first_frame_weight``: the video (grid) stream's first latent frame tokens get the weight, audio
    (sequence) none; validated by ``config_spec.flow_spec``."""
    from mmdit import config_lib, config_spec
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.train.step import first_frame_weights

    cfg = config_lib.load("demo:tiny")
    spec = DiffusionModel.from_config(cfg).spec
    assert first_frame_weights(spec, 1.0) is None
    w = first_frame_weights(spec, 4.0)
    video = spec.stream("video").geometry
    assert set(w) == {"video"} and w["video"].shape == (video.num_tokens,)
    assert (w["video"][: video.tokens_per_frame] == 4).all() and (w["video"][video.tokens_per_frame :] == 1).all()
    assert config_spec.flow_spec(config_lib.override(cfg, ["flow.first_frame_weight=4"]), spec).first_frame_weight == 4
    with pytest.raises(ValueError, match="flow.first_frame_weight"):
        config_spec.flow_spec(config_lib.override(cfg, ["flow.first_frame_weight=0"]), spec)


def test_temporal_difference_loss_prices_flicker_not_steady_error():
    """``flow.temporal_difference_loss``: an error that stays put from frame to frame costs 0, one that
    alternates costs its jumps; the first temporal position (a key frame), known and invalid tokens drop out;
    ``tokens_per_frame`` pairs same-place tokens of consecutive frames."""
    B, F, k, C = 2, 5, 2, 3  # 5 frames of 2 tokens each
    target = {"video": jnp.zeros((B, F * k, C))}
    steady = {"video": jnp.ones((B, F * k, C))}
    total, m = flow.temporal_difference_loss(steady, target, None, {"video": k})
    assert float(total) == 0.0 and float(m["loss/video_tdiff"]) == 0.0
    sign = jnp.repeat(jnp.array([1.0, 1.0, -1.0, 1.0, -1.0]), k)  # frame 0 (the key frame) agrees with frame 1
    flicker = {"video": sign[None, :, None] * jnp.ones((B, 1, C))}
    np.testing.assert_allclose(flow.temporal_difference_loss(flicker, target, None, {"video": k})[0], 4.0, rtol=1e-6)
    # a change between frame 0 and 1 only: the key frame's pair is not counted
    key_only = {"video": jnp.zeros((B, F * k, C)).at[:, :k].set(5.0)}
    assert float(flow.temporal_difference_loss(key_only, target, None, {"video": k})[0]) == 0.0
    # a jump into a known frame is not supervised: frame 3 known leaves only pair (1, 2), a jump of 2
    known = {"video": jnp.repeat(jnp.array([False, False, False, True, False]), k)[None].repeat(B, 0)}
    np.testing.assert_allclose(flow.temporal_difference_loss(flicker, target, known, {"video": k})[0], 4.0, rtol=1e-6)
    steady_then_jump = {"video": jnp.zeros((B, F * k, C)).at[:, 3 * k :].set(1.0)}  # jump into frame 3 only
    np.testing.assert_allclose(flow.temporal_difference_loss(steady_then_jump, target, None, {"video": k})[0], 1 / 3, rtol=1e-6)
    assert float(flow.temporal_difference_loss(steady_then_jump, target, known, {"video": k})[0]) == 0.0
    # flow.stream_weights scale a stream's term as they scale its flow loss
    np.testing.assert_allclose(
        flow.temporal_difference_loss(flicker, target, None, {"video": k}, stream_weights={"video": 0.5})[0], 2.0, rtol=1e-6
    )
    # a stream not in frame_tokens (audio, a sequence) adds nothing
    both = {**flicker, "audio": jnp.ones((B, 4, 2))}
    np.testing.assert_allclose(
        flow.temporal_difference_loss(both, {**target, "audio": jnp.zeros((B, 4, 2))}, None, {"video": k})[0], 4.0, rtol=1e-6
    )


@pytest.mark.slow  # two loss compiles of the tiny demo model
def test_temporal_difference_weight_reaches_the_train_loss():
    """``flow.temporal_difference_weight``: off (0) the train loss has no ``_tdiff`` term; on, the loss grows by
    the weight times the logged term; a negative weight is refused naming the field; the demo's default has it on."""
    from mmdit import config_lib, config_spec
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.train import step as train_step

    cfg = config_lib.override(config_lib.load("demo:tiny"), ["flow.temporal_difference_weight=0"])
    model = DiffusionModel.from_config(cfg)
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    _, _, raw = model.dummy_inputs(2)
    latents = {f.name: rng.standard_normal((2, *f.shape)).astype(np.float32) for f in model.input_spec().latent_fields}
    batch = {**latents, **raw}
    off, m_off = train_step.make_loss_fn(model, cfg)(params, batch, jax.random.key(1))
    assert not any(k.endswith("_tdiff") for k in m_off)
    on_cfg = config_lib.override(cfg, ["flow.temporal_difference_weight=3"])
    on, m_on = train_step.make_loss_fn(model, on_cfg)(params, batch, jax.random.key(1))
    np.testing.assert_allclose(on, off + 3 * m_on["loss/video_tdiff"], rtol=1e-5)
    assert float(m_on["loss/video_tdiff"]) > 0
    with pytest.raises(ValueError, match="flow.temporal_difference_weight"):
        config_spec.flow_spec(config_lib.override(cfg, ["flow.temporal_difference_weight=-1"]), model.spec)
    assert config_spec.flow_spec(config_lib.load("demo:tiny"), model.spec).temporal_difference_weight == 1.0
    assert config_spec.flow_spec(config_lib.load("demo:tiny,plain"), model.spec).temporal_difference_weight == 0.0


# ------------------------------------------------------------------------------ condition dropout


def test_drop_conditions():
    b = 20000
    key = jax.random.PRNGKey(50)
    present = {"ref_audio": jnp.arange(b) % 2 == 0}
    keep = flow.drop_conditions(key, b, {"text": 0.1, "ref_audio": 0.5}, present=present)
    assert set(keep) == {"text", "ref_audio"} and keep["text"].dtype == jnp.bool_
    assert abs(float(keep["text"].mean()) - 0.9) < 0.01
    assert not np.any(np.asarray(keep["ref_audio"])[1::2])  # absent stays dropped
    assert abs(float(keep["ref_audio"][::2].mean()) - 0.5) < 0.02
    # Draws are independent across conditions.
    both = float((keep["text"][::2] & keep["ref_audio"][::2]).mean())
    assert abs(both - 0.45) < 0.02
    again = flow.drop_conditions(key, b, {"ref_audio": 0.5, "text": 0.1}, present=present)
    np.testing.assert_array_equal(again["text"], keep["text"])
    allk = flow.drop_conditions(key, b, {"text": 0.0, "audio": 0.0}, drop_all_prob=0.2)
    np.testing.assert_array_equal(allk["text"], allk["audio"])
    assert abs(float(allk["text"].mean()) - 0.8) < 0.01
    assert not np.any(np.asarray(flow.drop_conditions(key, 8, {"text": 1.0})["text"]))
