"""Causal-chunk training (issue 12, item 1): the chunk geometry of ``model.chunk_frames``
(mmdit/model/chunks.py), its config errors, the per-chunk noise schedules of ``flow.chunk_noise``
(mmdit/flow.py ``chunk_token_sigmas``) and their wiring into the training loss (mmdit/train/step.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdit import config_lib, config_spec, flow
from mmdit.model import chunks
from mmdit.model.diffusion import DiffusionModel
from mmdit.model.spec import build_spec
from mmdit.train import sharding
from mmdit.train import step as step_lib
from mmdit.train.state import init_state, make_optimizer
from conftest import tiny_model_cfg

FRAMES, CHUNK = 16, 4  # the chunked twin: 16 frames of video + 16 audio tokens, 4 chunks of 4 frames
N = FRAMES // CHUNK
TWIN_MASK = "chunk_causal & local(1) & no_peek"
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}  # compile-bound tests


def twin_cfg(*sets):
    """``configs/demo.py:tiny`` cut into causal chunks: 16 frames (17 is prime), chunks of 4 frames."""
    base = [
        f"model.chunk_frames={float(CHUNK)}",
        f"model.mask={TWIN_MASK!r}",
        f"model.streams.video.shape=({FRAMES}, 4, 4)",
        f"model.streams.audio.shape=({FRAMES},)",
    ]
    return config_lib.override(config_lib.load("configs/demo.py:tiny,plain"), base + list(sets))


def twin_spec():
    return build_spec(twin_cfg().model)


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


# ------------------------------------------------------------------------------------------------
# chunk geometry and config errors


def test_twin_chunks_cut_both_streams_at_the_same_frames():
    spec = twin_spec()
    assert chunks.num_chunks(spec) == N
    assert chunks.chunk_tokens(spec) == {"video": CHUNK, "audio": CHUNK}  # one video token per frame (patch 1x4x4)
    ids = chunks.token_chunks(spec)
    for name in ("video", "audio"):
        assert ids[name].dtype == np.int32
        np.testing.assert_array_equal(ids[name], np.repeat(np.arange(N), CHUNK))
        # the model's definition: floor(aligned time / chunk_frames)
        np.testing.assert_array_equal(ids[name], np.floor(spec.times[name] / CHUNK + 1e-4).astype(np.int32))


def test_chunks_of_streams_at_different_rates_and_patches():
    # video: 3 latent frames of 2x2 tokens at 6.25 Hz (the reference); audio: 12 tokens at 25 Hz (4 per frame)
    spec = build_spec(tiny_model_cfg(chunk_frames=1.0))
    assert chunks.num_chunks(spec) == 3
    assert chunks.chunk_token_frames(spec) == {"video": 1, "audio": 4}
    assert chunks.chunk_tokens(spec) == {"video": 4, "audio": 4}
    ids = chunks.token_chunks(spec)
    np.testing.assert_array_equal(ids["video"], np.repeat(np.arange(3), 4))  # frame-major: 4 tokens per frame
    np.testing.assert_array_equal(ids["audio"], np.repeat(np.arange(3), 4))
    for name in ids:
        np.testing.assert_array_equal(ids[name], np.floor(spec.times[name] / 1.0 + 1e-4).astype(np.int32))
    assert chunks.fitting_chunk_frames(spec) == [1.0, 3.0]
    unchunked = build_spec(tiny_model_cfg())
    assert chunks.num_chunks(unchunked) == 1
    assert chunks.chunk_tokens(unchunked) == {"video": 12, "audio": 12}
    assert all((v == 0).all() for v in chunks.token_chunks(unchunked).values())


@pytest.mark.parametrize(
    "sets, words",
    [
        # 3 frames do not divide the 16-frame clip
        (["model.chunk_frames=3.0"], ["model.chunk_frames=3", "model.streams.", ".shape=(16", ".patch=", ".rate=", "4, 8"]),
        # half a frame is half an audio token (25 Hz, patch 1)
        (["model.chunk_frames=0.5"], ["model.chunk_frames=0.5", "0.5 tokens", ".rate=25", "1, 2, 4"]),
        # a 2-step audio patch spans 2 frames: a 1-frame chunk holds half a token
        (
            ["model.chunk_frames=1.0", "model.streams.audio.patch=(2,)"],
            ["model.chunk_frames=1", "'audio'", "model.streams.audio.patch=(2,)", "model.streams.audio.rate=25", "2, 4, 8, 16"],
        ),
        # audio covers more time than video: no chunk length fits
        (["model.streams.audio.shape=(20,)"], ["model.chunk_frames=4", "different", "model.streams.audio.shape=(20,)"]),
    ],
)
def test_chunk_length_that_does_not_divide_is_a_config_error(sets, words):
    with pytest.raises(ValueError) as e:
        config_spec.build_run_spec(twin_cfg(*sets))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_chunk_noise_config_errors():
    tiny = lambda *sets: config_lib.override(config_lib.load("configs/demo.py:tiny,plain"), list(sets))  # noqa: E731
    with pytest.raises(ValueError, match=r"flow.chunk_noise='independent'.*model.chunk_frames"):
        config_spec.build_run_spec(tiny("flow.chunk_noise='independent'"))  # no model.chunk_frames
    with pytest.raises(ValueError, match=r"flow.chunk_noise='forcing'.*clean_context"):
        config_spec.build_run_spec(twin_cfg("flow.chunk_noise='forcing'"))
    assert config_spec.build_run_spec(tiny()).flow.chunk_noise == "shared"  # the default needs no chunks
    assert config_spec.build_run_spec(twin_cfg("flow.chunk_noise='clean_context'")).flow.chunk_noise == "clean_context"


# ------------------------------------------------------------------------------------------------
# σ / known / valid per mode (flow.chunk_token_sigmas on the twin's chunk ids)


B = 64


def _task_known():
    """Video: the first frame known in the first half of the samples (ti2av); audio: all known in the
    last quarter (a2v)."""
    video = jnp.zeros((B, FRAMES), bool).at[: B // 2, 0].set(True)
    audio = jnp.zeros((B, FRAMES), bool).at[3 * B // 4 :].set(True)
    return {"video": video, "audio": audio}


def _draw(mode, independent_streams=0.0, seed=0):
    ids = chunks.token_chunks(twin_spec())
    known = _task_known()
    noise = flow.chunk_token_sigmas(
        jax.random.key(seed), known, ids, N, mode=mode, independent_streams=independent_streams, shift=3.0
    )
    out = jax.tree.map(np.asarray, noise)
    for n in known:  # task-known tokens stay known with σ = 0 in every mode
        assert out.known[n][np.asarray(known[n])].all() and (out.sigma[n][np.asarray(known[n])] == 0).all(), (mode, n)
        assert ((out.sigma[n] >= 0) & (out.sigma[n] <= 1)).all()
    return known, jax.tree.map(np.asarray, ids), out


def _unknown_values(out, n, b, chunk, ids):
    sel = (ids[n] == chunk) & ~out.known[n][b]
    return out.sigma[n][b][sel]


def test_shared_one_sigma_across_chunks_and_streams():
    known, ids, out = _draw("shared")
    for b in range(B):
        vals = np.concatenate([out.sigma[n][b][~out.known[n][b]] for n in ("video", "audio")])
        assert vals.size and (vals == vals[0]).all() and 0 < vals[0] < 1
    # exactly today's draw, and nothing changes known / valid
    ref = flow.sample_token_sigmas(jax.random.key(0), known, shift=3.0)
    for n in known:
        np.testing.assert_array_equal(out.sigma[n], np.asarray(ref[n]))
        np.testing.assert_array_equal(out.known[n], np.asarray(known[n]))
        assert out.valid[n].all()
    assert (out.target == -1).all()


def test_independent_sigma_per_chunk_shared_by_the_streams():
    _, ids, out = _draw("independent")
    for b in range(B):
        per_chunk = []
        for c in range(N):
            vals = np.concatenate([_unknown_values(out, n, b, c, ids) for n in ("video", "audio")])
            assert vals.size and (vals == vals[0]).all(), (b, c)  # one σ per chunk, both streams
            per_chunk.append(vals[0])
        assert len(set(per_chunk)) == N, (b, per_chunk)  # the chunks draw independently
    assert all(out.valid[n].all() for n in out.valid) and (out.target == -1).all()
    # with flow.independent_streams=1 each stream draws its own σ per chunk (still one per stream and chunk)
    _, _, split = _draw("independent", independent_streams=1.0)
    differ = 0
    for b in range(B // 2):  # samples with no known audio
        for c in range(N):
            v, a = _unknown_values(split, "video", b, c, ids), _unknown_values(split, "audio", b, c, ids)
            assert (v == v[0]).all() and (a == a[0]).all()
            differ += v[0] != a[0]
    assert differ == (B // 2) * N


def test_clean_context_zeros_before_the_target_nothing_counted_after():
    known, ids, out = _draw("clean_context")
    target = out.target
    assert set(target.tolist()) == set(range(N))  # uniform over the chunks (64 samples)
    for b in range(B):
        c = target[b]
        for n in ("video", "audio"):
            ch, sig, kn, va = ids[n], out.sigma[n][b], out.known[n][b], out.valid[n][b]
            before, at, after = ch < c, ch == c, ch > c
            assert (sig[before] == 0).all() and kn[before].all() and va[before].all()
            vals = sig[at & ~kn]
            if vals.size:
                assert (vals == vals[0]).all() and 0 < vals[0] < 1
            assert not va[after].any()  # excluded: never attended, never scored
            assert (sig[after & ~np.asarray(known[n][b])] == 1).all()  # and pure noise
    # the loss counts exactly the generated tokens of the target chunk
    tgt = {n: jnp.zeros((B, FRAMES, 3)) for n in known}
    off = {
        n: jnp.where(jnp.asarray(ids[n])[None, :, None] == jnp.asarray(target)[:, None, None], 0.0, 5.0) + tgt[n] for n in known
    }
    loss, _ = flow.flow_loss(off, tgt, out.known, valid=out.valid)
    assert float(loss) == 0.0
    on = {n: off[n] + 1.0 for n in known}
    loss_on, m = flow.flow_loss(on, tgt, out.known, valid=out.valid)
    assert float(loss_on) > 0
    # the samples whose target chunk has a generated token; an a2v sample's audio chunk is all known
    scored = {n: (~out.known[n] & out.valid[n]).sum(1) for n in known}
    assert (scored["video"] == CHUNK - (target == 0) * (np.arange(B) < B // 2)).all()
    assert (scored["audio"] == np.where(np.arange(B) >= 3 * B // 4, 0, CHUNK)).all()


def test_chunk_token_sigmas_cuts_condition_streams_and_checks_ids():
    ids = chunks.token_chunks(twin_spec())
    known = {"video": jnp.zeros((4, FRAMES), bool)}
    valid = {"video": jnp.ones((1, FRAMES), bool), "features": jnp.ones((1, FRAMES), bool)}
    out = flow.chunk_token_sigmas(
        jax.random.key(1), known, {**ids, "features": ids["audio"]}, N, mode="clean_context", valid=valid
    )
    assert out.valid["features"].shape == (4, FRAMES)
    np.testing.assert_array_equal(np.asarray(out.valid["features"]), np.asarray(out.valid["video"]))
    with pytest.raises(ValueError, match="no chunk indices for stream 'features'"):
        flow.chunk_token_sigmas(jax.random.key(1), known, ids, N, mode="clean_context", valid=valid)
    with pytest.raises(ValueError, match="flow.chunk_noise='nope'"):
        flow.chunk_token_sigmas(jax.random.key(1), known, ids, N, mode="nope")


# ------------------------------------------------------------------------------------------------
# through the training step


@pytest.mark.slow  # one train-step compile per mode (~25 s each on 2 idle cores)
@pytest.mark.parametrize("mode", flow.CHUNK_NOISE_MODES)
def test_train_step_of_the_chunked_twin_runs_for_each_mode(mode):
    cfg = twin_cfg(f"flow.chunk_noise={mode!r}")
    config_spec.build_run_spec(cfg)  # every section validated, as the train loop does
    model = DiffusionModel.from_config(cfg)
    tx = make_optimizer(config_spec.train_spec(cfg))
    state = jax.jit(lambda key: init_state(model, tx, key), compiler_options=FAST)(jax.random.key(0))
    step = jax.jit(step_lib.make_train_step(model, cfg, tx), compiler_options=FAST)
    batch = random_batch(model, 4)
    for _ in range(2):
        state, metrics = step(state, batch)
    assert int(state.step) == 2
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0, metrics
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0


@pytest.mark.slow  # a loss-gradient compile per mask
@pytest.mark.parametrize("mask", [TWIN_MASK, "local(1) & no_peek"])
def test_clean_context_loss_does_not_depend_on_later_chunks(mask):
    """a2v: the audio of every chunk is given, the video generated. The loss and its gradient must not
    reach any chunk after the target, not even through the given audio -- with the causal mask and
    without it (later chunks are invalid, so no mask lets them in)."""
    cfg = twin_cfg("flow.chunk_noise='clean_context'", f"model.mask={mask!r}")
    with cfg.unlocked():
        cfg.tasks = dict(a2v=1.0)
    model = DiffusionModel.from_config(cfg)
    params = jax.jit(model.init, compiler_options=FAST)(jax.random.key(0))
    B = 6
    batch = {k: jnp.asarray(v) for k, v in random_batch(model, B).items()}
    loss_fn = step_lib.make_loss_fn(model, cfg)
    rng = jax.random.key(3)
    names = ("video_latents", "audio_latents")

    @functools.partial(jax.jit, compiler_options=FAST)
    def loss_and_grads(lat):
        return jax.value_and_grad(lambda x: loss_fn(params, {**batch, **x}, rng)[0])(lat)

    lat = {k: batch[k] for k in names}
    loss, grads = loss_and_grads(lat)
    frame_chunk = np.arange(FRAMES) // CHUNK
    # per sample and frame: does the loss depend on the latents there?
    touched = {k: np.abs(np.asarray(g)).reshape(B, FRAMES, -1).max(-1) > 0 for k, g in grads.items()}
    target = np.array([frame_chunk[touched["video_latents"][b]].max() for b in range(B)])
    assert (target < N - 1).any(), target  # some sample has later chunks to perturb (fixed key)
    assert touched["audio_latents"][np.arange(B), target * CHUNK].all()  # the given audio of the target is read
    later = frame_chunk[None, :] > target[:, None]  # [B, F]
    for k in names:
        assert not (touched[k] & later).any(), k
    rs = np.random.default_rng(1)
    perturbed = {}
    for k in names:
        x = np.asarray(lat[k])
        noise = 100.0 * rs.standard_normal(x.shape).astype(x.dtype)
        mask = later.reshape((B, FRAMES) + (1,) * (x.ndim - 2))
        perturbed[k] = jnp.asarray(np.where(mask, x + noise, x))
    loss2, _ = loss_and_grads(perturbed)
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
    assert np.isfinite(float(loss))
