"""Peak memory of ``mmdit convert`` on a Wan2.1-T2V-1.3B-shaped checkpoint (random bf16 weights).

Writes a ``WanTransformer3DModel`` folder with the published 1.3B configuration (1,418,996,800
params: 30 layers, dim 1536, ffn 8960) as random bfloat16 safetensors, sharded like diffusers does
(``diffusion_pytorch_model-0000i-of-0000n.safetensors`` + index), into ``--work`` (default
``/tmp/mmdit_convert_rss``), then converts it in a fresh process under ``/usr/bin/time -v`` and
records the peak resident set size against the budget *output size in the target dtype + 2 GiB*.

The conversion goes through the ``wan_dit`` family when it is installed (``--family passthrough``:
a generic family defined here that copies every tensor, for when it is not). Results:
``bench/results/convert_rss.json`` (one entry per ``--dtype``).

    python3 bench/convert_rss.py [--dtype bfloat16] [--family wan_dit|passthrough] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results", "convert_rss.json")
GIB = 1 << 30

# Wan2.1-T2V-1.3B-Diffusers transformer/config.json (the published configuration)
WAN_1_3B = {
    "_class_name": "WanTransformer3DModel",
    "_diffusers_version": "0.33.0.dev0",
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "ffn_dim": 8960,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "num_attention_heads": 12,
    "num_layers": 30,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}
WAN_1_3B_PARAMS = 1_418_996_800  # sum of numel of diffusers' state_dict for this config (torch meta device)


def wan_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a diffusers ``WanTransformer3DModel`` state dict (T2V: no image branch)."""
    d = c["num_attention_heads"] * c["attention_head_dim"]
    pt, ph, pw = c["patch_size"]
    s = {
        "scale_shift_table": (1, 2, d),
        "patch_embedding.weight": (d, c["in_channels"], pt, ph, pw),
        "patch_embedding.bias": (d,),
        "condition_embedder.time_embedder.linear_1.weight": (d, c["freq_dim"]),
        "condition_embedder.time_embedder.linear_1.bias": (d,),
        "condition_embedder.time_embedder.linear_2.weight": (d, d),
        "condition_embedder.time_embedder.linear_2.bias": (d,),
        "condition_embedder.time_proj.weight": (6 * d, d),
        "condition_embedder.time_proj.bias": (6 * d,),
        "condition_embedder.text_embedder.linear_1.weight": (d, c["text_dim"]),
        "condition_embedder.text_embedder.linear_1.bias": (d,),
        "condition_embedder.text_embedder.linear_2.weight": (d, d),
        "condition_embedder.text_embedder.linear_2.bias": (d,),
        "proj_out.weight": (c["out_channels"] * pt * ph * pw, d),
        "proj_out.bias": (c["out_channels"] * pt * ph * pw,),
    }
    for i in range(c["num_layers"]):
        b = f"blocks.{i}."
        s[b + "scale_shift_table"] = (1, 6, d)
        for attn in ("attn1", "attn2"):
            for p in ("to_q", "to_k", "to_v", "to_out.0"):
                s[f"{b}{attn}.{p}.weight"] = (d, d)
                s[f"{b}{attn}.{p}.bias"] = (d,)
            s[f"{b}{attn}.norm_q.weight"] = (d,)
            s[f"{b}{attn}.norm_k.weight"] = (d,)
        s[b + "norm2.weight"] = (d,)
        s[b + "norm2.bias"] = (d,)
        s[b + "ffn.net.0.proj.weight"] = (c["ffn_dim"], d)
        s[b + "ffn.net.0.proj.bias"] = (c["ffn_dim"],)
        s[b + "ffn.net.2.weight"] = (d, c["ffn_dim"])
        s[b + "ffn.net.2.bias"] = (d,)
    return s


