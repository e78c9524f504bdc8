"""Pretrained condition encoders wired into the pipeline: ``config.encoders`` validated by config_spec,
a text prompt encoded by a converted UMT5 at sample time (``mmdit.sample``), and ingest precomputing
UMT5 / wav2vec2 / CLIP features into the records. Uses the tiny parity fixtures
(``tests/fixtures/parity``), converted once per module."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from mmdit import config_lib, config_spec
from mmdit.convert.run import convert_dir
from mmdit.encoders.registry import ConditionEncoders

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "parity")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    out = {}
    for name, sub in (("umt5", "umt5"), ("w2v", "wav2vec2/base"), ("clip", "clip_vision")):
        out[name] = str(root / name)
        convert_dir(os.path.join(FIX, sub), out[name], log=lambda _m: None)
    return out


def _umt5_cfg(ckpt: str, length: int = 8):
    """demo:tiny with precomputed 32-d text features (the tiny UMT5's width) from encoders.text."""
    cfg = config_lib.load("configs/demo.py:tiny")
    text = dict(kind="umt5", checkpoint=ckpt, tokenizer=os.path.join(FIX, "umt5"))
    return config_lib.override(
        cfg,
        [
            "model.text_encoder=None",
            f"model.conditions.text={{'dim': 32, 'length': {length}}}",
            f"encoders.text={text!r}",
        ],
    )


def test_encoders_section_is_validated(ckpts):
    cfg = _umt5_cfg(ckpts["umt5"])
    spec = config_spec.build_run_spec(cfg)
    text = spec.encoders["text"]
    assert (text["key"], text["mask_key"], text["length"], text["dim"]) == ("text", "text_mask", 8, 32)
    assert config_spec.build_run_spec(config_lib.load("configs/demo.py:tiny")).encoders == {}
    bad = [
        ("model.text_encoder={'kind': 'byte', 'layers': 1, 'heads': 2}", "both set"),
        ("encoders.text={'kind': 'wav2vec2', 'checkpoint': 'x'}", "encoders.text.kind='wav2vec2'"),
        ("encoders.text={'kind': 'umt5'}", "encoders.text.checkpoint=None"),
        ("encoders.text={'kind': 'umt5', 'checkpoint': 'x', 'max_length': 9}", "max_length=9 != model.conditions.text.length=8"),
        (
            "encoders.image={'kind': 'clip_vision', 'checkpoint': 'x'}",
            "encoders.image.condition='image' is not a model condition",
        ),
        (
            "encoders.audio_features={'kind': 'wav2vec2', 'checkpoint': 'x', 'condition': 'text'}",
            "model.conditions.text.rate is not set",
        ),
    ]
    for override, match in bad:
        with pytest.raises(ValueError, match=match):
            config_spec.build_run_spec(config_lib.override(_umt5_cfg(ckpts["umt5"]), [override]))


@pytest.mark.slow
def test_sample_from_text_prompt_through_converted_umt5(ckpts, tmp_path, monkeypatch):
    """mmdit.sample: a --text prompt -> tiny converted UMT5 -> the DiT's text cross-attention -> MP4."""
    import librosa.feature.inverse

    from mmdit.model.diffusion import DiffusionModel
    from mmdit.sample import inputs
    from mmdit.sample.run import sample_to_files
    from mmdit.sample.sampler import Sampler
    from mmdit.tasks import roles

    def fast_mel_to_stft(M, *, sr, n_fft, power=2.0, **kw):  # Griffin-Lim's NNLS is minutes on random latents
        basis = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=M.shape[-2], **kw)
        return np.maximum(np.einsum("fm,...mt->...ft", np.linalg.pinv(basis), M), 0.0) ** (1.0 / power)

    monkeypatch.setattr(librosa.feature.inverse, "mel_to_stft", fast_mel_to_stft)
    cfg = _umt5_cfg(ckpts["umt5"])
    model = DiffusionModel.from_config(cfg)
    assert model.text_encoder is None and model.input_spec().by_role("features")[0].name == "text"
    params = jax.jit(model.init)(jax.random.key(0))

    # the raw conditions are the UMT5 features of the prompt (zero past its 4 tokens + EOS)
    sampler = Sampler(model, cfg)
    enc = inputs.condition_encoders(cfg, model.spec)
    media_io = inputs.MediaEncoder.from_config(cfg, model.spec, roles(model.spec, cfg.model))
    plan = inputs.prepare_task_inputs(
        sampler,
        "t2av",
        1,
        0,
        media_io,
        roles(model.spec, cfg.model),
        inputs.EvalRecords(None),
        text="a woman speaks",
        encoders=enc,
    )
    want, mask = enc.get("text").encode(["a woman speaks"])
    np.testing.assert_array_equal(plan.raw["text"], np.asarray(want))
    np.testing.assert_array_equal(plan.raw["text_mask"], np.asarray(mask))
    assert plan.raw["text_mask"][0].tolist() == [True] * 7 + [False] and np.abs(plan.raw["text"][0, :7]).min() > 0

    paths = sample_to_files(
        cfg, params, str(tmp_path / "out"), tasks=["t2av"], num=1, steps=1, text="a woman speaks", progress=False
    )
    assert [os.path.basename(p) for p in paths] == ["t2av_0.mp4"] and os.path.getsize(paths[0]) > 0
    with open(tmp_path / "out" / "samples.json") as f:
        assert json.load(f)["samples"][0]["text"] == "a woman speaks"

    # without encoders.text, a features model cannot take --text: the error names the setting
    cfg_none = config_lib.override(cfg.copy_and_resolve_references(), ["encoders.text=None"])
    with pytest.raises(ValueError, match="encoders.text=dict"):
        inputs.prepare_task_inputs(
            Sampler(model, cfg_none), "t2av", 1, 0, media_io, roles(model.spec, cfg.model), inputs.EvalRecords(None), text="hi"
        )


