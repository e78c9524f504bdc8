"""Attention kernel benchmark: forward and forward+backward time and throughput.

Shapes: ``B`` x ``S`` tokens x ``H`` heads x ``Dh`` (default 1 x {4096, 16384, 32768, 75000} x 24 x
128, bf16) under two masks:

* ``full`` -- every pair attended;
* ``chunk_causal`` -- tokens in ``--chunks`` equal chunks (default 8); a query in chunk ``c`` sees key
  chunks ``{0, c-1, c}`` (TalkingMachines), which attends ``(3n - 3) / n^2`` of the pairs (about a
  third for n = 8).

Implementations (names follow ``model.attention.impl``):

* ``pallas`` -- ``mmdit_kernels.flash_attention`` (the block-sparse Pallas kernel; the block map is
  computed once outside the timed region, as the model does once per forward);
* ``cudnn`` -- ``jax.nn.dot_product_attention`` (cuDNN on GPU), ``full`` only;
* ``xla`` -- the dense reference (``mmdit_kernels.reference_attention``), skipped when its
  ``S x S`` f32 scores would not fit in memory.

FLOP convention (FlashAttention's): a forward pass costs ``4 * B * H * Dh * pairs`` where ``pairs``
counts only *attended* (query, key) pairs (two matmuls, 2 FLOPs per multiply-add); the backward costs
2.5x the forward, so forward+backward counts ``3.5 * 4 * B * H * Dh * pairs``. TFLOP/s divides
that by the median wall time of ``--iters`` runs after ``--warmup`` runs (each ended with
``block_until_ready``). Dense implementations do the masked work too but get no credit for it.

Writes JSON (device name, versions, configuration, one record per (impl, mask, S, pass)) to
``--out`` (default ``bench/results/attention-<device>.json``). On CPU, ``--interpret --seqs 256``
runs the Pallas kernel in the interpreter as a smoke check (timings meaningless).

    python bench/attention.py --seqs 4096 16384 --impls pallas cudnn
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import mmdit_kernels as mk

SEQS = (4096, 16384, 32768, 75000)
IMPLS = ("pallas", "cudnn", "xla")
MASKS = ("full", "chunk_causal")
INTERPRET_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def chunk_causal(qf, kf):
    """TalkingMachines' rule over (chunk,) fields: key chunk in {0, c_q - 1, c_q}."""
    (qc,), (kc,) = qf, kf
    return (kc == 0) | (kc == qc) | (kc == qc - 1)


def chunk_ids(seq: int, chunks: int) -> np.ndarray:
    """``int32 [1, S]``: ``chunks`` (nearly) equal consecutive chunks."""
    return (np.arange(seq) * chunks // seq).astype(np.int32)[None]


def attended_pairs(mask: str, seq: int, chunks: int) -> int:
    if mask == "full":
        return seq * seq
    sizes = np.bincount(chunk_ids(seq, chunks)[0], minlength=chunks).astype(np.int64)
    total = 0
    for c in range(chunks):
        seen = {0, max(c - 1, 0), c}
        total += int(sizes[c] * sum(sizes[j] for j in seen))
    return total


def device_memory_bytes(default_gb: float) -> int:
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("bytes_limit", default_gb * 2**30))


