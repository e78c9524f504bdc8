"""Record format, atomic shard writer and checked reader (mmdit.data.records)."""

import json
import pickle
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from mmdit.data import records as R


def _example(i: int, audio_len: int | None = None) -> dict:
    return {
        "video_latents": np.full((2, 3, 3, 4), i, np.float16),
        "audio_latents": np.arange((audio_len or 5 + i) * 2, dtype=np.float32).reshape(-1, 2),
        "text": f"clip {i} ünïcode",
        "text_tokens": np.arange(i + 1, dtype=np.int32),
        "identity": i % 3,
        "scale": 0.25 * i,
        "flag": bool(i % 2),
    }


def _write(d, n=7, per_shard=3, prefix="train", **kw):
    with R.ShardWriter(str(d), prefix, per_shard, producer="pytest writer", **kw) as w:
        for i in range(n):
            w.write(_example(i))
    return json.loads((d / R.MANIFEST_NAME).read_text())


def _assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            np.testing.assert_array_equal(a[k], b[k])
        else:
            assert type(a[k]) is type(b[k]) and a[k] == b[k], k


def test_encode_decode_round_trip_all_value_kinds():
    ex = {
        "f16": np.linspace(-2, 2, 24, dtype=np.float16).reshape(2, 3, 4),
        "bf16": np.array([1.5, -3.0], ml_dtypes.bfloat16),
        "big_endian": np.arange(4, dtype=">f4"),
        "i32": np.array([[1, -2]], np.int32),
        "u8": np.arange(3, dtype=np.uint8),
        "b": np.array([True, False]),
        "scalar0d": np.array(7, np.int64),
        "empty": np.zeros((0, 3), np.float32),
        "noncontig": np.arange(12.0).reshape(3, 4).T,
        "s": "text",
        "i": 3,
        "np_int": np.int64(-4),
        "f": 0.5,
        "np_f": np.float32(0.25),
        "flag": True,
    }
    out = R.decode_example(R.encode_example(ex))
    assert out["bf16"].dtype == ml_dtypes.bfloat16 and out["f16"].dtype == np.float16
    assert out["big_endian"].dtype == np.float32
    np.testing.assert_array_equal(out["big_endian"], np.arange(4.0))
    np.testing.assert_array_equal(out["noncontig"], ex["noncontig"])
    assert out["scalar0d"].shape == () and out["empty"].shape == (0, 3)
    assert out["np_int"] == -4 and type(out["np_int"]) is int
    assert type(out["np_f"]) is float and type(out["flag"]) is bool and out["s"] == "text"


@pytest.mark.parametrize("bad", [np.array(["a", "b"]), np.array([object()]), b"raw", [1, 2], {"nested": 1}, None])
def test_encode_rejects_unsupported_values(bad):
    with pytest.raises(TypeError, match="'k'"):
        R.encode_example({"k": bad})


def test_decode_rejects_garbage_and_other_versions():
    with pytest.raises(ValueError, match="undecodable"):
        R.decode_example(b"\x93not msgpack at all")
    import msgpack

    with pytest.raises(ValueError, match="format 2"):
        R.decode_example(msgpack.packb({"v": 2, "f": {}}))