def test_ingest_precomputes_encoder_features(ckpts, tmp_path):
    """ingest_mp4_dir(encoders=...) adds UMT5 text features (+ mask), wav2vec2 features at the
    condition's rate and length, and CLIP features of the first frame; the transcript moves to
    ``transcript``."""
    from mmdit.data import ingest, media
    from mmdit.data.records import open_dataset
    from test_ingest import FakeAudioCodec, FakeVideoCodec

    d = tmp_path / "clips"
    d.mkdir()
    rng = np.random.default_rng(0)
    t = np.arange(int(22050 * 1.2)) / 22050
    media.write_mp4(
        str(d / "a.mp4"),
        rng.integers(0, 256, (30, 32, 48, 3)).astype(np.uint8),
        25,
        (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32),
        22050,
    )
    (d / "a.txt").write_text("a woman speaks", encoding="utf-8")
    specs = {
        "text": dict(kind="umt5", checkpoint=ckpts["umt5"], condition="text", key="text", mask_key="text_mask", length=8, dim=32),
        "audio_features": dict(
            kind="wav2vec2",
            checkpoint=ckpts["w2v"],
            condition="af",
            key="af",
            mask_key="af_mask",
            length=12,
            rate=10.0,
            dim=32,
            layer=1,
        ),
        "image": dict(
            kind="clip_vision", checkpoint=ckpts["clip"], condition="image", key="image", mask_key="image_mask", length=17, dim=32
        ),
    }
    enc = ConditionEncoders(specs)
    manifest = ingest.ingest_mp4_dir(
        str(d), str(tmp_path / "rec"), FakeVideoCodec(), FakeAudioCodec(), encoders=enc, latent_dtype=np.float32
    )
    assert manifest["num_examples"] == 1
    ex = open_dataset(str(tmp_path / "rec"))[0]
    assert ex["transcript"] == "a woman speaks"
    want, mask = enc.get("text").encode(["a woman speaks"])
    np.testing.assert_allclose(ex["text"], np.asarray(want)[0], atol=1e-6)
    np.testing.assert_array_equal(ex["text_mask"], np.asarray(mask)[0])
    assert ex["af"].shape == (12, 32) and ex["af_mask"].shape == (12,) and ex["af_mask"][:5].all()
    assert ex["image"].shape == (17, 32)
    with pytest.raises(ValueError, match="makes 32-d features but the model reads 64-d"):
        ConditionEncoders({"text": dict(specs["text"], dim=64)}).get("text")
