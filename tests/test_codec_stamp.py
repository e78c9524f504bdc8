"""The codecs stamp of a dataset (mmdit.data.codec_stamp): written by synth, checked by its readers."""

import json

import pytest

from mmdit import config_lib
from mmdit.data.codec_stamp import check_codecs, codec_differences, codecs_stamp


def _manifest(path, metadata):
    from mmdit.data import records

    path.mkdir(parents=True, exist_ok=True)
    head = {
        "format": records.MANIFEST_FORMAT,
        "format_version": records.MANIFEST_VERSION,
        "record_format": records.RECORD_FORMAT_VERSION,
    }
    (path / "manifest.json").write_text(json.dumps({**head, "metadata": metadata}))
    return str(path)


def test_differences_name_the_fields_and_codecs():
    now = {"video": {"name": "pixels", "residual_gain": 2.0, "spatial": 8}, "audio": {"name": "mel", "mels": 32}}
    assert codec_differences(json.loads(json.dumps(now)), now) == []
    assert codec_differences({**now, "video": {**now["video"], "residual_gain": 3.0}}, now) == ["codecs.video.residual_gain"]
    # a field the stamp leaves out is taken at its default (older ingest stamps held the config as written)
    assert codec_differences({**now, "video": {"name": "pixels"}}, now) == []
    assert codec_differences({"video": now["video"]}, now) == ["codecs.audio"]


def test_check_refuses_other_codecs_and_a_missing_stamp_when_required(tmp_path):
    cfg = config_lib.load("configs/demo.py:tiny")
    stamp = codecs_stamp(cfg)
    assert stamp["video"]["residual_gain"] == cfg.codecs.video.residual_gain
    same = _manifest(tmp_path / "same", {"codecs": stamp})
    assert check_codecs(cfg, same, require_stamp=True, fix="FIX") is None
    other = _manifest(tmp_path / "other", {"codecs": {**stamp, "video": {**stamp["video"], "residual_gain": 9.0}}})
    with pytest.raises(ValueError, match=r"other.*other codecs.*codecs\.video\.residual_gain.*FIX"):
        check_codecs(cfg, other, require_stamp=False, fix="FIX")
    old = _manifest(tmp_path / "old", {})
    with pytest.raises(ValueError, match=r"old.*do not say which codecs.*FIX"):
        check_codecs(cfg, old, require_stamp=True, fix="FIX")
    note = check_codecs(cfg, old, require_stamp=False, fix="FIX")
    assert note and "old" in note and "trusting" in note
