"""The conversion framework (``mmdit convert``): streaming safetensors source, family registry,
atomic output with a manifest, sharded restore, and one clear error per kind of bad input.

Checkpoints are generated here with the safetensors numpy API (sharded like HF writes them); the
family is a small pass-through defined below, so these tests do not depend on any real family.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from mmdit.convert import registry
from mmdit.convert.run import TMP_MARK, convert_dir
from mmdit.convert.source import ConvertError, DictSource, TensorSource
from mmdit.util import converted

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _convert(src, hf_config, dtype):
    """``blocks.0.w`` -> ``{"params": {"blocks_0": {"w": ...}}}``, each tensor cast as it is read."""
    out: dict = {}
    for name in src.names():
        *mods, leaf = name.split(".")
        node = out
        key = "_".join(mods) or "root"
        node = node.setdefault(key, {})
        node[leaf] = src.get(name).astype(dtype)
    return {"params": out}


def passthru(**overrides):
    fam = types.SimpleNamespace(
        NAME="passthru",
        DESCRIPTION="test family: copies every tensor",
        matches=lambda c: c.get("_class_name") == "ToyModel",
        check=lambda c: None,
        target=lambda c: {"kind": "toy", "dim": c.get("dim", 4), "patch": (1, 2)},  # a tuple: a list once in JSON
        convert=_convert,
        build=lambda t: None,
    )
    for k, v in overrides.items():
        setattr(fam, k, v)
    return fam


def toy_tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "blocks.0.w": rng.standard_normal((8, 4)).astype(ml_dtypes.bfloat16),
        "blocks.0.b": rng.standard_normal((8,)).astype(np.float32),
        "blocks.1.w": rng.standard_normal((4, 8)).astype(np.float16),
        "head.w": rng.standard_normal((4, 4)).astype(np.float32),
    }


def write_checkpoint(directory, tensors, config=None, shards=2):
    """HF layout: config.json + model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config or {"_class_name": "ToyModel", "dim": 4}, f)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"))
        return directory
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, os.path.join(directory, fname))
        weight_map.update({n: fname for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return directory


@pytest.fixture
def ckpt(tmp_path):
    return write_checkpoint(str(tmp_path / "hf"), toy_tensors())


# -- the happy path ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_convert_roundtrip(ckpt, tmp_path, dtype):
    out = str(tmp_path / "out")
    manifest = convert_dir(ckpt, out, family=passthru(), dtype=dtype, log=lambda *_: None)
    assert manifest["family"] == "passthru" and manifest["dtype"] == dtype
    assert manifest["target"] == {"kind": "toy", "dim": 4, "patch": [1, 2]}
    assert manifest["source_config"]["_class_name"] == "ToyModel"
    assert set(manifest["source_files"]) == {
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    assert manifest["n_params"] == 8 * 4 + 8 + 4 * 8 + 16
    loaded_manifest, params = converted.load(out)
    assert loaded_manifest == manifest
    ref = toy_tensors()
    want = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
    np.testing.assert_array_equal(params["params"]["blocks_0"]["w"].astype(np.float32), ref["blocks.0.w"].astype(np.float32))
    np.testing.assert_array_equal(params["params"]["head"]["w"].astype(np.float32), ref["head.w"].astype(want).astype(np.float32))
    assert all(leaf.dtype == want for leaf in [params["params"]["head"]["w"], params["params"]["blocks_1"]["w"]])
    assert not [e for e in os.listdir(tmp_path) if TMP_MARK in e]


def test_source_reads_one_tensor_as_float32(ckpt):
    src = TensorSource(ckpt)
    assert src.names() == sorted(toy_tensors())
    assert src.shape("blocks.0.w") == (8, 4) and src.dtype("blocks.0.w") == np.dtype(ml_dtypes.bfloat16)
    x = src.get("blocks.1.w")
    assert x.dtype == np.float32 and x.shape == (4, 8)
    assert src.file("head.w").startswith("model-")
    with pytest.raises(ConvertError, match="no tensor 'nope'"):
        src.get("nope")


def test_unsharded_and_dict_source(tmp_path):
    d = write_checkpoint(str(tmp_path / "one"), toy_tensors(), shards=1)
    assert TensorSource(d).files() == ["model.safetensors"]
    ds = DictSource(toy_tensors())
    assert ds.get("blocks.0.w").dtype == np.float32 and ds.shape("head.w") == (4, 4)


def test_existing_output_same_is_noop_different_needs_force(ckpt, tmp_path):
    out = str(tmp_path / "out")
    quiet = dict(log=lambda *_: None)
    first = convert_dir(ckpt, out, family=passthru(), dtype="float32", **quiet)
    again = convert_dir(ckpt, out, family=passthru(), dtype="float32", **quiet)
    assert again == first  # nothing rewritten
    with pytest.raises(ConvertError, match="different converted checkpoint.*--force"):
        convert_dir(ckpt, out, family=passthru(), dtype="bfloat16", **quiet)
    assert converted.read_manifest(out)["dtype"] == "float32"  # the old one is intact
    convert_dir(ckpt, out, family=passthru(), dtype="bfloat16", force=True, **quiet)
    assert converted.read_manifest(out)["dtype"] == "bfloat16"
    os.makedirs(tmp_path / "junk")
    (tmp_path / "junk" / "x").write_text("x")
    for force in (False, True):  # a directory that is not ours is never replaced
        with pytest.raises(ConvertError, match="is not a converted checkpoint"):
            convert_dir(ckpt, str(tmp_path / "junk"), family=passthru(), force=force, **quiet)
    assert (tmp_path / "junk" / "x").read_text() == "x"


def test_interrupted_conversion_leaves_nothing_complete(ckpt, tmp_path):
    out = str(tmp_path / "out")

    def dies(src, hf_config, dtype):
        src.get("head.w")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_dir(ckpt, out, family=passthru(convert=dies), log=lambda *_: None)
    assert not os.path.exists(out) and not [e for e in os.listdir(tmp_path) if TMP_MARK in e]
    # a temporary directory left by a killed process (dead pid) is removed by the next run
    stale = out + TMP_MARK + "999999999"
    os.makedirs(stale)
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        converted.load(stale)
    convert_dir(ckpt, out, family=passthru(), log=lambda *_: None)
    assert not os.path.exists(stale) and converted.is_converted(out)


# -- bad input: each error names the file / field ---------------------------------------------------


def test_missing_shard(ckpt):
    os.remove(os.path.join(ckpt, "model-00002-of-00002.safetensors"))
    with pytest.raises(ConvertError, match=r"model.safetensors.index.json.*missing.*model-00002-of-00002.safetensors"):
        TensorSource(ckpt)


def test_truncated_shard(ckpt, tmp_path):
    path = os.path.join(ckpt, "model-00001-of-00002.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) - 16])
    with pytest.raises(ConvertError, match=r"model-00001-of-00002.safetensors.*truncated or corrupt"):
        convert_dir(ckpt, str(tmp_path / "out"), family=passthru(), log=lambda *_: None)


@pytest.mark.parametrize(
    "dtype, pattern",
    [(ml_dtypes.float8_e4m3fn, "float8"), (np.complex64, "complex64"), (np.int32, "integers")],
)
def test_dtype_the_target_cannot_hold(tmp_path, dtype, pattern):
    tensors = toy_tensors()
    tensors["head.w"] = np.ones((4, 4), dtype)
    d = write_checkpoint(str(tmp_path / "hf"), tensors)
    with pytest.raises(ConvertError, match=rf"model-0000\d-of-00002.safetensors: tensor 'head.w' .*{pattern}"):
        convert_dir(d, str(tmp_path / "out"), family=passthru(), log=lambda *_: None)
    assert not os.path.exists(tmp_path / "out")


def test_wrong_family(ckpt, tmp_path, monkeypatch):
    other = passthru(NAME="other", matches=lambda c: c.get("_class_name") == "OtherModel")
    with pytest.raises(ConvertError, match=r"config.json: this is not a other checkpoint.*_class_name='ToyModel'"):
        convert_dir(ckpt, str(tmp_path / "out"), family=other, log=lambda *_: None)
    with pytest.raises(ConvertError, match="--family 'nope': unknown"):
        convert_dir(ckpt, str(tmp_path / "out"), family="nope", log=lambda *_: None)
    monkeypatch.setattr(registry, "available", lambda: {"other": other})
    with pytest.raises(ConvertError, match="config.json: no converter family recognises this model"):
        convert_dir(ckpt, str(tmp_path / "out"), log=lambda *_: None)


def test_family_check_and_unread_tensors(ckpt, tmp_path):
    def check(c):
        raise ConvertError("config.json: field 'dim' = 4 unsupported")

    with pytest.raises(ConvertError, match="field 'dim'"):
        convert_dir(ckpt, str(tmp_path / "out"), family=passthru(check=check), log=lambda *_: None)

    def partial(src, hf_config, dtype):
        return {"params": {"head": {"w": src.get("head.w").astype(dtype)}}}

    with pytest.raises(ConvertError, match=r"3 tensor\(s\) were not converted \(e.g. blocks.0.b"):
        convert_dir(ckpt, str(tmp_path / "out"), family=passthru(convert=partial), log=lambda *_: None)
    fam = passthru(convert=partial, IGNORED=lambda c: ["blocks.*"])
    assert convert_dir(ckpt, str(tmp_path / "out"), family=fam, log=lambda *_: None)["n_params"] == 16


def test_pipeline_folder_resolves_component(tmp_path, monkeypatch):
    root = tmp_path / "pipe"
    write_checkpoint(str(root / "transformer"), toy_tensors())
    write_checkpoint(str(root / "vae"), toy_tensors(1), config={"_class_name": "OtherModel"})
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Pipe", "transformer": ["x", "y"], "vae": ["x", "z"]}))
    m = convert_dir(str(root), str(tmp_path / "out"), family=passthru(), log=lambda *_: None)
    assert m["source_dir"] == str(root / "transformer")
    other = passthru(NAME="other", matches=lambda c: c.get("_class_name") == "OtherModel")
    monkeypatch.setattr(registry, "available", lambda: {"passthru": passthru(), "other": other})
    with pytest.raises(ConvertError, match=r"several convertible components: transformer \(passthru\), vae \(other\)"):
        convert_dir(str(root), str(tmp_path / "out2"), log=lambda *_: None)


def test_load_names_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        converted.load(str(tmp_path / "nothing"))
    os.makedirs(tmp_path / "half" / "params")
    with pytest.raises(FileNotFoundError, match=r"half/manifest.json not found.*--force"):
        converted.load(str(tmp_path / "half"))


def test_cli_help_and_error(ckpt, tmp_path, monkeypatch, capsys):
    from mmdit.cli import convert as cli

    fam = passthru()
    fam.__name__ = "mmdit.convert.passthru"
    monkeypatch.setitem(registry.FAMILIES, "passthru", "mmdit.convert.passthru")
    monkeypatch.setitem(sys.modules, "mmdit.convert.passthru", fam)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "passthru         test family: copies every tensor" in text and "huggingface-cli download" in text
    assert cli.main(["--from", ckpt, "--to", str(tmp_path / "o"), "--dtype", "bfloat16"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 2)[-1])["n_params"] == 88
    assert cli.main(["--from", ckpt, "--to", str(tmp_path / "o"), "--family", "wan_dit_nope"]) == 2
    assert "--family 'wan_dit_nope': unknown" in capsys.readouterr().err


def test_load_sharded_on_two_devices(ckpt, tmp_path):
    """Restores straight into shards on a 2-device mesh: each device holds half of a [8, 4] kernel."""
    out = str(tmp_path / "out")
    convert_dir(ckpt, out, family=passthru(), dtype="bfloat16", log=lambda *_: None)
    script = textwrap.dedent(
        f"""
        import jax, numpy as np
        jax.config.update("jax_num_cpu_devices", 2)
        from jax.sharding import NamedSharding, PartitionSpec as P
        from mmdit.util import converted
        mesh = jax.make_mesh((2,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
        pick = lambda path, shape: NamedSharding(mesh, P("fsdp") if shape[0] % 2 == 0 else P())
        _, params = converted.load({out!r}, shardings=pick)
        _, host = converted.load({out!r})
        w = params["params"]["blocks_0"]["w"]
        assert w.sharding.spec == P("fsdp"), w.sharding
        assert [s.data.shape for s in w.addressable_shards] == [(4, 4), (4, 4)]
        np.testing.assert_array_equal(np.asarray(w), host["params"]["blocks_0"]["w"])
        _, rep = converted.load({out!r}, mesh=mesh)
        assert rep["params"]["head"]["w"].sharding.is_fully_replicated
        print("OK")
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]
