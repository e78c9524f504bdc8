"""Honest eval figures where the answer is known: chance-to-ceiling fractions, the change correlation,
the Fréchet distance, background flicker, identity vs a given frame, the contact sheet, and the new
fields of ``eval.json`` end to end."""

import json

import numpy as np
import pytest

from mmdit.data.synthetic import SyntheticWorld, WorldConfig
from mmdit.eval import contact_sheet
from mmdit.eval.chance import sync_levels, with_ceiling
from mmdit.eval.image_quality import (
    background_flicker,
    background_flicker_pairs,
    frame_features,
    frechet_distance,
    identity_vs_reference,
    split_fd,
)
from mmdit.eval.sync_metrics import block_shuffle, change_correlation, fraction_of_way, pair_metrics

N = 120  # frames per synthetic track


def envelope(n=N, silent=20, ramp=6):
    """Silent at both ends, loud in the middle, with short ramps: the shape every clip shares."""
    e = np.zeros(n)
    e[silent:-silent] = 1.0
    r = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, ramp))
    e[silent : silent + ramp], e[n - silent - ramp : n - silent] = r, r[::-1]
    return e


def syllables(rng, n=N, silent=20, ramp=6):
    """A syllable-rate signal (white noise smoothed over 3 frames) under the shared envelope."""
    s = np.convolve(rng.standard_normal(n + 2), np.ones(3) / 3, mode="valid")
    return envelope(n, silent, ramp) * (1.0 + s)


def synced_set(rng, k=8, noise=0.15):
    """``k`` clips whose mouth and audio follow the same syllables, each with its own noise."""
    s = [syllables(rng) for _ in range(k)]
    return [x + noise * rng.standard_normal(N) for x in s], [x + noise * rng.standard_normal(N) for x in s]


def test_fraction_is_one_when_synced_and_zero_when_mismatched():
    rng = np.random.default_rng(0)
    truth = sync_levels(*synced_set(rng), max_offset=8)
    synced = with_ceiling(sync_levels(*synced_set(rng), max_offset=8), truth)
    # Mismatched: every mouth from one set of clips, every sound from an unrelated one.
    mouths, _ = synced_set(rng)
    _, sounds = synced_set(rng)
    unrelated = with_ceiling(sync_levels(mouths, sounds, max_offset=8), truth)
    for k in ("sync_corr_at_0", "change_corr"):
        assert truth[k]["score"] > 0.5, truth[k]
        assert abs(synced[k]["fraction"] - 1.0) < 0.15, (k, synced[k])
        assert abs(unrelated[k]["fraction"]) < 0.15, (k, unrelated[k])
        # chance levels of the synced set: mismatched and block-shuffled pairs are both near 0 for the
        # strict metrics, far below the matched score
        assert abs(synced[k]["chance_mismatched"]) < 0.15 and abs(synced[k]["chance_shuffled"]) < 0.2, synced[k]
    # the lenient best-over-lags figure has a chance level far above 0
    assert synced["sync_corr"]["chance_mismatched"] > 0.15


def test_change_correlation_removes_a_shared_envelope():
    rng = np.random.default_rng(1)
    best, change = [], []
    for _ in range(20):
        # unrelated syllables, the same silent-at-both-ends shape, on the demo's 49 frames
        a, b = syllables(rng, 49, 8, 8), syllables(rng, 49, 8, 8)
        best.append(pair_metrics(a, b, max_offset=8)["sync_corr"])
        change.append(change_correlation(a, b))
    assert np.mean(best) > 0.35, best  # the lenient metric calls unrelated clips synced
    assert abs(np.mean(change)) < 0.12, change
    a = syllables(rng)
    assert change_correlation(a, a + 0.1 * rng.standard_normal(N)) > 0.8


def test_fraction_of_way_and_block_shuffle():
    assert fraction_of_way(0.5, 0.0, 1.0) == 0.5
    assert fraction_of_way(0.2, 0.2, 0.8) == 0.0
    assert fraction_of_way(0.5, 0.6, 0.6) is None and fraction_of_way(0.5, None, 1.0) is None
    x = np.arange(10)
    y = block_shuffle(x, 4, np.random.default_rng(0))
    assert sorted(y.tolist()) == x.tolist()
    pieces = {tuple(y[i : i + 4]) for i in range(len(y) - 3)}
    assert (0, 1, 2, 3) in pieces and (4, 5, 6, 7) in pieces  # blocks stay whole
    with pytest.raises(ValueError, match="block"):
        block_shuffle(x, 0, np.random.default_rng(0))


