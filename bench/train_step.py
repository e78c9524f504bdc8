"""Train-step benchmark: step time, tokens/s and MFU of the sharded train step for a config and mesh.

MFU follows docs/design.md: ``train FLOPs / (step time · devices · peak)``, the numerator from
:func:`mmdit.model.accounting.train_step_flops` (``6·N·T + 12·ρ·L·B·S²·H·Dh`` refined per stream,
plus cross-attention). Peaks (dense bf16 per device): H100/H200 989 TFLOP/s, TPU v5p 459, v6e 918,
picked from ``device_kind``; on CPU MFU is ``null`` unless ``--peak-tflops`` is given. Remat
recomputation is not credited (it is overhead, as in MaxText's MFU).

The batch is synthetic (random latents and conditions of the record shapes), built once on the
host and made global with ``jax.make_array_from_process_local_data``: the step, not the input
pipeline, is measured. Each timed step ends with ``block_until_ready``; the median of ``--steps``
after ``--warmup`` (the first includes compilation, reported separately) is reported.

Writes JSON (device, versions, config overrides, mesh, per-step times, tokens/s, MFU, peak memory
where the backend reports it) to ``--out`` (default ``bench/results/train_step-<device>-<tag>.json``).

Examples::

    # CPU smoke run (MFU against a nominal 1 TFLOP/s)
    python bench/train_step.py --config configs/demo.py:tiny --mesh data=1 --steps 3 --peak-tflops 1

    # UniTalking on 8 GPUs (FSDP, full remat, cuDNN attention)
    python bench/train_step.py --config configs/unitalking.py --mesh fsdp=8 --batch 8 \\
        --set model.attention.impl=auto --set "model.mask=full & no_peek"

    # ~1B twin of UniTalking (dim 1024, ffn 4096, 24 layers, 8 x 128 heads: 0.93B params, same 15,161
    # tokens) on one H100/H200 -- the GPU-sized stand-in for the 11B preset:
    python bench/train_step.py --config configs/unitalking.py --mesh data=1 --batch 1 \\
        --set model.streams.video.dim=1024 --set model.streams.audio.dim=1024 \\
        --set model.streams.video.ffn=4096 --set model.streams.audio.ffn=4096 \\
        --set model.num_layers=24 --set model.heads=8 --set model.remat=full \\
        --set model.attention.impl=auto --set "model.mask=full & no_peek" --tag unitalking-1b
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

PEAKS = {"h100": 989e12, "h200": 989e12, "v5p": 459e12, "v6e": 918e12, "v6 lite": 918e12, "v5 lite": 197e12}


def peak_flops(device_kind: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    kind = device_kind.lower()
    for key, value in PEAKS.items():
        if key in kind:
            return value
    return None


def synthetic_batch(run, seed: int = 0) -> dict:
    """Per-host random batch with the record shapes (text tokens: printable bytes)."""
    import jax
    import numpy as np

    from mmdit.train.sharding import batch_shapes

    rng = np.random.default_rng(seed)
    local = {}
    for k, s in batch_shapes(run.model, run.batch_size // jax.process_count()).items():
        if np.issubdtype(s.dtype, np.integer):
            local[k] = rng.integers(32, 127, s.shape).astype(s.dtype)
        else:
            local[k] = rng.standard_normal(s.shape).astype(s.dtype)
    return run.global_batch(local)


def bench(cfg, *, steps: int, warmup: int, peak_tflops: float | None) -> dict:
    import jax
    import jax.numpy as jnp

    from mmdit.model import accounting
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.parallel import describe
    from mmdit.train import sharding
    from mmdit.train.state import make_optimizer
    from mmdit import config_spec

    model = DiffusionModel.from_config(cfg)
    run = sharding.setup(cfg, model, make_optimizer(config_spec.train_spec(cfg)))
    state = run.init(jax.random.key(0))
    batch = synthetic_batch(run)
    times = []
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, metrics = run.step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    first, timed = times[0], times[warmup:]
    step_s = statistics.median(timed)
    spec = model.spec
    B = run.batch_size
    flops = accounting.train_step_flops(spec, B)
    dev = jax.devices()[0]
    peak = peak_flops(dev.device_kind, peak_tflops)
    n = jax.device_count()
    mem = {}
    try:
        stats = dev.memory_stats() or {}
        mem = {k: stats[k] for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}
    except Exception:  # noqa: BLE001 -- backends without memory stats
        pass
    return {
        "device": dev.device_kind,
        "platform": dev.platform,
        "devices": n,
        "processes": jax.process_count(),
        "mesh": describe(run.mesh),
        "jax": jax.__version__,
        "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "tokens_per_sample": spec.num_tokens,
        "batch": B,
        "remat": spec.remat,
        "attention": spec.attention.impl,
        "dtype": jnp.dtype(spec.dtype).name,
        "sequence_parallel": spec.sequence_parallel,
        "grad_accum": int(cfg.train.get("grad_accum", 1)),
        "first_step_s": first,
        "step_times_s": timed,
        "step_s": step_s,
        "total_s": time.perf_counter() - t0,
        "tokens_per_s": B * spec.num_tokens / step_s,
        "flops_per_step": flops,
        "tflops_per_device": flops / step_s / n / 1e12,
        "peak_flops_per_device": peak,
        "mfu": (flops / (step_s * n * peak)) if peak else None,
        "loss": float(metrics["loss"]),
        "memory": mem,
    }


def main(argv=None):
    from mmdit import config_lib
    from mmdit.train.plan import apply_mesh, default_train, parse_mesh

    p = argparse.ArgumentParser(
        prog="bench/train_step.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="config file (configs/X.py[:arg]) or preset name")
    p.add_argument("--mesh", default=None, help="mesh axis sizes, e.g. data=2,fsdp=4 (default: config.mesh)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default train.global_batch_size, else 8)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak per device for MFU (default: by device kind)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--tag", default=None, help="name in the output file (default: the config name)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/train_step-<device>-<tag>.json)")
    args = p.parse_args(argv)

    from mmdit.parallel import distributed

    cfg = config_lib.override(config_lib.load(args.config), args.set)
    distributed.maybe_initialize(cfg)
    cfg = default_train(apply_mesh(cfg, parse_mesh(args.mesh)), args.batch)
    res = bench(cfg, steps=args.steps, warmup=max(args.warmup, 1), peak_tflops=args.peak_tflops)
    res.update(config=args.config, overrides=args.set, tag=args.tag)
    tag = args.tag or re.sub(r"[^A-Za-z0-9]+", "-", os.path.basename(args.config).replace(".py", ""))
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"train_step-{re.sub(r'[^A-Za-z0-9]+', '-', res['device']).strip('-').lower()}-{tag}.json",
    )
    import jax

    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(res, f, indent=2)
        mfu = "n/a" if res["mfu"] is None else f"{100 * res['mfu']:.1f}%"
        print(
            f"{res['device']} x{res['devices']} [{res['mesh']}] batch {res['batch']} x {res['tokens_per_sample']} tokens: "
            f"{res['step_s'] * 1e3:.1f} ms/step, {res['tokens_per_s']:.0f} tokens/s, "
            f"{res['tflops_per_device']:.2f} TFLOP/s/device, MFU {mfu} (first step {res['first_step_s']:.1f} s) -> {out}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