def make_impl(name: str, mask: str, seq: int, args) -> tuple[object, str | None]:
    """``(fn(q, k, v) -> out, None)`` or ``(None, reason to skip)``."""
    meta = (jnp.asarray(chunk_ids(seq, args.chunks)),) if mask == "chunk_causal" else ()
    mask_fn = chunk_causal if mask == "chunk_causal" else None
    if name == "pallas":
        backend = mk.resolve_backend("auto", args.interpret)
        if backend == "gpu":
            bmap = mk.block_map_from_mask_fn(mask_fn, meta, meta, seq, seq, args.block_q, args.block_k)
            bmap = jax.block_until_ready(bmap)
        else:
            bmap = None
        return (
            lambda q, k, v: mk.flash_attention(
                q,
                k,
                v,
                mask_fn=mask_fn,
                q_meta=meta,
                k_meta=meta,
                block_map=bmap,
                block_q=args.block_q,
                block_k=args.block_k,
                interpret=args.interpret,
            )
        ), None
    if name == "cudnn":
        if mask != "full":
            return None, "cudnn runs unmasked attention only"
        impl = "cudnn" if jax.default_backend() == "gpu" else None
        return (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl)), None
    if name == "xla":
        need = 3 * 4 * args.batch * args.heads * seq * seq  # f32 scores, probabilities, their grads
        if need > 0.8 * device_memory_bytes(args.cpu_mem_gb):
            return None, f"dense S^2 scores need ~{need / 2**30:.0f} GiB"
        return (lambda q, k, v: mk.reference_attention(q, k, v, mask_fn=mask_fn, q_meta=meta, k_meta=meta)), None
    raise ValueError(f"unknown impl {name!r}; choose from {IMPLS}")


def time_fn(fn, inputs, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn(*inputs)`` (compiled on the first warmup call)."""
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(fn(*inputs))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(args) -> dict:
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    records = []
    for seq in args.seqs:
        shape = (args.batch, seq, args.heads, args.head_dim)
        keys = jax.random.split(jax.random.key(seq), 4)
        q, k, v, do = (jax.random.normal(kk, shape, dtype) for kk in keys)
        for mask in args.masks:
            pairs = attended_pairs(mask, seq, args.chunks)
            fwd_flops = 4 * args.batch * args.heads * args.head_dim * pairs
            for impl in args.impls:
                fn, reason = make_impl(impl, mask, seq, args)
                base = dict(impl=impl, mask=mask, seq=seq, pairs=pairs, density=pairs / seq**2)
                if fn is None:
                    records.append(dict(base, skipped=reason))
                    print(f"{impl:>7} {mask:>13} S={seq:>6}: skipped ({reason})", flush=True)
                    continue
                # Interpreted kernels are smoke runs: skip XLA's (slow) backend optimisation.
                jit = functools.partial(jax.jit, compiler_options=INTERPRET_COMPILE if args.interpret else None)
                fwd = jit(fn)
                fwd_bwd = jit(lambda q, k, v, do, fn=fn: jax.vjp(fn, q, k, v)[1](do))
                for name, f, inputs, flops in (
                    ("fwd", fwd, (q, k, v), fwd_flops),
                    ("fwd+bwd", fwd_bwd, (q, k, v, do), 3.5 * fwd_flops),
                ):
                    try:
                        ms = time_fn(f, inputs, args.warmup, args.iters)
                    except Exception as e:  # out of memory, unsupported shape: record and go on
                        records.append(dict(base, **{"pass": name, "error": f"{type(e).__name__}: {e}"[:500]}))
                        print(f"{impl:>7} {mask:>13} S={seq:>6} {name:>7}: error {type(e).__name__}", flush=True)
                        continue
                    tflops = flops / (ms * 1e-3) / 1e12
                    records.append(dict(base, **{"pass": name, "ms": ms, "tflops": tflops}))
                    print(f"{impl:>7} {mask:>13} S={seq:>6} {name:>7}: {ms:10.3f} ms {tflops:8.2f} TFLOP/s", flush=True)
    return {
        "device": device.device_kind,
        "platform": device.platform,
        "jax": jax.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "flops_convention": "fwd 4*B*H*Dh*attended_pairs; fwd+bwd 3.5x fwd",
        "results": records,
    }


def default_out(device_kind: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", device_kind).strip("-").lower() or "device"
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"attention-{name}.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=list(SEQS), help="sequence lengths S")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--chunks", type=int, default=8, help="chunk count for chunk_causal")
    p.add_argument("--block-q", type=int, default=128)
    p.add_argument("--block-k", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke runs)")
    p.add_argument("--cpu-mem-gb", type=float, default=8.0, help="memory budget when the device reports none")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/attention-<device>.json)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run(args)
    out = args.out or default_out(report["device"])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
