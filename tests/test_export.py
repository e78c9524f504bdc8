"""Serving bundles: mmdit-export writes one, the deserialised step matches the in-process step at two
batch sizes (symbolic batch), ``mmdit-sample --bundle`` writes playable H.264/AAC MP4s, and bundles
mixed from different models, corrupt or missing files are rejected with a message naming the file.

Tiny demo config, random-init params (shared with test_sampler.py when both run in one session).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampler import B, fast_jit, tiny_setup, tiny_step

from mmdit import config_lib
from mmdit.data import media
from mmdit.model.diffusion import DiffusionModel
from mmdit.cli import export as export_cli
from mmdit.cli import sample as sample_cli
from mmdit.sample import inputs
from mmdit.sample.sampler import step_example_inputs
from mmdit.serve.export import _replace_dir as replace_dir
from mmdit.serve.export import export_bundle, load_bundle

SECONDS = 17 / 25  # the tiny world: 17 frames at 25 fps, 17 audio latents at 25 Hz


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    """A bundle written through the mmdit-export CLI (the workdir restore is stubbed)."""
    cfg, _, params = tiny_setup()
    root = tmp_path_factory.mktemp("export")
    fake = types.ModuleType("mmdit.train.checkpoint")
    fake.restore_inference = lambda workdir, step=None, verify=True: (cfg, params, 3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "mmdit.train.checkpoint", fake)
        assert export_cli.main(["--workdir", str(root / "run"), "--out", str(root / "bundle")]) == 0  # step from the restore
    return str(root / "bundle")


def test_bundle_layout_and_manifest(bundle_path):
    cfg, _, params = tiny_setup()
    assert sorted(os.listdir(bundle_path)) == ["bundle.json", "config.json", "denoise_step.jaxexport", "params"]
    leftovers = [p for p in os.listdir(os.path.dirname(bundle_path)) if p.startswith(".") and not p.endswith(".lock")]
    assert leftovers == []  # no temp directories (the export's lock file stays, empty)
    with open(os.path.join(bundle_path, "bundle.json")) as f:
        man = json.load(f)
    assert man["format"] == "mmdit.bundle" and man["format_version"] == 1 and man["step"] == 3
    assert man["jax_version"] == jax.__version__ and "cpu" in man["platforms"]
    assert man["batch"] == "b" and man["inputs"]["x_tokens"]["['video']"]["shape"][0] == "b"
    assert man["params"]["format"] == "orbax.StandardCheckpointer"
    assert man["params"]["count"] == sum(np.size(a) for a in jax.tree.leaves(params))
    assert man["guidance_order"] == ["text", "joint"]  # the demo guides by text, then by the partner stream
    hashed = [k for k in man["sha256"] if k.startswith("params/")]
    assert hashed and all(os.path.isfile(os.path.join(bundle_path, k)) for k in hashed)
    with open(os.path.join(bundle_path, "config.json")) as f:
        assert f.read() == config_lib.to_json(cfg)


@pytest.mark.slow
def test_exported_step_matches_in_process_step_at_two_batch_sizes(bundle_path):
    cfg, model, params = tiny_setup()
    bundle = load_bundle(bundle_path)
    assert config_lib.to_json(bundle.config) == config_lib.to_json(cfg)
    for a, b in zip(jax.tree.leaves(bundle.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)

    example = step_example_inputs(model, B)
    keys = iter(jax.random.split(jax.random.key(11), 64))

    def rand(a):
        k = next(keys)
        if a.dtype == jnp.int32:
            return jax.random.randint(k, a.shape, 0, 200, jnp.int32)
        if a.dtype == jnp.bool_:
            return jax.random.bernoulli(k, 0.7, a.shape)
        return jax.random.uniform(k, a.shape) if a.ndim == 2 else jax.random.normal(k, a.shape)

    x, sigma, raw, keep, known, valid = jax.tree.map(rand, example)
    raw["text_tokens"] = raw["text_tokens"].at[:, 0].set(1)  # BOS: at least one valid text token
    valid = jax.tree.map(jnp.ones_like, valid)
    args = (x, sigma, raw, keep, known, valid)
    want = tiny_step()(params, *args)  # jax.jit(denoise_step_fn(model)), shared with test_sampler
    exported = fast_jit(bundle.step_fn)
    got = exported(bundle.params, *args)
    got1 = exported(bundle.params, *jax.tree.map(lambda a: a[:1], args))
    for n in want:
        assert got[n].shape == want[n].shape and got1[n].shape == (1,) + want[n].shape[1:]
        np.testing.assert_allclose(got[n], want[n], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got1[n], want[n][:1], atol=1e-5, rtol=1e-5)
        assert float(jnp.abs(want[n][0] - want[n][1]).max()) > 1e-3  # rows differ: not a broadcast


def _fast_mel_to_stft(M, *, sr, n_fft, power=2.0, **kw):
    """Pseudo-inverse mel inversion: librosa's NNLS takes minutes on the far-from-speech latents an
    untrained model samples; the rest of MelCodec.decode (Griffin-Lim) runs unchanged."""
    import librosa

    basis = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=M.shape[-2], **kw)
    return np.maximum(np.einsum("fm,...mt->...ft", np.linalg.pinv(basis), M), 0.0) ** (1.0 / power)


def _inputs(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    frames = np.clip(rng.normal(128, 40, (30, 48, 40, 3)), 0, 255).astype(np.uint8)  # 1.2 s, odd aspect
    t = np.arange(int(16000 * 1.2)) / 16000
    mp4 = str(tmp_path / "in.mp4")
    media.write_mp4(mp4, frames, 25.0, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    png = str(tmp_path / "face.png")
    Image.fromarray(frames[0]).save(png)
    return mp4, png


@pytest.mark.slow
def test_sample_cli_from_bundle_writes_h264_aac_mp4s(bundle_path, tmp_path, monkeypatch, capsys):
    import librosa.feature.inverse

    monkeypatch.setattr(librosa.feature.inverse, "mel_to_stft", _fast_mel_to_stft)
    mp4, png = _inputs(tmp_path)
    out = tmp_path / "samples"
    tasks = ["t2av", "ti2av", "tv2a", "a2v"]
    rc = sample_cli.main(
        [
            "--bundle",
            bundle_path,
            "--task",
            ",".join(tasks),
            "--text",
            "ba mia lobo",
            "--image",
            png,
            "--video",
            mp4,
            "--audio",
            mp4,
            "--num",
            "1",
            "--seed",
            "4",
            "--steps",
            "2",
            "--guidance",
            "text=video:4,audio:3",
            "--stream-shift",
            "audio=1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / f"{t}_0.mp4") for t in tasks]
    with open(out / "samples.json") as f:
        info = json.load(f)
    assert [s["task"] for s in info["samples"]] == tasks and info["seed"] == 4 and info["steps"] == 2
    assert info["guidance"] == {"text": {"video": 4.0, "audio": 3.0}} and info["stream_shift"] == {"audio": 1.0}
    assert info["samples"][1]["inputs"] == {"video": f"--image {png}"} and info["samples"][0]["text"] == "ba mia lobo"
    umask = os.umask(0)
    os.umask(umask)
    for path in printed:
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # outputs respect the umask (not mkstemp's 0600)
        p = media.probe(path)
        kinds = sorted((s["type"], s["codec"]) for s in p["streams"])
        assert kinds == [("audio", "aac"), ("video", "h264")], p
        v = next(s for s in p["streams"] if s["type"] == "video")
        a = next(s for s in p["streams"] if s["type"] == "audio")
        assert (v["width"], v["height"], v["frames"], v["fps"]) == (32, 32, 17, 25.0)
        assert a["sample_rate"] == 16000 and abs(a["duration_s"] - SECONDS) < 1024 / 16000
        assert abs(v["duration_s"] - SECONDS) < 0.05
    if shutil.which("ffprobe"):
        res = subprocess.run(
            ["ffprobe", "-v", "error", "-show_entries", "stream=codec_type,codec_name,duration", "-of", "json", printed[0]],
            capture_output=True,
            text=True,
            check=True,
        )
        streams = json.loads(res.stdout)["streams"]
        assert sorted((s["codec_type"], s["codec_name"]) for s in streams) == [("audio", "aac"), ("video", "h264")]
        assert all(abs(float(s["duration"]) - SECONDS) < 1024 / 16000 for s in streams)


def test_bundles_from_another_model_corrupt_or_incomplete_are_rejected(bundle_path, tmp_path, capsys):
    cfg, _, params = tiny_setup()
    other_cfg = config_lib.override(cfg.copy_and_resolve_references(), ["model.num_layers=3"])
    other = DiffusionModel.from_config(other_cfg)
    other_params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(other.init, jax.random.key(0)))
    with pytest.raises(ValueError, match="params do not match cfg.model"):
        export_bundle(other_cfg, params, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="notes exists and is not a serving bundle"):
        export_bundle(cfg, params, str(tmp_path / "notes"))
    other_path = export_bundle(other_cfg, other_params, str(tmp_path / "other"), step=1, platforms=["cpu"])
    # A finished export replaces an existing bundle by rename, leaving no temp directories behind.
    fresh = tmp_path / ".fresh"
    shutil.copytree(other_path, fresh)
    (fresh / "marker").write_text("new")
    replace_dir(str(fresh), other_path)
    assert (tmp_path / "other" / "marker").read_text() == "new"
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []

    def mixed(name, part):
        path = tmp_path / name
        shutil.copytree(bundle_path, path)
        target = path / part
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        (shutil.copytree if part == "params" else shutil.copy)(os.path.join(other_path, part), target)
        return str(path)

    with pytest.raises(ValueError, match=r"config\.json come from different models.*re-export"):
        load_bundle(mixed("mixed_config", "config.json"))
    with pytest.raises(ValueError, match=r"params: holds weights of a different model.*re-export"):
        load_bundle(mixed("mixed_params", "params"))

    corrupt = tmp_path / "corrupt"
    shutil.copytree(bundle_path, corrupt)
    data = (corrupt / "denoise_step.jaxexport").read_bytes()
    (corrupt / "denoise_step.jaxexport").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"denoise_step\.jaxexport: cannot be deserialised"):
        load_bundle(str(corrupt))
    (corrupt / "bundle.json").unlink()
    with pytest.raises(ValueError, match=r"bundle\.json: missing.*mmdit-export"):
        load_bundle(str(corrupt))

    # The CLI reports the same, and refuses a --set that would change the exported architecture.
    rc = sample_cli.main(["--bundle", str(tmp_path / "mixed_params"), "--task", "t2av", "--text", "x", "--out", "o"])
    assert rc == 2 and "holds weights of a different model" in capsys.readouterr().err
    rc = sample_cli.main(["--bundle", bundle_path, "--set", "model.num_layers=3", "--text", "x", "--out", "o"])
    assert rc == 2 and "changes model.*" in capsys.readouterr().err
    rc = sample_cli.main(["--bundle", bundle_path, "--task", "a2v", "--text", "x", "--out", str(tmp_path / "o")])
    assert rc == 2 and "pass --audio or --video" in capsys.readouterr().err


def test_bundle_params_corruption_is_detected_before_sampling(bundle_path, tmp_path, capsys):
    man = json.loads(open(os.path.join(bundle_path, "bundle.json")).read())
    biggest = max(
        (k for k in man["sha256"] if k.startswith("params/")), key=lambda k: os.path.getsize(os.path.join(bundle_path, k))
    )
    flipped = tmp_path / "flipped"
    shutil.copytree(bundle_path, flipped)
    data = bytearray((flipped / biggest).read_bytes())
    data[len(data) // 2] ^= 0x04  # one bit of one weight
    (flipped / biggest).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{re.escape(biggest)}: does not match its sha256.*--no-verify"):
        load_bundle(str(flipped))
    load_bundle(str(flipped), verify=False)  # the opt-out skips exactly this check

    deleted = tmp_path / "deleted"
    shutil.copytree(bundle_path, deleted)
    (deleted / biggest).unlink()
    rc = sample_cli.main(["--bundle", str(deleted), "--task", "t2av", "--text", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"{biggest}: is missing" in err, err
    assert not os.path.exists(tmp_path / "o")


def test_sample_inputs_from_files_and_eval_records(tmp_path):
    """Input gathering and --guidance parsing without sampling: eval records fill what flags omit."""
    import soundfile

    from mmdit.codecs.registry import make_audio_codec, make_video_codec
    from mmdit.data.records import ShardWriter
    from mmdit.tasks import roles

    cfg, model, _ = tiny_setup()
    assert inputs.parse_guidance(["text=video:4,audio:3"]) == {"text": {"video": 4.0, "audio": 3.0}}
    assert inputs.parse_guidance(["text=2;ref_audio=1.5"]) == {"text": 2.0, "ref_audio": 1.5}
    assert inputs.parse_guidance(["none"]) == {} and inputs.parse_guidance(None) is None
    assert inputs.parse_stream_shift(["audio=1", "video=3.5"]) == {"audio": 1.0, "video": 3.5}
    assert inputs.parse_stream_shift(None) is None
    with pytest.raises(ValueError, match="--stream-shift 'audio'"):
        inputs.parse_stream_shift(["audio"])
    with pytest.raises(ValueError, match="--guidance 'text=loud'"):
        inputs.parse_guidance(["text=loud"])

    spec, r = model.spec, roles(model.spec, cfg.model)
    io = inputs.MediaEncoder(spec, r, make_video_codec(cfg.codecs.video), make_audio_codec(cfg.codecs.audio))
    workdir = tmp_path / "run"
    video_shape = tuple(spec.stream("video").geometry.latent_shape)
    recs = [
        {
            "video_latents": np.full(video_shape, i, np.float16),
            "audio_latents": np.full((17, 128), -i, np.float16),
            "text": f"clip {i}",
        }
        for i in range(2)
    ]
    with ShardWriter(str(workdir / "data" / "eval")) as w:
        for rec in recs:
            w.write(rec)
    evals = inputs.EvalRecords.of_workdir(str(workdir))
    assert evals.path == str(workdir / "data" / "eval")
    assert inputs.gather_texts("t2av", 3, evals) == ["clip 0", "clip 1", "clip 0"]
    known, sources = inputs.gather_known_latents("tv2a", ["video"], io, r, evals, 3)
    np.testing.assert_array_equal(known["video"][:, 0, 0, 0, 0], [0, 1, 0])
    assert sources == {"video": f"eval records {evals.path}"}

    wav = str(tmp_path / "speech.wav")
    soundfile.write(wav, 0.2 * np.sin(2 * np.pi * 300 * np.arange(8000) / 16000), 16000)  # 0.5 s: padded
    notes = []
    io.note = notes.append
    known, sources = inputs.gather_known_latents("a2v", ["audio"], io, r, inputs.EvalRecords(None), 2, audio=wav)
    assert known["audio"].shape == (2, 17, 128) and sources == {"audio": f"--audio {wav}"}
    assert notes == [f"--audio {wav} is 0.50 s; padding with silence to 0.68 s"]
    np.testing.assert_array_equal(known["audio"][0], known["audio"][1])
    assert known["audio"][0, 3].max() > known["audio"][0, -1].max() + 1  # a tone, then padded silence

    with pytest.raises(ValueError, match="pass --image or --video"):
        inputs.gather_known_latents("ti2av", ["video"], io, r, inputs.EvalRecords(None), 1)
    with pytest.raises(ValueError, match="pass --text"):
        inputs.gather_texts("t2av", 1, inputs.EvalRecords(None))
