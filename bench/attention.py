"""Attention kernel benchmark: forward and forward+backward time and throughput.

Shapes: ``B`` x ``S`` tokens x ``H`` heads x ``Dh`` (default 1 x {4096, 16384, 32768, 75000} x 24 x
128, bf16), laid out like a clip: 3/4 video tokens then 1/4 audio tokens, both spanning 32 aligned
frames, cut into ``--chunks`` causal chunks (default 8). Masks (the model's :class:`MaskSpec`, built by
``mmdit.attention.masks``):

* ``full`` -- every pair attended;
* ``chunk_causal`` -- a query in chunk ``c`` sees key chunks ``{0, c-1, c}`` (TalkingMachines; about a
  third of the pairs for 8 chunks);
* ``local`` -- ``local(1)``: within a stream every pair, across streams only within +-1 frame (JAM-Flow);
* ``nonjoint`` -- a layer outside ``joint_layers``: group = stream, block-diagonal (5/8 of the pairs).

Implementations (names follow ``model.attention.impl``; each called through
``mmdit.attention.registry.attend`` exactly as the model calls it, the block map precomputed outside
the timed region as the model does once per forward):

* ``pallas`` / ``pallas_gpu`` / ``pallas_tpu`` -- our block-sparse kernels (Triton / Mosaic);
* ``cudnn`` -- ``jax.nn.dot_product_attention`` (cuDNN on GPU) with sequence lengths / per-group
  calls: ``full`` and ``nonjoint`` only;
* ``splash`` -- JAX's Splash attention (TPU, static masks);
* ``mosaic_fa3`` -- JAX's Mosaic GPU FA3-style kernel (``jax.experimental.pallas.ops.gpu.attention_mgpu``,
  Hopper), ``full`` only: the bar our GPU kernel is measured against;
* ``xla`` -- the dense reference, skipped when its ``S x S`` f32 scores would not fit in memory.

Default impls per platform: GPU pallas, cudnn, mosaic_fa3, xla; TPU pallas, splash, xla; CPU pallas,
cudnn, xla. ``--quick`` is a CPU smoke run (S = 256, every mask, xla / cudnn / both kernels interpreted).

FLOP convention (FlashAttention's): a forward pass costs ``4 * B * H * Dh * pairs`` where ``pairs``
counts only *attended* (query, key) pairs (two matmuls, 2 FLOPs per multiply-add); the backward costs
2.5x the forward, so forward+backward counts ``3.5 * 4 * B * H * Dh * pairs``. TFLOP/s divides
that by the median wall time of ``--iters`` runs after ``--warmup`` runs (each ended with
``block_until_ready``). Dense implementations do the masked work too but get no credit for it.

Writes JSON (device name, versions, configuration, one record per (impl, mask, S, pass)) to
``--out`` (default ``bench/results/attention-<device>.json``). On CPU, ``--quick`` (or ``--interpret
--seqs 256``) runs the Pallas kernels in the interpreter as a smoke check (timings meaningless).

    python bench/attention.py --seqs 4096 16384 --impls pallas cudnn mosaic_fa3
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

SEQS = (4096, 16384, 32768, 75000)
IMPLS = ("pallas", "pallas_gpu", "pallas_tpu", "cudnn", "splash", "mosaic_fa3", "xla")
DEFAULT_IMPLS = {
    "gpu": ("pallas", "cudnn", "mosaic_fa3", "xla"),
    "tpu": ("pallas", "splash", "xla"),
    "cpu": ("pallas", "cudnn", "xla"),
}
MASKS = ("full", "chunk_causal", "local", "nonjoint")
QUICK = dict(
    seqs=[256], heads=2, head_dim=128, warmup=0, iters=1, interpret=True, impls=["xla", "cudnn", "pallas_gpu", "pallas_tpu"]
)
INTERPRET_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
FRAMES = 32  # aligned time span of the benchmark clip (latent frames)
TPU_TILE = 128


def token_meta(mask: str, seq: int, chunks: int):
    """Two streams like a video/audio clip: 3/4 of the tokens video, 1/4 audio, both spanning
    ``FRAMES`` aligned frames, cut into ``chunks`` causal chunks; ``nonjoint``: group = stream."""
    from mmdit.attention.masks import TokenMeta

    sv = seq * 3 // 4
    sa = seq - sv
    time = np.concatenate([np.arange(sv) * FRAMES // max(sv, 1), np.arange(sa) * FRAMES // max(sa, 1)]).astype(np.float32)
    stream = np.concatenate([np.zeros(sv, np.int32), np.ones(sa, np.int32)])
    chunk = (time * chunks // FRAMES).astype(np.int32)
    group = stream if mask == "nonjoint" else np.zeros(seq, np.int32)
    return TokenMeta(stream[None], time[None], chunk[None], np.zeros((1, seq), bool), np.ones((1, seq), bool), group[None])


RULES = {"full": "full", "chunk_causal": "chunk_causal", "local": "local(1)", "nonjoint": "full"}


def mask_spec(mask: str, seq: int, chunks: int):
    """The :class:`~mmdit.attention.masks.MaskSpec` the model would build for this layer."""
    import dataclasses

    from mmdit.attention.masks import make_mask_spec

    spec = make_mask_spec(RULES[mask], ("video", "audio"), token_meta(mask, seq, chunks))
    return dataclasses.replace(spec, num_groups=2)


def attended_pairs(mask: str, seq: int, chunks: int, rows: int = 2048) -> int:
    """Attended (query, key) pairs of the mask, counted on the device ``rows`` query rows at a time."""
    from mmdit.attention.masks import TokenMeta, dense_mask

    spec = mask_spec(mask, seq, chunks)
    count = jax.jit(
        lambda qm, km: dense_mask(spec.predicate, TokenMeta(*qm), TokenMeta(*km)).sum(
            dtype=jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
        )
    )
    k = tuple(jnp.asarray(f) for f in spec.k)
    return int(sum(int(count(tuple(jnp.asarray(f[:, s : s + rows]) for f in spec.q), k)) for s in range(0, seq, rows)))


def device_memory_bytes(default_gb: float) -> int:
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("bytes_limit", default_gb * 2**30))


def _blocks(name: str, args) -> tuple[int, int]:
    if name in ("pallas_tpu", "splash") or (name == "pallas" and jax.default_backend() == "tpu"):
        up = lambda b: max(TPU_TILE, -(-b // TPU_TILE) * TPU_TILE)
        return up(args.block_q), up(args.block_k)
    return args.block_q, args.block_k


def make_impl(name: str, mask: str, seq: int, args) -> tuple[object, str | None]:
    """``(fn(q, k, v) -> out, None)`` or ``(None, reason to skip)``: the registry's implementation under
    the model's :class:`MaskSpec` (block map precomputed outside the timed region, as the model does
    once per forward), or JAX's Mosaic GPU FA3 kernel (``mosaic_fa3``, full mask only)."""
    import dataclasses

    from mmdit.attention import registry

    if name == "mosaic_fa3":
        return _mosaic_fa3(mask, args)
    if name == "xla":
        need = 3 * 4 * args.batch * args.heads * seq * seq  # f32 scores, probabilities, their grads
        if need > 0.8 * device_memory_bytes(args.cpu_mem_gb):
            return None, f"dense S^2 scores need ~{need / 2**30:.0f} GiB"
    bq, bk = _blocks(name, args)
    opts = registry.AttentionOptions(impl=name, interpret=args.interpret, block_q=bq, block_k=bk)
    spec = mask_spec(mask, seq, args.chunks)
    if name == "cudnn" and not spec.rule_is_full:
        return None, f"cudnn runs the full rule (with lengths / groups) only, not {spec.rule}"
    try:
        registry.get(name)
    except ValueError as e:
        return None, str(e)
    if registry.needs_block_map(name):
        bmap = jax.block_until_ready(jax.jit(lambda: spec.block_map(bq, bk))())
        spec = dataclasses.replace(spec, precomputed_block_map=((bq, bk), bmap))
    return (lambda q, k, v: registry.attend(q, k, v, spec, opts)), None


