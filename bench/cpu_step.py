"""CPU train-step benchmark: mmdit's jitted forward / forward+backward vs diffusers' WanTransformer3DModel.

Both sides build the same Wan-layout DiT (issue 15, item 4): one video stream, 16 latent channels,
``5 x 16 x 16`` latents, patch ``1 x 2 x 2`` -> 320 tokens, dim 256 (4 heads x 64), ffn 1024,
4 layers, text cross-attention over ``32 x 64`` features, batch 2, float32, random init. The peer's
random weights are converted into mmdit params (``mmdit.convert.wan_dit``), so both run the *same*
model; the script checks the two forwards agree (max abs difference printed) before timing.

Measured per side (every call runs to completion; mmdit's end with ``block_until_ready``):

* ``fwd``: the forward pass (mmdit: ``jax.jit(MMDiT.apply)``; peer: ``torch.no_grad()`` forward);
* ``fwd_bwd``: forward + velocity-MSE loss + gradients w.r.t. every parameter (mmdit:
  ``jax.jit(jax.value_and_grad(loss))`` returning the grads; peer: ``loss.backward()`` with
  ``zero_grad(set_to_none=True)`` before each iteration).

Timing protocol: each side runs in its own child process (torch's OpenMP pool and XLA's thread pool
both spin-wait after work, so sharing a process slows whichever runs second), peer then mmdit, the
pair ``--repeats`` times. In a child: ``--warmup`` untimed calls of each variant (the first
compiles), then ``--iters`` rounds calling every variant once in turn (interleaved); the median wall
time per variant is reported, the process CPU time per call beside it, and the load average.

mmdit runs with ``model.scan=True`` (the default; on CPU the scan is unrolled, params stay stacked)
and ``scan=False``. Timesteps: one sigma per sample
for the peer (Wan 2.1 layout, ``timestep [B]``); mmdit always takes per-token sigmas ``[B, S]`` (its
only input form), here constant per sample -- the same values.

Threads: ``torch.set_num_threads(--threads)`` and ``set_num_interop_threads(1)``; XLA's CPU client
sizes its intra-op Eigen pool from the visible cores, so the script pins the process to ``--threads``
cores (``os.sched_setaffinity``) before importing jax; ``XLA_FLAGS`` is left as the caller set it.

Ratios are ``peer time / mmdit time`` (>= 1: mmdit faster). ``--ablate`` adds mmdit-only fwd+bwd
variants (scan, remat, attention implementation, mask-free attention, per-sample modulation, and the dot
library as per-executable XLA compile options); they are measurement aids (monkeypatches active only while the
variant is traced), the default model is not changed by them.

``--dots`` times the step's matmul shapes (``DOT_SHAPES``: projections, ffn, the weight- and input-gradient
forms, the attention batches) one call at a time in each library, in a child process per side
(``torch.matmul`` vs a jitted ``jnp.matmul``, which XLA's CPU backend runs through its YNNPACK dot fusions):
what the two step times owe to the matmul libraries alone, before any difference in the rest of the graph.

Writes JSON to ``--out`` (default ``bench/results/cpu_step.json``). Needs torch + diffusers (the
``parity`` extra: ``pip install -e .[parity]``).

Example::

    python3 bench/cpu_step.py --iters 10 --warmup 3 --repeats 2 [--ablate] [--dots]   # 2 threads per side
    python3 bench/cpu_step.py --threads 1 --repeats 2 --out /tmp/cpu_step_1t.json  # per-core, robust to load
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

SHAPE = (5, 16, 16)  # latent frames, height, width
CHANNELS = 16
PATCH = (1, 2, 2)
HEADS, HEAD_DIM, FFN, LAYERS = 4, 64, 1024, 4
TEXT_LEN, TEXT_DIM = 32, 64
BATCH = 2


def hf_config() -> dict:
    """The diffusers ``WanTransformer3DModel`` config of the benchmark shape."""
    return dict(
        patch_size=list(PATCH),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=FFN,
        num_layers=LAYERS,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
        added_kv_proj_dim=None,
        rope_max_seq_len=1024,
    )


def _torch():
    # A checkout's root on sys.path (PYTHONPATH=., python -m from it) puts its top-level kernels/ folder (installed as
    # mmdit_kernels) where diffusers probes for the PyPI `kernels` package: import the peer without that entry.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    try:
        import torch
        from diffusers import WanTransformer3DModel
    except ImportError as e:  # the peer is optional for the package, required here
        sys.exit(
            f"bench/cpu_step.py needs torch and diffusers for the peer model ({e}); install the parity extra: "
            "pip install -e .[parity]"
        )
    finally:
        sys.path[:] = saved
    return torch, WanTransformer3DModel


# -- the peer --------------------------------------------------------------------------------------


def build_peer(seed: int, threads: int):
    torch, Wan = _torch()
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    torch.manual_seed(seed)
    cfg = hf_config()
    return torch, Wan(**cfg).float()


def peer_inputs(torch, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((BATCH, CHANNELS) + SHAPE, generator=g)
    target = torch.randn((BATCH, CHANNELS) + SHAPE, generator=g)
    text = torch.randn((BATCH, TEXT_LEN, TEXT_DIM), generator=g)
    t = torch.tensor([250.0, 700.0])[:BATCH]
    return x, target, text, t


def peer_calls(torch, model, inputs) -> dict:
    """``{"fwd": fn, "fwd_bwd": fn}`` of the peer (each call runs to completion)."""
    x, target, text, t = inputs

    def fwd():
        with torch.no_grad():
            return model(x, t, text, return_dict=False)[0]

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        out = model(x, t, text, return_dict=False)[0]
        loss = torch.mean((out - target) ** 2)
        loss.backward()
        return loss

    model.train()
    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


# -- mmdit ---------------------------------------------------------------------------------------------


def mmdit_spec(scan: bool = True, remat: str = "none", impl: str = "xla"):
    import ml_collections as mlc

    from mmdit.convert import wan_dit
    from mmdit.model.spec import build_spec

    m = wan_dit.model_config(hf_config(), shape=SHAPE, text_length=TEXT_LEN)
    m.update(scan=scan, remat=remat, attention=dict(impl=impl, fallback=None, cross_impl=impl))
    base = dict(dtype="float32", param_dtype="float32", sequence_parallel="none", chunk_frames=None, time_reference=None)
    return build_spec(mlc.ConfigDict({**base, **m}))


def convert_peer(model) -> dict:
    """The peer's random weights as mmdit params (save_pretrained -> mmdit.convert.wan_dit), on the device once:
    host (numpy) params would be copied in on every call (~120 transfers, ~1.4 ms per fwd+bwd), which a training
    loop never does."""
    import jax

    from mmdit.convert import wan_dit
    from mmdit.convert.source import TensorSource, read_config

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, safe_serialization=True)
        return jax.device_put(wan_dit.convert(TensorSource(d), read_config(d), "float32"))


def mmdit_inputs(spec, peer_in):
    import jax.numpy as jnp
    import numpy as np

    x, target, text, t = (a.numpy() for a in peer_in)
    geo = spec.stream("video").geometry
    tok = geo.patchify(jnp.asarray(x.transpose(0, 2, 3, 4, 1)))
    tgt = geo.patchify(jnp.asarray(target.transpose(0, 2, 3, 4, 1)))
    sigma = jnp.asarray(np.repeat((t / 1000.0)[:, None], geo.num_tokens, axis=1), jnp.float32)
    return tok, tgt, sigma, jnp.asarray(text)


def mmdit_fns(spec):
    """(jitted forward, jitted value_and_grad) of the velocity-MSE loss."""
    import jax
    import jax.numpy as jnp

    from mmdit.model.mmdit import MMDiT

    model = MMDiT(spec)

    def forward(params, tok, sigma, text):
        return model.apply(params, {"video": tok}, {"video": sigma}, {"text": text})["video"]

    def loss(params, tok, tgt, sigma, text):
        return jnp.mean((forward(params, tok, sigma, text) - tgt) ** 2)

    return jax.jit(forward), jax.jit(jax.value_and_grad(loss))


def layer_params(spec, params):
    """``params`` (converted: layers stacked under ``blocks``) in the layout of ``spec``: unchanged for
    ``scan=True``, split into ``blocks_0 .. blocks_{L-1}`` for ``scan=False``."""
    import jax

    if spec.scan:
        return params
    inner = dict(params["params"])
    blocks = inner.pop("blocks")
    for i in range(spec.num_layers):
        inner[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], blocks)
    return {**params, "params": inner}


def mmdit_calls(spec, params, inputs, compiler_options=None) -> dict:
    """``{"fwd": fn, "fwd_bwd": fn}`` of mmdit (jitted; each call ends with ``block_until_ready``);
    ``compiler_options``: XLA options for these two executables alone (``Lowered.compile``)."""
    import jax

    params = layer_params(spec, params)
    tok, tgt, sigma, text = inputs
    fwd, vg = mmdit_fns(spec)
    if compiler_options is not None:
        fwd = fwd.lower(params, tok, sigma, text).compile(compiler_options=compiler_options)
        vg = vg.lower(params, tok, tgt, sigma, text).compile(compiler_options=compiler_options)
    return {
        "fwd": lambda: jax.block_until_ready(fwd(params, tok, sigma, text)),
        "fwd_bwd": lambda: jax.block_until_ready(vg(params, tok, tgt, sigma, text)),
    }


def interleaved(calls: dict, warmup: int, iters: int) -> dict:
    """Times every ``calls[name][pass]`` ``iters`` times, *interleaved* (one call of each per round), so
    every variant sees the same background load on a shared machine; ``warmup`` untimed calls of each
    first (the first compiles). Returns ``{name: {pass: timings}}`` like :func:`timeit`."""
    flat = [(n, p, fn) for n, d in calls.items() for p, fn in d.items()]
    first = {}
    for n, p, fn in flat:
        t0 = time.perf_counter()
        fn()
        first[n, p] = time.perf_counter() - t0
        for _ in range(max(warmup - 1, 0)):
            fn()
    wall = {(n, p): [] for n, p, _ in flat}
    cpu = {(n, p): [] for n, p, _ in flat}
    for _ in range(iters):
        for n, p, fn in flat:
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[n, p].append(time.perf_counter() - t)
            cpu[n, p].append(time.process_time() - c)
    out = {}
    for n, p, _ in flat:
        w = wall[n, p]
        out.setdefault(n, {})[p] = {
            "median_s": statistics.median(w),
            "min_s": min(w),
            "cpu_median_s": statistics.median(cpu[n, p]),
            "first_s": first[n, p],
            "times_s": w,
        }
    return out


def ablations(params, peer_in, warmup, iters) -> dict:
    """mmdit-only variants of the fwd+bwd (module docstring): ``{label: timings}``. Each variant is
    compiled under its patch (if any), then all are timed interleaved with the default."""
    import contextlib

    import jax
    import jax.numpy as jnp

    from mmdit.attention import registry
    from mmdit.model import layers

    def unmasked(q, k, v, mask, opts):  # the `full` rule's dense mask is all True here: drop it
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v.astype(jnp.float32)).astype(q.dtype)

    @contextlib.contextmanager
    def no_mask():
        orig = registry._IMPLS["xla"]
        registry._IMPLS["xla"] = unmasked
        try:
            yield
        finally:
            registry._IMPLS["xla"] = orig

    @contextlib.contextmanager
    def per_sample(bcast: bool):
        """Time embedding of the first token only (exact here: sigma is constant per sample), broadcast
        back to ``[B, S, ...]`` (``bcast``) or kept ``[B, 1, ...]`` and broadcast inside each block."""
        orig = layers.TimestepEmbedding.__call__

        def call(self, sigma_tokens):
            temb, mod = orig(self, sigma_tokens[:, :1])
            if not bcast:
                return temb, mod
            S = sigma_tokens.shape[1]
            return tuple(jnp.broadcast_to(t, (t.shape[0], S) + t.shape[2:]) for t in (temb, mod))

        layers.TimestepEmbedding.__call__ = call
        try:
            yield
        finally:
            layers.TimestepEmbedding.__call__ = orig

    @contextlib.contextmanager
    def separate_projections():
        """q, k, v (and a cross-attention's k, v) as separate products, as before stacked_dense."""
        from mmdit.model import attention

        orig = attention.stacked_dense

        def separate(x, params, dtype):  # one stacked_dense per projection
            return jnp.concatenate([orig(x, [p], dtype) for p in params], axis=-2)

        attention.stacked_dense = separate
        try:
            yield
        finally:
            attention.stacked_dense = orig

    variants = [
        ("scan, remat=none (default)", dict(scan=True), None),
        ("separate q/k/v projections", dict(scan=True), separate_projections),
        ("separate q/k/v projections, no scan", dict(scan=False), separate_projections),
        ("no scan", dict(scan=False), None),
        ("scan, remat=full", dict(scan=True, remat="full"), None),
        ("scan, remat=dots", dict(scan=True, remat="dots"), None),
        ("no scan, remat=dots", dict(scan=False, remat="dots"), None),
        ("attention impl=cudnn (jax.nn.dpa on CPU)", dict(scan=True, impl="cudnn"), None),
        ("attention without mask", dict(scan=True), no_mask),
        ("attention without mask, no scan", dict(scan=False), no_mask),
        ("per-sample time embedding, bcast to S", dict(scan=True), lambda: per_sample(True)),
        ("per-sample modulation [B,1,6,D]", dict(scan=True), lambda: per_sample(False)),
        ("per-sample modulation [B,1,6,D], no scan", dict(scan=False), lambda: per_sample(False)),
    ]
    calls = {}
    for label, kw, patch in variants:
        spec = mmdit_spec(**kw)
        with patch() if patch else contextlib.nullcontext():
            calls[label] = {"fwd_bwd": mmdit_calls(spec, params, mmdit_inputs(spec, peer_in))["fwd_bwd"]}
            calls[label]["fwd_bwd"]()  # traced and compiled under the patch; later calls hit the jit cache
    spec = mmdit_spec(scan=True)
    for label, opts in COMPILE_OPTION_ABLATIONS:  # where the dots go, per executable, interleaved with the rest
        calls[label] = {"fwd_bwd": mmdit_calls(spec, params, mmdit_inputs(spec, peer_in), opts)["fwd_bwd"]}
    rows = {k: v["fwd_bwd"] for k, v in interleaved(calls, warmup, iters).items()}
    base = rows["scan, remat=none (default)"]["median_s"]
    for label, r in rows.items():
        print(
            f"  {label:44s} fwd+bwd {r['median_s'] * 1e3:7.1f} ms  ({r['median_s'] / base:4.2f}x default, "
            f"cpu {r['cpu_median_s'] * 1e3:.0f} ms)",
            flush=True,
        )
    return rows


# The matmuls of one fwd+bwd at this shape (B*S = 640 tokens, D = 256, ffn 1024, 4 heads x 64, S = 320), one
# call each: (label, lhs shape, rhs shape, rhs transposed). Batched ones are [B*H, ...].
DOT_SHAPES = (
    ("proj x W [640,256]x[256,256]", (640, 256), (256, 256), False),
    ("ffn up x W [640,256]x[256,1024]", (640, 256), (256, 1024), False),
    ("ffn down x W [640,1024]x[1024,256]", (640, 1024), (1024, 256), False),
    ("dgrad g W^T [640,1024]x[256,1024]^T", (640, 1024), (256, 1024), True),
    ("wgrad x^T g [256,640]x[640,1024]", (256, 640), (640, 1024), False),
    ("scores q k^T [8,320,64]x[8,64,320]", (8, 320, 64), (8, 64, 320), False),
    ("values p v [8,320,320]x[8,320,64]", (8, 320, 320), (8, 320, 64), False),
)


def dot_calls(side: str, seed: int) -> dict:
    """``{label: {"dot": fn}}``: each of :data:`DOT_SHAPES` as one float32 matmul call on ``side``'s library
    (``peer``: ``torch.matmul``; ``mmdit``: a jitted ``jnp.matmul``, ``block_until_ready``), random operands."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if side == "peer":
        import torch
    else:
        import jax
        import jax.numpy as jnp
    calls = {}
    for label, a, b, t in DOT_SHAPES:
        x, w = rng.standard_normal(a, np.float32), rng.standard_normal(b, np.float32)
        if side == "peer":
            xt, wt = torch.from_numpy(x), torch.from_numpy(w)
            calls[label] = {"dot": (lambda xt=xt, wt=wt, t=t: torch.matmul(xt, wt.mT if t else wt))}
        else:
            f = jax.jit(lambda x, w, t=t: jnp.matmul(x, jnp.swapaxes(w, -1, -2) if t else w))
            xj, wj = jax.device_put(x), jax.device_put(w)
            calls[label] = {"dot": (lambda f=f, xj=xj, wj=wj: jax.block_until_ready(f(xj, wj)))}
    return calls


def print_dots(peer: dict, ours: dict) -> dict:
    """Prints the per-shape table; returns ``{label: {peer_ms, mmdit_ms, ratio, gflops_peer, gflops_mmdit}}``."""
    out = {}
    print(f"  {'matmul':40s} {'torch ms':>9s} {'XLA ms':>8s} {'torch/XLA':>9s} {'GFLOP/s torch':>14s} {'XLA':>6s}")
    for label, a, b, t in DOT_SHAPES:
        m, k = a[-2], a[-1]
        n = b[-2] if t else b[-1]
        flops = 2.0 * m * k * n * (a[0] if len(a) == 3 else 1)
        tp, tm = peer[label]["dot"]["median_s"], ours[label]["dot"]["median_s"]
        out[label] = dict(
            peer_ms=tp * 1e3, mmdit_ms=tm * 1e3, ratio=tp / tm, gflops_peer=flops / tp / 1e9, gflops_mmdit=flops / tm / 1e9
        )
        r = out[label]
        print(
            f"  {label:40s} {r['peer_ms']:9.3f} {r['mmdit_ms']:8.3f} {r['ratio']:9.2f} {r['gflops_peer']:14.1f} {r['gflops_mmdit']:6.1f}"
        )
    return out


# XLA CPU compile options (``Lowered.compile(compiler_options=...)``) tried as --ablate rows: where the dots go
COMPILE_OPTION_ABLATIONS = (
    ("dots: YNNPACK fusions off (Eigen)", {"xla_cpu_experimental_ynn_fusion_type": ""}),
    (
        "dots: XNNPACK instead of YNNPACK",
        {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    ),
    ("dots: oneDNN", {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_use_onednn": True}),
)


def run_side(side: str, args) -> dict:
    """Times one side in a fresh child process (``--side``): torch's OpenMP pool and XLA's thread pool
    spin-wait after work, so timing both in one process slows whichever runs second."""
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--side", side, "--iters", str(args.iters)]
        cmd += ["--warmup", str(args.warmup), "--threads", str(args.threads), "--seed", str(args.seed), "--out", out]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return json.load(f)


def child(args) -> int:
    """``--side peer|mmdit|ablate|dots-peer|dots-mmdit``: time that side alone and write ``{variant: {pass: timings}}``."""
    if args.side.startswith("dots-"):
        side = args.side.split("-", 1)[1]
        if side == "peer":
            torch = _torch()[0]
            torch.set_num_threads(args.threads)
            torch.set_num_interop_threads(1)
        res = interleaved(dot_calls(side, args.seed), args.warmup, max(args.iters, 20))
        with open(args.out, "w") as f:
            json.dump(res, f)
        return 0
    torch, peer = build_peer(args.seed, args.threads)
    pin = peer_inputs(torch, args.seed)
    if args.side == "peer":
        res = interleaved({"peer": peer_calls(torch, peer, pin)}, args.warmup, args.iters)
    else:
        params = convert_peer(peer)
        del peer
        if args.side == "ablate":
            res = ablations(params, pin, args.warmup, args.iters)
        else:
            calls = {}
            for name, scan in (("mmdit_scan", True), ("mmdit_noscan", False)):
                spec = mmdit_spec(scan=scan)
                calls[name] = mmdit_calls(spec, params, mmdit_inputs(spec, pin))
            res = interleaved(calls, args.warmup, args.iters)
    with open(args.out, "w") as f:
        json.dump(res, f)
    return 0


def ratios(res: dict, key: str = "median_s") -> dict:
    """``peer / mmdit`` per mmdit variant and pass (>= 1: mmdit faster)."""
    return {name: {p: res["peer"][p][key] / res[name][p][key] for p in ("fwd", "fwd_bwd")} for name in res if name != "peer"}


def print_table(res: dict, r: dict) -> None:
    print(f"{'':14s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} {'fwd cpu':>8s} {'f+b cpu':>8s} {'fwd ratio':>10s} {'f+b ratio':>10s}")
    for name, v in res.items():
        rf, rb = (1.0, 1.0) if name == "peer" else (r[name]["fwd"], r[name]["fwd_bwd"])
        print(
            f"{name:14s} {v['fwd']['median_s'] * 1e3:8.1f} {v['fwd_bwd']['median_s'] * 1e3:11.1f} "
            f"{v['fwd']['cpu_median_s'] * 1e3:8.1f} {v['fwd_bwd']['cpu_median_s'] * 1e3:8.1f} {rf:10.2f} {rb:10.2f}"
        )
    print("(ms: median wall per call; cpu: process CPU ms per call; ratio = peer / mmdit wall, >= 1: mmdit faster)")


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="bench/cpu_step.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--iters", type=int, default=10, help="timed iterations per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (the first compiles)")
    p.add_argument("--repeats", type=int, default=2, help="side-by-side rounds (peer and mmdit alternate per round)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablate", action="store_true", help="also time mmdit-only variants (module docstring)")
    p.add_argument(
        "--dots",
        action="store_true",
        help="also time the step's matmul shapes alone, torch.matmul vs XLA's jitted jnp.matmul (module docstring)",
    )
    p.add_argument(
        "--side", choices=("peer", "mmdit", "ablate", "dots-peer", "dots-mmdit"), default=None, help=argparse.SUPPRESS
    )  # child
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu_step.json"))
    args = p.parse_args(argv)

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > args.threads:
        os.sched_setaffinity(0, cores[: args.threads])
    if args.side:
        return child(args)
    torch, peer = build_peer(args.seed, args.threads)
    import jax
    import numpy as np

    params = convert_peer(peer)
    pin = peer_inputs(torch, args.seed)
    spec = mmdit_spec(scan=True)
    minp = mmdit_inputs(spec, pin)
    fwd, _ = mmdit_fns(spec)
    with torch.no_grad():
        ref = peer(pin[0], pin[3], pin[2], return_dict=False)[0].numpy().transpose(0, 2, 3, 4, 1)
    ours = np.asarray(spec.stream("video").geometry.unpatchify(fwd(params, minp[0], minp[2], minp[3])))
    err = float(np.abs(ours - ref).max())
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"same model: {n_params:,} params, max |mmdit - diffusers| forward = {err:.2e}", flush=True)

    load0 = os.getloadavg()
    busy = load0[0] > 0.5
    if busy:
        print(
            f"WARNING: 1-min load average {load0[0]:.2f} before timing: other processes share these cores, and "
            "torch's OpenMP threads degrade far more than XLA's under contention (peer CPU time ~= wall time "
            "below means its threads were not running together); ratios from a loaded machine are NOT the "
            "idle-machine figures -- rerun on idle cores, or compare at --threads 1",
            flush=True,
        )
    repeats = []
    for i in range(args.repeats):
        res = {**run_side("peer", args), **run_side("mmdit", args)}
        repeats.append({"results": res, "ratios_peer_over_mmdit": ratios(res), "loadavg": os.getloadavg()})
        print(f"\nround {i + 1}/{args.repeats} (load average {os.getloadavg()[0]:.2f}):")
        print_table(res, repeats[-1]["ratios_peer_over_mmdit"])
    out = {
        "shape": dict(
            latents=SHAPE,
            channels=CHANNELS,
            patch=PATCH,
            tokens=spec.stream("video").geometry.num_tokens,
            dim=HEADS * HEAD_DIM,
            heads=HEADS,
            ffn=FFN,
            layers=LAYERS,
            text=(TEXT_LEN, TEXT_DIM),
            batch=BATCH,
            dtype="float32",
        ),
        "params": n_params,
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": dict(jax=jax.__version__, torch=torch.__version__, diffusers=__import__("diffusers").__version__),
        "machine": platform.processor() or platform.machine(),
        "iters": args.iters,
        "warmup": args.warmup,
        "forward_max_abs_diff": err,
        "loadavg_start": load0,
        "loaded_machine_warning": busy,
        "repeats": repeats,
        "ratios_peer_over_mmdit_median": {
            name: {p: statistics.median(r["ratios_peer_over_mmdit"][name][p] for r in repeats) for p in ("fwd", "fwd_bwd")}
            for name in ("mmdit_scan", "mmdit_noscan")
        },
    }
    print(f"\nratios (peer / mmdit, median over rounds): {json.dumps(out['ratios_peer_over_mmdit_median'])}")
    if args.ablate:
        print("\nmmdit fwd+bwd ablations (scan unless stated):", flush=True)
        out["ablations_fwd_bwd"] = run_side("ablate", args)
    if args.dots:
        rounds = []
        for i in range(args.repeats):
            print(
                f"\nthe step's matmuls alone, round {i + 1}/{args.repeats} (median of >= 20 calls each; one call = one "
                "matmul, its dispatch and its output buffer):",
                flush=True,
            )
            rounds.append(print_dots(run_side("dots-peer", args), run_side("dots-mmdit", args)))
        out["dots"] = {
            "rounds": rounds,
            "ratio_median": {k: statistics.median(r[k]["ratio"] for r in rounds) for k in rounds[0]},
            "ratio_range": {k: (min(r[k]["ratio"] for r in rounds), max(r[k]["ratio"] for r in rounds)) for k in rounds[0]},
        }
        print("torch/XLA per matmul, median (range) over rounds:")
        for k, v in out["dots"]["ratio_median"].items():
            lo, hi = out["dots"]["ratio_range"][k]
            print(f"  {k:40s} {v:5.2f} ({lo:.2f}-{hi:.2f})")
    out["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nload average start {load0} end {out['loadavg_end']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