@pytest.fixture(scope="module")
def clips():
    world = SyntheticWorld(WorldConfig(video_size=32, min_seconds=1.0, max_seconds=1.0, num_identities=4))
    return [world.clip(i) for i in range(4)]


def test_frechet_distance_zero_for_identical_and_growing_with_noise(clips):
    frames = np.concatenate([c.video for c in clips]).astype(np.float32) / 255.0
    feats = frame_features(frames * 2 - 1)
    assert feats.shape == (len(frames), 80)
    assert frechet_distance(feats, feats) < 1e-6
    rng = np.random.default_rng(0)
    fds = []
    for sigma in (0.02, 0.05, 0.1):
        noisy = np.clip(frames + sigma * rng.standard_normal(frames.shape), 0, 1)
        fds.append(frechet_distance(feats, frame_features(noisy * 2 - 1)))
    assert 0 < fds[0] < fds[1] < fds[2], fds
    split = split_fd([c.video for c in clips], [c.video for c in clips])
    assert split["fd"] == pytest.approx(split["fd_floor"]) and split["fd_floor"] > 0
    assert split["fd_texture"] == pytest.approx(split["fd_texture_floor"]) and split["fd_texture"] < split["fd"]
    assert set(split_fd(clips[:1], clips[:1]).values()) == {None}


def test_background_flicker(clips):
    video = clips[0].video
    static = np.repeat(video[:1], len(video), axis=0)
    assert background_flicker(static) == 0.0
    # a talking face on a still background: the mouth and sway are masked out, so ~0
    truth = background_flicker(video)
    assert truth < 1e-4, truth
    rng = np.random.default_rng(0)
    noisy = np.clip(video.astype(np.float32) + rng.normal(0, 8, video.shape), 0, 255).astype(np.uint8)
    assert background_flicker(noisy) > 100 * max(truth, 1e-7)


def test_flicker_pairs_tell_a_glitched_frame_from_a_shimmer(clips):
    from mmdit.eval.chance import sync_levels
    from mmdit.eval.figures import ClipSet, task_figures

    video = np.repeat(clips[0].video[:1], len(clips[0].video), axis=0)  # a still clip
    glitch = video.copy()
    glitch[4] = np.clip(glitch[4].astype(np.int16) + 40, 0, 255).astype(np.uint8)  # one frame off by 40 levels
    pairs = background_flicker_pairs(glitch)
    assert pairs.shape == (len(video) - 1,) and np.count_nonzero(pairs) == 2  # into and out of the glitched frame
    assert background_flicker(glitch) == pytest.approx(pairs.mean())
    rng = np.random.default_rng(0)
    shimmer = np.clip(video.astype(np.int16) + rng.integers(-1, 2, video.shape), 0, 255).astype(np.uint8)
    waves = [c.audio for c in clips[:3]]
    truth = ClipSet.measure([video] * 3, waves)
    fig = task_figures(
        ClipSet.measure([glitch, video, shimmer], waves), truth, sync_levels(truth.mouths, truth.envelopes, 2), "t2av", 2
    )
    assert fig["flicker_gt"] == fig["flicker_median_gt"] == fig["flicker_worst_pair_gt"] == 0.0
    # the glitched clip dominates the mean and the worst pair; the median is the typical (shimmering) clip
    assert fig["flicker_worst_pair"] == pytest.approx(pairs.max())
    assert fig["flicker_median"] == pytest.approx(background_flicker(shimmer))
    assert fig["flicker"] > 3 * fig["flicker_median"]
    assert fig["flicker_glitch_clips"] == pytest.approx(1 / 3) and fig["flicker_glitch_clips_gt"] == 0.0
    from mmdit.eval.run import format_table

    table = format_table({"t2av": {**fig, "num": 3, "sync_corr_mean": 0.5, "sync_offset_median": 0.0}})
    assert "t2av: a glitched frame (background change > 0.001 between two frames) in 1 of 3 clips (ground truth 0)" in table