def _mosaic_fa3(mask: str, args):
    """JAX's Mosaic GPU flash attention (FA3-style, Hopper): ``jax.experimental.pallas.ops.gpu.attention_mgpu``."""
    if mask != "full":
        return None, "mosaic_fa3 takes no mask (full only)"
    if jax.default_backend() != "gpu":
        return None, "mosaic_fa3 runs on NVIDIA Hopper GPUs only"
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu
    except Exception as e:  # noqa: BLE001 -- not shipped in this jax build
        return None, f"jax.experimental.pallas.ops.gpu.attention_mgpu unavailable: {type(e).__name__}: {e}"[:300]
    cfg = mgpu.TuningConfig(
        block_q=64, block_kv=128, max_concurrent_steps=2, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64
    )
    return (lambda q, k, v: mgpu.attention(q, k, v, cfg)), None


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
            print(f"{mask:>13} S={seq:>6}: {pairs / seq**2:.3f} of the pairs attended", flush=True)
            fwd_flops = 4 * args.batch * args.heads * args.head_dim * pairs
            for impl in args.impls:
                fn, reason = make_impl(impl, mask, seq, args)
                base = dict(impl=impl, mask=mask, rule=RULES[mask], seq=seq, pairs=pairs, density=pairs / seq**2)
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
    p.add_argument("--impls", nargs="+", default=None, choices=IMPLS, help="default: the platform's (see DEFAULT_IMPLS)")
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
    p.add_argument("--quick", action="store_true", help="CPU smoke run: S=256, every mask, the kernels interpreted")
    args = p.parse_args(argv)
    if args.quick:
        explicit = {a.lstrip("-").replace("-", "_") for a in (argv or []) if a.startswith("--")}
        for k, v in QUICK.items():
            if k not in explicit:
                setattr(args, k, v)
    if args.impls is None:
        platform = jax.default_backend()
        args.impls = list(DEFAULT_IMPLS.get("gpu" if platform in ("gpu", "cuda", "rocm") else platform, DEFAULT_IMPLS["cpu"]))
    return args


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