def test_writer_reader_round_trip_and_manifest(tmp_path):
    manifest = _write(tmp_path, n=7, per_shard=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["manifest.json"] + [f"train-{i:05d}-of-00003.array_record" for i in range(3)]
    assert [s["num_examples"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["num_examples"] == 7 and manifest["format_version"] == R.MANIFEST_VERSION
    schema = manifest["schema"]
    assert schema["video_latents"] == {"kind": "array", "dtype": "float16", "shape": [2, 3, 3, 4], "optional": False}
    assert schema["audio_latents"]["shape"] == [None, 2]  # varying length
    assert schema["text"]["kind"] == "str" and schema["identity"]["kind"] == "int"
    ds = R.open_dataset(str(tmp_path), verify_checksums=True)
    assert len(ds) == 7
    for i in range(7):
        _assert_same(ds[i], _example(i))
    _assert_same(ds.__getitems__([6, 0])[0], _example(6))
    with pytest.raises(IndexError):
        ds[7]
    clone = pickle.loads(pickle.dumps(ds))  # grain workers receive a pickled source
    _assert_same(clone[4], _example(4))
    assert repr(clone) == repr(ds)


def test_optional_keys_and_counted_skips(tmp_path):
    with R.ShardWriter(str(tmp_path), "d", 4) as w:
        w.write({"x": np.zeros(2, np.float32)})
        w.write({"x": np.ones(2, np.float32), "ref_audio_latents": np.ones((3, 2), np.float32)})
        w.skip(R.SkipExample(R.SKIP_SILENT, "rms 0"), source="a.mp4")
        w.skip(R.SKIP_SILENT, source="b.mp4")
        w.skip(R.SkipExample(R.SKIP_LENGTH, "1s vs 2s"), source="c.mp4")
    m = R.read_manifest(str(tmp_path))
    assert m["schema"]["ref_audio_latents"]["optional"] and not m["schema"]["x"]["optional"]
    assert m["skipped"] == {R.SKIP_LENGTH: 1, R.SKIP_SILENT: 2}
    assert [s["source"] for s in m["skipped_sources"]] == ["a.mp4", "b.mp4", "c.mp4"]
    ds = R.open_dataset(str(tmp_path))
    assert "ref_audio_latents" not in ds[0] and ds[1]["ref_audio_latents"].shape == (3, 2)


def test_writer_rejects_inconsistent_dtype(tmp_path):
    w = R.ShardWriter(str(tmp_path), "d", 4)
    w.write({"x": np.zeros(2, np.float16)})
    with pytest.raises(ValueError, match="'x' is float32 but earlier examples had float16"):
        w.write({"x": np.zeros(2, np.float32)})
    w.abort()


def test_existing_dataset_needs_overwrite_and_overwrite_removes_stale_shards(tmp_path):
    _write(tmp_path, n=7, per_shard=3)
    with pytest.raises(ValueError, match="overwrite=True"):
        R.ShardWriter(str(tmp_path), "train", 3)
    _write(tmp_path, n=4, per_shard=2, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json",
        "train-00000-of-00002.array_record",
        "train-00001-of-00002.array_record",
    ]
    assert len(R.open_dataset(str(tmp_path))) == 4


def test_exception_inside_writer_keeps_previous_dataset(tmp_path):
    _write(tmp_path, n=5, per_shard=2)
    before = (tmp_path / "manifest.json").read_text()
    with pytest.raises(RuntimeError, match="boom"):
        with R.ShardWriter(str(tmp_path), "train", 2, overwrite=True) as w:
            for i in range(3):
                w.write(_example(100 + i))
            raise RuntimeError("boom")
    assert (tmp_path / "manifest.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # aborted cleanly
    _assert_same(R.open_dataset(str(tmp_path))[4], _example(4))


_CRASHING_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from mmdit.data import records as R
    w = R.ShardWriter(sys.argv[1], "train", 2, overwrite=True)
    for i in range(5):                      # 2 full shards + 1 open shard
        w.write({"x": np.full(3, 100 + i, np.float32)})
    os.kill(os.getpid(), signal.SIGKILL)    # killed before close(): no commit
""")


def test_writer_killed_before_close_leaves_only_tmp_files(tmp_path):
    fresh, existing = tmp_path / "fresh", tmp_path / "existing"
    existing.mkdir()
    _write(existing, n=5, per_shard=2)
    before = (existing / "manifest.json").read_text()
    for d in (fresh, existing):
        proc = subprocess.run([sys.executable, "-c", _CRASHING_WRITER, str(d)], capture_output=True, text=True)
        assert proc.returncode == -9, proc.stderr
    # A fresh directory: only tmp shards, no manifest; the reader says what happened.
    assert sorted(p.name for p in fresh.iterdir()) == [f"train-{i:05d}.array_record.tmp" for i in range(3)]
    with pytest.raises(
        ValueError,
        match=r"manifest\.json does not exist: the writer did not "
        r"finish \(3 \*\.tmp leftovers\).*re-run",
    ):
        R.open_dataset(str(fresh))
    # Over an existing dataset: its manifest and shards are untouched, the tmp files ignored.
    assert (existing / "manifest.json").read_text() == before
    assert len([p for p in existing.iterdir() if p.name.endswith(".tmp")]) == 3
    ds = R.open_dataset(str(existing), verify_checksums=True)
    assert len(ds) == 5
    for i in range(5):
        _assert_same(ds[i], _example(i))


def test_truncated_shard_is_named(tmp_path):
    m = _write(tmp_path)
    shard = tmp_path / m["shards"][1]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError,
        match=rf"{shard.name} is \d+ bytes .* truncated .*re-run "
        r"pytest writer",
    ):
        R.open_dataset(str(tmp_path))


def test_corrupt_bytes_detected_on_read_and_by_checksum(tmp_path):
    m = _write(tmp_path)
    shard = tmp_path / m["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[300] ^= 0xFF  # inside the first chunk's payload; the file size is unchanged
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{shard.name} fails its sha256 check"):
        R.open_dataset(str(tmp_path), verify_checksums=True)
    ds = R.open_dataset(str(tmp_path))  # cheap checks pass (size, count) ...
    with pytest.raises(ValueError, match=rf"{shard.name}: corrupt ArrayRecord data"):
        [ds[i] for i in range(3)]  # ... reading the damaged chunk names the shard
    _assert_same(ds[3], _example(3))  # other shards still read


def test_missing_listed_shard_is_named(tmp_path):
    m = _write(tmp_path)
    (tmp_path / m["shards"][2]["file"]).unlink()
    with pytest.raises(
        ValueError,
        match=rf"{m['shards'][2]['file']} is listed in manifest.json "
        r"but missing; re-run pytest writer",
    ):
        R.open_dataset(str(tmp_path))


def test_schema_mismatches_are_reported(tmp_path):
    _write(tmp_path)
    with pytest.raises(ValueError, match=r"'video_latents' has dtype float16, expected float32"):
        R.open_dataset(str(tmp_path), expected_schema={"video_latents": {"kind": "array", "dtype": "float32"}})
    with pytest.raises(ValueError, match="missing key 'motion'"):
        R.open_dataset(str(tmp_path), expected_schema={"motion": {"kind": "array"}})
    R.open_dataset(
        str(tmp_path),
        expected_schema={  # wildcard dims and optional keys pass
            "video_latents": {"kind": "array", "shape": [None, 3, 3, 4]},
            "ref_audio_latents": {"kind": "array", "optional": True},
        },
    )
    # A manifest whose schema does not describe its shards: caught per record, naming the shard.
    path = tmp_path / "manifest.json"
    m = json.loads(path.read_text())
    m["schema"]["video_latents"]["dtype"] = "float32"
    path.write_text(json.dumps(m))
    ds = R.open_dataset(str(tmp_path))
    with pytest.raises(
        ValueError,
        match=r"train-00000-of-00003.array_record: record 0 does not "
        r"match the schema",
    ):
        ds[0]


def test_manifest_version_mismatch(tmp_path):
    _write(tmp_path)
    path = tmp_path / "manifest.json"
    m = json.loads(path.read_text())
    m["format_version"] = 99
    path.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="v99 .* re-run pytest writer"):
        R.open_dataset(str(tmp_path))


def test_validate_example_counted_reasons():
    schema = R.ExampleSchema(
        fields={"video_latents": {"kind": "array", "dtype": "float16"}}, max_av_mismatch_s=0.1, min_audio_rms=1e-3
    )
    good = _example(1)
    speech = 0.1 * np.sin(np.linspace(0, 300, 16000)).astype(np.float32)
    R.validate_example(good, schema, video_seconds=1.0, audio_seconds=1.05, waveform=speech)

    def reason(ex, **kw):
        with pytest.raises(R.SkipExample) as e:
            R.validate_example(ex, schema, **kw)
        return e.value.reason

    bad = dict(good, audio_latents=np.array([[0.0, np.nan]], np.float32))
    assert reason(bad) == R.SKIP_NON_FINITE
    assert reason(dict(good, scale=float("inf"))) == R.SKIP_NON_FINITE
    assert reason(good, waveform=np.full(10, np.nan, np.float32)) == R.SKIP_NON_FINITE
    assert reason(good, video_seconds=1.0, audio_seconds=1.5) == R.SKIP_LENGTH
    assert reason(good, waveform=np.zeros(16000, np.float32)) == R.SKIP_SILENT
    assert reason(good, waveform=1e-4 * speech) == R.SKIP_SILENT
    assert reason(dict(good, video_latents=good["video_latents"].astype(np.float32))) == R.SKIP_SCHEMA