def test_identity_vs_given_frame(clips):
    own = identity_vs_reference(clips[0].video, clips[0].video[0])
    other = identity_vs_reference(clips[1].video, clips[0].video[0])
    assert own["identity_ref_hist_sim"] > 0.85 and own["identity_ref_thumb_cos"] > 0.85, own
    assert other["identity_ref_hist_sim"] < own["identity_ref_hist_sim"] - 0.2, (own, other)


def test_contact_sheet_written_with_expected_size(clips, tmp_path):
    from PIL import Image

    frames = [c.video for c in clips[:2]]
    sheet = contact_sheet.render(
        frames, [c.audio for c in clips[:2]], mouths=[c.mouth_open for c in clips[:2]], envelopes=None, labels=["a", "b"]
    )
    band = contact_sheet.CAPTION_H + 64 + 2 * contact_sheet.BAND_H + 4  # 32 px frames scaled x2
    assert sheet.shape == (2 * band, contact_sheet.FRAMES_SHOWN * 64, 3)
    path = contact_sheet.write_png(str(tmp_path / "sub" / "sheet.png"), sheet)
    with Image.open(path) as img:
        assert img.size == (contact_sheet.FRAMES_SHOWN * 64, 2 * band)
    np.testing.assert_array_equal(np.asarray(Image.open(path))[12 : 12 + 64, :64], np.kron(clips[0].video[0], np.ones((2, 2, 1))))


@pytest.mark.slow
def test_eval_json_has_the_honest_fields(tmp_path):
    """The eval runner on the tiny demo config (init params, 2 eval clips): eval.json holds the chance
    levels, ceiling, fractions, image figures and the contact sheets."""
    import flax.linen as nn
    import jax

    from mmdit import config_lib
    from mmdit.data.synth_records import synth
    from mmdit.eval.run import evaluate, format_table
    from mmdit.model.diffusion import DiffusionModel

    cfg = config_lib.load("configs/demo.py:tiny")
    synth(cfg, str(tmp_path / "data"), num=2, num_eval=2, progress=False)
    params = nn.unbox(DiffusionModel.from_config(cfg).init(jax.random.key(0)))

    class Writer:  # the MetricWriter methods the runner and the training sample hook call
        def __init__(self):
            self.images, self.audio_tags = [], []

        def video(self, step, tag, frames, fps):
            self.images.append((tag, frames.shape))

        def audio(self, step, tag, wave, sample_rate):
            self.audio_tags.append(tag)

        def flush(self):
            pass

    writer = Writer()
    out = tmp_path / "eval"
    res = evaluate(cfg, params, str(tmp_path / "data" / "eval"), str(out), num=2, write_videos=False, writer=writer)
    summary = json.loads((out / "eval.json").read_text())["summary"]
    assert set(summary) == {"ground_truth", "t2av", "ti2av", "tv2a", "a2v"}
    for task, r in summary.items():
        for metric in ("sync_corr", "sync_corr_at_0", "change_corr"):
            cell = r["sync"][metric]
            assert set(cell) == {"score", "chance_mismatched", "chance_shuffled", "ceiling", "fraction"}, cell
            assert cell["ceiling"] == summary["ground_truth"]["sync"][metric]["score"]
        assert "fraction_at_0" in r and "fraction_change" in r
        assert r["fd"] is not None and r["fd_floor"] is not None and r["flicker"] >= 0 and r["flicker_gt"] >= 0
        assert (out / f"contact_{task}.png").exists()
    assert summary["ground_truth"]["fraction_at_0"] == pytest.approx(1.0)
    assert summary["ti2av"]["identity_ref_hist_sim_gt"] > 0.8
    assert sorted(tag for tag, _ in writer.images) == sorted(f"contact/{t}" for t in summary)
    table = format_table(res)
    assert "frac@0" in table and "identity vs the given first frame" in table

    # the training-time sample hook logs a contact sheet (sample above ground truth) per sampled task
    from mmdit.eval.train_samples import make_sample_hook

    writer = Writer()
    hook = make_sample_hook(cfg, DiffusionModel.from_config(cfg), str(tmp_path / "data" / "eval"))
    hook(3, type("State", (), {"ema": params}), writer)
    shapes = dict(writer.images)
    for task in cfg.sample.tasks[:2]:
        assert f"samples/{task}" in shapes and shapes[f"contact/{task}"][0] == 1, shapes
