"""Every seed preset end to end from the command line (issue 14): for each ``configs/<preset>.py:tiny``
``mmdit data ingest`` of talking-video MP4s the test writes (and WAV + transcript files for an
audio-only stage) -> ``mmdit train`` through its stages (interrupted, then resumed by the same
command) -> ``mmdit sample`` of every task it lists -> ``mmdit eval`` -> ``mmdit export``, all through
the CLIs' ``main([...])``; the training sample hook on a video-only preset; plus the staged-training
mechanics (mmdit/train/stages.py) on a fake loop and the missing-input errors that name the flag."""

import json
import os

import numpy as np
import pytest

from mmdit import config_lib
from media_fixtures import world_of, write_audio_only, write_talking_mp4

PRESETS = ("unitalking", "jamflow", "mirage", "talkingmachines")
MISSING_INPUT_FLAGS = {  # preset -> (task, the flag its error must name) when sampled with nothing given
    "unitalking": (("tr2av", "--ref-audio"), ("ti2av", "--image"), ("tv2a", "--video")),
    "jamflow": (("a2v", "--audio"), ("tv2a", "--video")),
    "mirage": (("a2v_features", "--audio"),),
    "talkingmachines": (("ti2av", "--audio"),),
}


def _metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _main(module: str, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(f"mmdit.cli.{module}").main(argv)


WINDOWS_PER_SOURCE = 2  # UniTalking's reference audio is the neighbouring window of the same source


def _ingest_media(config: str, cfg, data_dir: str, media_dir, splits=("train", "eval"), num_sources: int = 2) -> None:
    """The preset's records from media files through ``mmdit data ingest``: ``num_sources`` talking MP4s of
    its synthetic world per split in ``splits`` -> ``data_dir/<split>`` (``eval``: what ``mmdit sample``,
    ``mmdit eval`` and the training sample hook condition on), each ``WINDOWS_PER_SOURCE`` clips long
    (plus a remainder ingest drops); and for ``train``, every audio-only stage split (UniTalking's
    ``tts`` stage reads ``train_audio``) from WAV + transcript files."""
    from mmdit.data.synth_records import audio_only_splits

    world = world_of(cfg, (WINDOWS_PER_SOURCE + 0.5) * float(cfg.clip.seconds))
    jobs = {}  # split -> (kind, world clip indices): disjoint indices, so eval clips are unseen in training
    for k, split in enumerate(splits):
        jobs[split] = ("mp4", range(1000 * k, 1000 * k + num_sources))
    if "train" in splits:
        for k, split in enumerate(audio_only_splits(cfg)):
            jobs[split] = ("wav", range(10_000 * (k + 1), 10_000 * (k + 1) + num_sources))
    for split, (kind, indices) in jobs.items():
        d = media_dir / split
        for i in indices:
            if kind == "mp4":  # both sidecar caption kinds
                write_talking_mp4(d, f"talk{i}", world.clip(i), caption="json" if i % 2 else "txt")
            else:
                write_audio_only(d, f"voice{i}", world.clip(i))
        out = os.path.join(data_dir, split)
        assert _main("data", ["ingest", "--config", config, "--in", str(d), "--out", out, "--no-progress"]) == 0
        m = json.load(open(os.path.join(out, "manifest.json")))
        assert m["producer"] == "mmdit data ingest" and m["skipped"] == {}, m["skipped_sources"]
        assert m["num_examples"] == WINDOWS_PER_SOURCE * num_sources
        assert m["metadata"]["counts"]["audio_only"] == (m["num_examples"] if kind == "wav" else 0)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_tiny_end_to_end(preset, tmp_path, capsys):
    from mmdit.data import records
    from mmdit.train import stages as stages_lib

    config = f"configs/{preset}.py:tiny"
    cfg = config_lib.load(config)
    wd = str(tmp_path / preset)
    _ingest_media(config, cfg, os.path.join(wd, "data"), tmp_path / "media")
    train = records.open_dataset(os.path.join(wd, "data", "train"))
    from mmdit.model.diffusion import DiffusionModel

    assert set(DiffusionModel.from_config(cfg).input_spec().record_keys()) <= set(train[0])  # exactly the schema's fields

    # An interrupted run (one step), then the same command resumes it to the end.
    stage_list = stages_lib.parse_stages(cfg)
    if stage_list:
        from mmdit.train.loop import train as loop_train

        stages_lib.run_stages(cfg, wd, stop_after=1, progress=False)
        first = stages_lib.stage_dir(wd, stage_list[0].name)
        assert stages_lib.latest_step(first) == 1 and not os.path.exists(os.path.join(first, stages_lib.DONE_MARKER))
        del loop_train
    else:
        assert _main("train", ["--config", config, "--workdir", wd, "--no-progress", "--set", "train.steps=1"]) == 0
    capsys.readouterr()
    assert _main("train", ["--config", config, "--workdir", wd, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "resuming from step 1" in out
    if stage_list:
        for k, stage in enumerate(stage_list):
            d = stages_lib.stage_dir(wd, stage.name)
            steps = int(stages_lib.stage_config(cfg, stage, None).train.steps)
            assert stages_lib.latest_step(d) == steps and stages_lib.is_finished(d, steps)
            if k:  # every later stage starts from the previous one's params
                assert f"init_from {stages_lib.stage_dir(wd, stage_list[k - 1].name)} (workdir" in out
        assert stages_lib.resolve_workdir(wd) == stages_lib.stage_dir(wd, stage_list[-1].name)
        capsys.readouterr()
        assert _main("train", ["--config", config, "--workdir", wd, "--no-progress"]) == 0  # all done: skipped
        assert out.count("skipped") == 0 and capsys.readouterr().out.count("skipped") == len(stage_list)
    else:
        assert [m["step"] for m in _metrics(wd)][-1] == int(cfg.train.steps)

    if preset == "unitalking":  # TTS pretraining: audio-only records, video loss off, video branch frozen
        audio_only = records.open_dataset(os.path.join(wd, "data", "train_audio"))
        assert int(audio_only[0]["has_video"]) == 0 and audio_only[0]["source"].endswith(".wav")
        assert not np.any(audio_only[0]["video_latents"]) and np.any(audio_only[0]["audio_latents"])
        tts = _metrics(stages_lib.stage_dir(wd, "tts"))
        assert all(m["loss/video"] == 0.0 and np.isfinite(m["loss/audio"]) for m in tts)

    capsys.readouterr()
    assert _main("sample", ["--workdir", wd, "--no-progress"]) == 0
    mp4s = capsys.readouterr().out.split()
    tasks = list(cfg.sample.tasks)
    assert [os.path.basename(p) for p in mp4s] == [f"{t}_0.mp4" for t in tasks]
    assert all(os.path.getsize(p) > 0 for p in mp4s)
    assert json.load(open(os.path.join(wd, "samples", "samples.json")))["samples"][0]["task"] == tasks[0]

    assert _main("eval", ["--workdir", wd]) == 0
    summary = json.load(open(os.path.join(wd, "eval", "eval.json")))["summary"]
    assert set(tasks) <= set(summary)

    bundle = os.path.join(str(tmp_path), f"{preset}_bundle")
    assert _main("export", ["--workdir", wd, "--out", bundle, "--platforms", "cpu"]) == 0
    assert os.path.isfile(os.path.join(bundle, "bundle.json"))

    # A bundle has no eval records to fall back on: a task's missing input is an error naming its flag.
    capsys.readouterr()
    for task, flag in MISSING_INPUT_FLAGS[preset]:
        argv = ["--bundle", bundle, "--task", task, "--out", str(tmp_path / "x"), "--no-progress"]
        assert _main("sample", argv + (["--text", "hello"] if preset != "mirage" else [])) == 2
        err = capsys.readouterr().err
        assert flag in err, (task, err)


class _Writer:  # the MetricWriter methods the training sample hook calls
    def __init__(self):
        self.videos, self.waves = {}, {}

    def video(self, step, tag, frames, fps):
        self.videos[tag] = (step, np.asarray(frames), fps)

    def audio(self, step, tag, wave, sample_rate):
        self.waves[tag] = (step, np.asarray(wave), sample_rate)

    def flush(self):
        pass


@pytest.mark.slow
def test_training_sample_hook_samples_a_video_only_preset(tmp_path):
    """TalkingMachines has no audio stream (video + audio-feature conditions): the training sample hook
    still samples it, with its driving audio decoded from the log-mel features as the sound, as
    ``mmdit sample`` writes its MP4s."""
    import flax.linen as nn
    import jax

    from mmdit import config_spec
    from mmdit.eval.train_samples import sample_hook_for_workdir
    from mmdit.model.diffusion import DiffusionModel

    config = "configs/talkingmachines.py:tiny"
    cfg = config_lib.load(config)
    cfg.train.sample_every = 1
    assert config_spec.has_codecs(cfg)  # codecs.video is all a video-only model needs to be decoded
    wd = tmp_path / "run"
    assert sample_hook_for_workdir(cfg, str(wd)) is None  # no eval records to condition on yet
    _ingest_media(config, cfg, str(wd / "data"), tmp_path / "media", splits=("eval",), num_sources=1)
    hook = sample_hook_for_workdir(cfg, str(wd))
    assert hook is not None
    params = nn.unbox(DiffusionModel.from_config(cfg).init(jax.random.key(0)))
    writer = _Writer()
    hook(3, type("State", (), {"ema": params}), writer)

    frames_per_clip, side = round(float(cfg.clip.seconds) * 25), int(cfg.world.video_size)
    assert set(writer.videos) == {"samples/ti2av", "contact/ti2av"} and set(writer.waves) == {"samples/ti2av_audio"}
    step, frames, fps = writer.videos["samples/ti2av"]
    assert step == 3 and fps == 25.0 and frames.shape == (frames_per_clip, side, side, 3) and frames.dtype == np.uint8
    _, wave, rate = writer.waves["samples/ti2av_audio"]
    assert rate == 16000 and abs(len(wave) / rate - frames_per_clip / fps) < 0.05 and np.std(wave) > 1e-4
    assert writer.videos["contact/ti2av"][1].shape[0] == 1  # one sheet image
    from mmdit.codecs.registry import make_audio_codec
    from mmdit.data.records import open_dataset

    driving = open_dataset(str(wd / "data" / "eval"))[0]["audio_features"]  # the hook samples the first eval clip
    np.testing.assert_allclose(wave, make_audio_codec(cfg.codecs.audio_features).decode(driving[None])[0], atol=1e-6)

    cfg.codecs = dict(audio_features=cfg.codecs.audio_features)  # no codecs.video: nothing to decode samples with
    assert not config_spec.has_codecs(cfg) and sample_hook_for_workdir(cfg, str(wd)) is None
    twin = config_lib.load("configs/unitalking.py:tiny")  # an audio stream needs codecs.audio
    assert config_spec.has_codecs(twin)
    twin.codecs = dict(video=twin.codecs.video)
    assert not config_spec.has_codecs(twin)


def test_stage_sequencing_and_resume_with_a_fake_loop(tmp_path):
    """The stage runner alone: overrides, init_from chaining, data splits, markers, skip and resume."""
    from mmdit.train import stages as stages_lib

    cfg = config_lib.load("configs/demo.py:tiny")
    cfg.train.stages = (
        dict(name="a", steps=3, tasks=dict(tts=1.0), data="train_audio", lr=0.5, trainable=("dit/params/blocks/audio/*",)),
        dict(name="b", steps=2),
    )
    calls = []

    def fake_train(scfg, d, *, data_dir, stop_after, sample_hook, log, **kw):
        ckpt = os.path.join(d, "checkpoints")
        os.makedirs(ckpt, exist_ok=True)
        start = stages_lib.latest_step(d) or 0
        end = int(scfg.train.steps) if stop_after is None else min(int(scfg.train.steps), start + stop_after)
        for s in range(start + 1, end + 1):
            os.makedirs(os.path.join(ckpt, str(s)))
        calls.append((os.path.basename(d), start, end, dict(scfg.tasks), scfg.train.init_from, data_dir, float(scfg.train.lr)))
        return {"loss": 1.0}

    wd = str(tmp_path / "run")
    stages_lib.run_stages(cfg, wd, stop_after=2, train_fn=fake_train, log=lambda m: None)
    assert calls == [("stage_a", 0, 2, {"tts": 1.0}, None, os.path.join(wd, "data", "train_audio"), 0.5)]
    stages_lib.run_stages(cfg, wd, train_fn=fake_train, log=lambda m: None)
    assert [c[:3] for c in calls[1:]] == [("stage_a", 2, 3), ("stage_b", 0, 2)]
    assert calls[2][3] == dict(cfg.tasks) and calls[2][4] == os.path.join(wd, "stage_a")
    assert calls[2][5] == os.path.join(wd, "data", "train") and calls[2][6] == float(cfg.train.lr)
    stages_lib.run_stages(cfg, wd, train_fn=fake_train, log=lambda m: None)
    assert len(calls) == 3  # both stages finished: nothing runs
    assert stages_lib.resolve_workdir(wd) == os.path.join(wd, "stage_b")

    cfg.train.stages = (dict(name="a", steps=3), dict(name="c", steps=1))
    with pytest.raises(ValueError, match=r"stages \['a', 'b'\].*train.stages"):
        stages_lib.run_stages(cfg, wd, train_fn=fake_train, log=lambda m: None)


@pytest.mark.parametrize(
    "stages, match",
    [
        ((dict(steps=3),), r"train.stages\[0\].name"),
        ((dict(name="a"), dict(name="a")), "unique"),
        ((dict(name="a", stepz=3),), r"unknown key\(s\) \['stepz'\]"),
        ((dict(name="a", tasks=dict()),), r"train.stages\[0\].tasks"),
        ((dict(name="a", tasks=dict(nope=1.0)),), r"train.stages \(a\)"),
        ((dict(name="a", trainable=("no/such/*",)),), r"train.stages \(a\).*train.trainable"),
    ],
)
def test_bad_stage_lists_name_the_field(stages, match):
    from mmdit.train import stages as stages_lib

    cfg = config_lib.load("configs/demo.py:tiny")
    cfg.train.stages = stages
    with pytest.raises(ValueError, match=match):
        for s in stages_lib.parse_stages(cfg):
            stages_lib.stage_config(cfg, s, None)