def write_checkpoint(directory: str, config: dict, shard_bytes: int = 1 << 30, seed: int = 0) -> dict:
    """Random bf16 weights for ``config`` in ``directory``, sharded at ``shard_bytes``; returns stats."""
    from safetensors.numpy import save_file

    shapes = wan_shapes(config)
    n = sum(int(np.prod(v)) for v in shapes.values())
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    groups, cur, size = [], [], 0
    for name in sorted(shapes):
        nbytes = int(np.prod(shapes[name])) * 2
        if cur and size + nbytes > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    groups.append(cur)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (rng.standard_normal(shapes[k], dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16) for k in names}
        save_file(tensors, os.path.join(directory, fname), metadata={"format": "pt"})
        del tensors
        weight_map.update({k: fname for k in names})
    with open(os.path.join(directory, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": n * 2}, "weight_map": weight_map}, f, indent=2)
    return {"params": n, "shards": len(groups), "bytes": n * 2}


# -- a generic family (fallback when the wan_dit family is not installed) -------------------------

NAME = "passthrough"
DESCRIPTION = "bench only: every tensor copied under its own name, cast to the output dtype"


def matches(hf_config):
    return True


def check(hf_config):
    return None


def target(hf_config):
    return {"kind": "passthrough"}


def convert(src, hf_config, dtype):
    return {"params": {name.replace(".", "_"): src.get(name).astype(dtype) for name in src.names()}}


def build(target):
    return None


CHILD = """
import json, os, resource, sys, time
sys.path.insert(0, {repo!r})
from mmdit.convert.run import convert_dir
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
family = {family!r}
if family == "passthrough":
    import importlib.util
    spec = importlib.util.spec_from_file_location("convert_rss_bench", {bench!r})
    family = importlib.util.module_from_spec(spec); spec.loader.exec_module(family)
t = time.time()
m = convert_dir({src!r}, {out!r}, family=family, dtype={dtype!r}, force=True)
print("RESULT " + json.dumps({{"seconds": time.time() - t, "rss_after_imports": base, "n_params": m["n_params"],
    "family": m["family"], "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/mmdit_convert_rss")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--family", default=None, help="wan_dit (default when installed) or passthrough")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoint and output")
    args = p.parse_args(argv)

    sys.path.insert(0, REPO)
    family = args.family
    if family is None:
        from mmdit.convert import registry

        family = "wan_dit" if "wan_dit" in registry.available() else "passthrough"
    src, out = os.path.join(args.work, "wan21_t2v_1.3b"), os.path.join(args.work, "converted")
    t = time.time()
    if not os.path.isfile(os.path.join(src, "diffusion_pytorch_model.safetensors.index.json")):
        gen = write_checkpoint(src, WAN_1_3B)
    else:
        gen = {"params": sum(int(np.prod(v)) for v in wan_shapes(WAN_1_3B).values()), "reused": True}
    assert gen["params"] == WAN_1_3B_PARAMS, gen
    gen_s = time.time() - t
    code = CHILD.format(repo=REPO, family=family, bench=os.path.abspath(__file__), src=src, out=out, dtype=args.dtype)
    cmd = (["/usr/bin/time", "-v"] if os.path.exists("/usr/bin/time") else []) + [sys.executable, "-c", code]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"conversion failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    child = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("RESULT "))[7:])
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    peak = int(m.group(1)) * 1024 if m else child["peak_rss"]
    itemsize = 2 if args.dtype == "bfloat16" else 4
    output_bytes = child["n_params"] * itemsize
    budget = output_bytes + 2 * GIB
    result = {
        "model": "Wan2.1-T2V-1.3B-shaped WanTransformer3DModel, random bf16 weights",
        "source_params": gen["params"],
        "source_bytes": sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors")),
        "source_shards": len([f for f in os.listdir(src) if f.endswith(".safetensors")]),
        "family": child["family"],
        "dtype": args.dtype,
        "output_params": child["n_params"],
        "output_bytes": output_bytes,
        "output_dir_bytes": dir_bytes(out),
        "peak_rss_bytes": peak,
        "rss_after_imports_bytes": child["rss_after_imports"],
        "budget_bytes": budget,
        "peak_rss_over_output_gib": round((peak - output_bytes) / GIB, 3),
        "within_budget": peak <= budget,
        "convert_seconds": round(child["seconds"], 1),
        "generate_seconds": round(gen_s, 1),
        "measured_with": "/usr/bin/time -v (Maximum resident set size)" if m else "getrusage(RUSAGE_SELF).ru_maxrss",
        "host": {"cpus": os.cpu_count()},
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    previous = {}
    if os.path.isfile(RESULTS):
        with open(RESULTS) as f:
            previous = json.load(f)
    previous[args.dtype] = result  # one entry per output dtype
    with open(RESULTS, "w") as f:
        json.dump(previous, f, indent=2)
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0 if result["within_budget"] else 1


if __name__ == "__main__":
    sys.exit(main())
