"""Will a training run fit, and on which mesh: the library behind ``mmdit-plan`` (:mod:`mmdit.cli.plan`).

Plans the train step (and one sampling forward) for a target topology without the hardware:

* ``8xcpu`` (``Nxcpu``): compiles on N fake CPU devices and reports ``compiled.memory_analysis()``
  next to the analytic estimate (how the estimate is validated, tests/test_plan.py);
* ``8xH100`` / ``64xH200`` / ``NxA100``: compiles when a GPU backend with that many devices is
  attached, otherwise an **analytic estimate**;
* ``v5p-64`` / ``v6e-16`` / ``v4-32``: compiles ahead of time for the TPU topology
  (``jax.experimental.topologies``) when libtpu is installed, otherwise an analytic estimate.

**Attention that runs.** The configured ``model.attention.impl`` (``auto`` resolved for the target
platform) and, with ``--search``, the platform's candidates (GPU: cudnn, pallas, xla; TPU: pallas,
splash, xla) are trace-checked: the train step's loss and gradients are lowered for the target with
``jax.export`` from this host (:func:`trace_check`; Triton / Mosaic kernels lower as on the device).
Only implementations that lower are ranked and recommended; ``attention_checks`` says why the
others do not (e.g. ``splash`` needs concrete mask metadata, ``cudnn`` runs the ``full`` rule only
and needs the cuDNN library to lower).

The analytic estimate (bytes per device) counts, from shapes only (``jax.eval_shape``):

* state: fp32 master params, Adam ``mu`` / ``nu`` and the EMA, each leaf divided by the mesh
  axes its logical names map to (exact, given the rules); ``mu`` / ``nu`` and grads of trainable
  params only (``train.freeze`` / ``train.trainable``: frozen params have no optimizer state and no
  gradient), grads like those params (+ an accumulator with ``train.grad_accum > 1``); FSDP
  all-gathers of one layer's weights (×2: prefetch) + its grads;
* activations saved for the backward pass per layer and token under ``model.remat``
  (:func:`layer_bytes_per_token`): ``full``/``offload`` keep only the fp32 residual carried
  between layers; ``dots_no_batch`` also the weight-matmul outputs; ``dots`` also the attention
  score matmuls; ``none`` everything (elementwise residuals, softmax probabilities); plus one
  layer recomputed with its cotangents, and the per-token embeddings/modulation (live all step);
* attention: ``xla`` materialises ``[B, H, Sq, Sk]`` fp32 scores; ``cudnn``/``pallas``/``splash``
  keep only the output and log-sum-exp (flash);
* tokens per device: batch / (batch mesh axes) / grad_accum × sequence / (sequence axis); heads
  and MLP widths / tensor (and heads / sequence under Ulysses).

It is an estimate: XLA's fusion and buffer reuse move the real figure by tens of percent (the
test holds it within 35% of the CPU compile of a small config). The search (``search=True``,
``mmdit-plan --search``) ranks every mesh (data × fsdp × sequence × tensor = devices) × remat policy
× attention (the configured one and the platform's candidates that lower) that passes the sharding
checks, cheapest first (least recompute, a fused kernel before dense XLA, then least tensor /
sequence parallelism), and names the first that fits the HBM budget.

:func:`plan` returns everything as a dict; ``mmdit-plan`` prints it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import math
import re

from mmdit import config_spec

GB = 2**30  # sizes are reported in GiB ("GB" below)
HEADROOM = 0.1  # fraction of HBM kept free for XLA workspace, fragmentation and the runtime
# kind: (platform, HBM GB per device, dense bf16 peak FLOP/s per device)
DEVICES = {
    "h100": ("gpu", 80, 989e12),
    "h200": ("gpu", 141, 989e12),
    "a100": ("gpu", 80, 312e12),
    "v4": ("tpu", 32, 275e12),
    "v5p": ("tpu", 95, 459e12),
    "v5e": ("tpu", 16, 197e12),
    "v6e": ("tpu", 32, 918e12),
    "cpu": ("cpu", None, None),
}
REMAT_COST = {"none": 0.0, "dots_no_batch": 0.1, "offload": 0.15, "dots": 0.2, "full": 0.33}  # extra fwd fraction
# Attention implementations the search considers per platform (besides the configured one); each must
# pass :func:`trace_check` (the train step lowers for the platform) to be recommended.
CANDIDATE_IMPLS = {"gpu": ("cudnn", "pallas", "xla"), "tpu": ("pallas", "splash", "xla"), "cpu": ("xla",)}
EXPORT_PLATFORM = {"gpu": "cuda", "tpu": "tpu", "cpu": "cpu"}
TPU_TOPOLOGY = {  # name -> (topology_name, chip_config, chips_per_host_bounds)
    "v5p-8": ("v5:2x2x1", "megacore", (2, 2, 1)),
    "v5p-16": ("v5:2x2x2", "megacore", (2, 2, 1)),
    "v5p-32": ("v5:2x2x4", "megacore", (2, 2, 1)),
    "v5p-64": ("v5:2x4x4", "megacore", (2, 2, 1)),
    "v5p-128": ("v5:4x4x4", "megacore", (2, 2, 1)),
    "v6e-8": ("v6e:2x4", "default", (2, 2, 1)),
    "v6e-16": ("v6e:4x4", "default", (2, 2, 1)),
    "v6e-64": ("v6e:8x8", "default", (2, 2, 1)),
    "v4-8": ("v4:2x2x1", "megacore", (2, 2, 1)),
    "v4-32": ("v4:2x2x4", "megacore", (2, 2, 1)),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    kind: str
    platform: str
    devices: int
    hbm_gb: float | None
    peak: float | None


def parse_topology(text: str) -> Topology:
    """``8xH100`` / ``64xh200`` / ``8xcpu`` (N devices) or ``v5p-64`` (TensorCores: 2 per v4/v5p
    chip, one JAX device per chip) / ``v6e-16`` / ``v5e-16`` (chips)."""
    t = text.strip().lower()
    m = re.fullmatch(r"(\d+)x([a-z0-9]+)", t)
    if m and m.group(2) in DEVICES and DEVICES[m.group(2)][0] != "tpu":
        kind, n = m.group(2), int(m.group(1))
    else:
        m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", t)
        if not m:
            raise ValueError(
                f"--topology {text!r}: use N x GPU (8xH100, 64xH200, 8xA100), Nxcpu, or a TPU "
                f"slice (v5p-64, v6e-16, v5e-16, v4-32)"
            )
        kind = "v5e" if m.group(1) == "v5litepod" else m.group(1)
        n = int(m.group(2)) // (2 if kind in ("v4", "v5p") else 1)
    platform, hbm, peak = DEVICES[kind]
    return Topology(text, kind, platform, n, hbm, peak)


def parse_mesh(text: str | None) -> dict | None:
    """``"data=2,fsdp=-1"`` -> ``{"data": 2, "fsdp": -1}`` (axes left out are 1)."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        k, sep, v = item.partition("=")
        if not sep or not v.strip().lstrip("-").isdigit():
            raise ValueError(f"--mesh {text!r}: write axis=size pairs, e.g. data=2,fsdp=4 (one size may be -1)")
        out[k.strip()] = int(v)
    return out


def apply_mesh(cfg, mesh: dict | None):
    """Sets ``cfg.mesh`` (keeping its ``rules`` / ``dcn``) from a :func:`parse_mesh` dict."""
    import ml_collections as mlc

    if mesh is None:
        return cfg
    with cfg.unlocked():
        old = cfg.get("mesh", None)
        keep = {k: old[k] for k in ("rules", "dcn") if old is not None and k in old}
        cfg.mesh = mlc.ConfigDict({**mesh, **keep})
    return cfg


def default_train(cfg, batch: int | None):
    """Fills the ``train`` fields planning needs (presets like unitalking have no train section)."""
    import ml_collections as mlc

    with cfg.unlocked():
        if "train" not in cfg:
            cfg.train = mlc.ConfigDict(
                dict(steps=1000, lr=1e-4, warmup_steps=0, global_batch_size=batch or 8, grad_accum=1, ema_decay=0.999)
            )
        elif batch:
            cfg.train.global_batch_size = batch
    return cfg


# ------------------------------------------------------------------------------------------------
# analytic estimate


def _axes(entry) -> tuple:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def sharded_bytes(boxed_tree, mesh_shape: dict, rules) -> int:
    """Per-device bytes of a (boxed) abstract tree: each leaf / the mesh axes its names map to."""
    import flax.linen as nn
    import jax
    import numpy as np

    total = 0
    is_box = lambda x: isinstance(x, nn.Partitioned)
    for leaf in jax.tree.leaves(boxed_tree, is_leaf=is_box):
        value = leaf.value if is_box(leaf) else leaf
        shape = list(value.shape)
        if is_box(leaf):
            for d, entry in enumerate(nn.logical_to_mesh_axes(tuple(leaf.names), rules)):
                shape[d] = -(-shape[d] // math.prod(mesh_shape.get(a, 1) for a in _axes(entry)))
        total += int(np.prod(shape)) * np.dtype(value.dtype).itemsize
    return total


def layer_bytes_per_token(
    spec, arch, remat: str, impl: str, *, tensor: int, heads_local: float, sk_local: float, c: int, ring: bool = False
) -> dict:
    """Bytes one (sequence-sharded) token of stream ``arch`` keeps per layer on one device.

    ``saved``: kept for the backward pass under ``remat``; ``full``: every residual (one layer being
    recomputed); ``host``: offloaded (``offload``). Heads / MLP widths are split over ``tensor``;
    ``heads_local`` heads attend ``sk_local`` keys; ``c`` is the compute dtype's size. ``ring``:
    attention saves (out, lse) only and materialises one key block at a time."""
    D, F, I = arch.dim, arch.ffn / tensor, spec.heads * spec.head_dim / tensor
    n_cross = len(arch.cross)
    keys = sk_local + sum(spec.condition(n).length for n in arch.cross)
    carry = 4 * D  # fp32 residual stream between layers (the scan carry)
    dots = c * (3 * I + 2 * D + F + n_cross * (I + D))  # q, k, v, attn out, ffn up/down, cross q/out
    elementwise = 4 * (16 * D + 4 * I) + c * F + n_cross * 4 * (2 * D + 2 * I)  # norms, adaLN, rope, gelu
    flash = c * I + 4 * heads_local * (1 + n_cross)  # attention output + log-sum-exp
    if impl == "xla" and not ring:
        att_dots = 4 * heads_local * keys + 4 * I  # fp32 scores, PV output
        att_all = att_dots + 5 * heads_local * keys  # + probabilities, mask
    else:
        att_dots = flash
        att_all = flash + (9 * heads_local * keys if ring else 0)  # ring: one block of scores live
    full = carry + dots + elementwise + att_all
    saved = {"none": full, "dots": carry + dots + att_dots, "dots_no_batch": carry + dots, "offload": carry, "full": carry}[remat]
    return {"saved": saved, "full": full, "host": dots if remat == "offload" else 0}


@dataclasses.dataclass
class Estimate:
    mesh: dict
    remat: str
    attention: str
    parts: dict  # name -> bytes per device
    layer_weights: int = 0  # one layer's weights without FSDP sharding
    fsdp_gather: bool = False

    @property
    def total(self) -> int:
        return int(sum(v for k, v in self.parts.items() if not k.startswith("host")))


def estimate(cfg, model, boxed_state, mesh_shape: dict, rules, *, remat: str | None = None, impl: str | None = None) -> Estimate:
    """Per-device bytes of one training step (see the module docstring for the model)."""
    import jax
    import jax.numpy as jnp

    from mmdit.util import param_groups

    from mmdit.parallel.rules import logical_to_spec
    from mmdit.train.sharding import batch_shapes

    spec = model.spec
    remat = remat or spec.remat
    impl = impl or spec.attention.impl
    size = lambda names: math.prod(mesh_shape.get(a, 1) for n in names for a in _axes(logical_to_spec((n,), rules)[0]))
    train = config_spec.train_spec(cfg)
    B, k = train.global_batch_size, train.grad_accum
    b_local = B / size(["batch"]) / k
    seq = size(["length"])
    tensor = size(["heads"])
    sp = spec.sequence_parallel
    # Attention per sequence-sharded query token: Ulysses regathers the sequence but splits the heads
    # over `sequence` (the same product); ring attends one key block of S/seq at a time.
    heads_local = spec.heads / tensor
    sk_local = spec.num_tokens / seq if sp == "ring" else spec.num_tokens
    c = jnp.dtype(spec.dtype).itemsize
    params = sharded_bytes(boxed_state.params, mesh_shape, rules)
    frozen = param_groups.frozen_mask(boxed_state.params, train.param_groups)
    trainable = sharded_bytes(jax.tree.map(lambda f, x: None if f else x, frozen, boxed_state.params), mesh_shape, rules)
    parts = {
        "params": params,
        "optimizer": sharded_bytes(boxed_state.opt_state, mesh_shape, rules),  # frozen params have none
        "ema": sharded_bytes(boxed_state.ema, mesh_shape, rules),
        "grads": trainable * (2 if k > 1 else 1),
    }
    blocks = boxed_state.params["dit"]["params"]["blocks"]
    per_layer = sharded_bytes(blocks, {a: n for a, n in mesh_shape.items() if a != "fsdp"}, rules) / spec.num_layers
    fsdp_sharded = per_layer > sharded_bytes(blocks, mesh_shape, rules) / spec.num_layers
    # one layer's weights all-gathered (FSDP) + that layer's full grads before the reduce-scatter
    parts["gathered_weights"] = int(per_layer * ((1 if fsdp_sharded else 0) + 1))
    saved = full = host = io = 0.0
    for a in spec.streams:
        tok = b_local * a.geometry.num_tokens / seq  # this stream's tokens on one device
        per = layer_bytes_per_token(
            spec, a, remat, impl, tensor=tensor, heads_local=heads_local, sk_local=sk_local, c=c, ring=(sp == "ring" and seq > 1)
        )
        saved += spec.num_layers * tok * per["saved"]
        full += tok * per["full"]
        host += spec.num_layers * tok * per["host"]
        io += tok * (4 * 40 * a.dim + 4 * 6 * a.geometry.token_dim)  # embeddings, temb, [S, 6, D] modulation, head
    parts["activations_saved"] = int(saved)
    parts["layer_recompute"] = int(full)  # one layer's residuals (cotangents) live in its backward
    parts["embeddings_io"] = int(io)
    parts["batch"] = int(sum(4 * math.prod(s.shape) for s in batch_shapes(model, B).values()) / size(["batch"]))
    if host:
        parts["host_offload"] = int(host)
    e = Estimate(dict(mesh_shape), remat, impl, parts)
    e.layer_weights, e.fsdp_gather = int(per_layer), fsdp_sharded
    return e


def distill_estimate(cfg, model, est: Estimate) -> dict | None:
    """The parts a distillation run (a config whose ``distill.teacher`` is set, ``mmdit distill``) adds to
    the student's training estimate ``est`` (which already counts the student's params, AdamW, EMA,
    grads and one pass's saved activations), or None for a training config: the frozen teacher's
    params; the fake score's (critic's) params, AdamW state and grads (a full trainable copy); and
    the student's rollout, whose backward keeps the saved activations of every chunk pass of every
    denoising step (``num_chunks × len(distill.denoising_step_list)`` passes; only the exit step
    carries gradient, but the chunk loop's autodiff saves each pass's residuals). Returns
    ``{"parts": {name: bytes}, "rollout_passes": n}``; the teacher's guided evaluations and the
    critic's pass run without saved activations and are below these."""
    d = cfg.get("distill", None)
    if d is None or d.get("teacher", None) is None:  # configs/base.py's section: a training config
        return None
    from mmdit.model.chunks import num_chunks

    steps = len(tuple(d.get("denoising_step_list", None) or (1.0, 0.75)))
    passes = num_chunks(model.spec) * steps
    p = est.parts
    parts = {
        "teacher_params": p["params"],
        "critic_params": p["params"],
        "critic_optimizer": p["optimizer"],
        "critic_grads": p["params"],
        "rollout_activations": p["activations_saved"] * (passes - 1),
    }
    return {"parts": parts, "rollout_passes": passes}


def sampling_estimate(cfg, model, boxed_state, mesh_shape, rules, impl=None) -> int:
    """Per-device bytes of one sampling forward at the planning batch (CFG evaluations are batch
    rows: plan with ``--batch samples × evaluations``): EMA params, one gathered layer, one layer's
    live activations, embeddings; nothing saved for a backward pass."""
    e = estimate(cfg, model, boxed_state, mesh_shape, rules, remat="none", impl=impl)
    gathered = e.layer_weights if e.fsdp_gather else 0
    return int(e.parts["ema"] + gathered + (e.parts["layer_recompute"] + e.parts["embeddings_io"]) / 2)


# ------------------------------------------------------------------------------------------------
# compiling


def compile_devices(topo: Topology):
    """Devices to compile for, or ``(None, reason)`` when only the analytic estimate is possible."""
    import jax

    if topo.platform == "tpu":
        if importlib.util.find_spec("libtpu") is None:
            return None, "libtpu is not installed (pip install 'jax[tpu]'): analytic estimate only"
        if topo.name.lower() not in TPU_TOPOLOGY:
            return None, f"no TPU topology table entry for {topo.name}: analytic estimate only"
        from jax.experimental import topologies

        name, chip, bounds = TPU_TOPOLOGY[topo.name.lower()]
        desc = topologies.get_topology_desc(
            topology_name=name, platform="tpu", chip_config_name=chip, chips_per_host_bounds=bounds, num_slices=1
        )
        return list(desc.devices), None
    try:
        devs = jax.devices(topo.platform)
    except RuntimeError:
        return None, f"no {topo.platform} backend here: analytic estimate only"
    if len(devs) < topo.devices:
        return None, f"{len(devs)} {topo.platform} device(s) attached, {topo.devices} needed: analytic estimate only"
    return devs[: topo.devices], None


def compiled_memory(cfg, devices) -> dict:
    """Compiles the sharded train step (and a sampling forward) for ``devices``; per-device bytes."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from mmdit.model.diffusion import DiffusionModel
    from mmdit.train import sharding
    from mmdit.train.state import make_optimizer

    model = DiffusionModel.from_config(cfg)
    run = sharding.setup(cfg, model, make_optimizer(config_spec.train_spec(cfg)), devices=devices)
    m = run.lower().compile().memory_analysis()
    out = {"train_step": _peak(m)}
    # one sampling forward: EMA params (sharded like the params), inputs batch-sharded
    sh = NamedSharding(run.mesh, PartitionSpec(sharding.batch_axes(run.rules) or None))
    as_global = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((run.batch_size,) + x.shape[1:], x.dtype, sharding=sh), tree
    )
    inputs = [as_global(t) for t in model.dummy_inputs(1)]  # tokens, sigma, raw conditions
    with run.context():
        low = jax.jit(run.model.velocity, in_shardings=(run.state_shardings.ema, None, None, None)).lower(
            run.abstract_state.ema, *inputs
        )
    out["sampling_forward"] = _peak(low.compile().memory_analysis())
    return out


def _peak(m) -> dict:
    total = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {
        "total": int(total),
        "arguments": int(m.argument_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
        "outputs": int(m.output_size_in_bytes),
        "aliased": int(m.alias_size_in_bytes),
    }


# ------------------------------------------------------------------------------------------------
# search and report


def mesh_shapes(n: int):
    """Every (data, fsdp, sequence, tensor) with product ``n``."""
    divs = [d for d in range(1, n + 1) if n % d == 0]
    for d, f, s in itertools.product(divs, divs, divs):
        if n % (d * f * s) == 0:
            yield dict(data=d, fsdp=f, sequence=s, tensor=n // (d * f * s))


# ------------------------------------------------------------------------------------------------
# attention trace checks: does the train step lower for the target platform with this impl?

_CHECKS: dict = {}


def resolve_impl(cfg, platform: str) -> str:
    """``model.attention.impl`` for ``platform`` (``"auto"`` resolved as the model would there)."""
    from mmdit.attention import masks, registry

    impl = cfg.model.get("attention", {}).get("impl", "xla")
    if impl != "auto":
        return impl
    rule = masks.parse_rule(cfg.model.get("mask", "full"), "model.mask")
    return registry.resolve_auto(rule, platform, cfg.model.get("dtype", "float32"))[0]


def trace_check(cfg, impl: str, platform: str) -> str | None:
    """Lowers the train step's loss and gradients (batch 1, abstract shapes, no mesh) with
    ``model.attention.impl=impl`` (no fallback, not interpreted) for ``platform`` (``gpu`` | ``tpu`` |
    ``cpu``) from this host (and ``cross_impl=impl`` when cross_impl is ``auto``): ``jax.export`` with
    ``platforms=(cuda|tpu|cpu,)`` inside
    :func:`mmdit.attention.registry.target_platform`, so kernels lower to Triton / Mosaic as on the
    device. Returns None when it lowers, else the reason (the first line of the error). Cached per
    (model / flow / tasks sections, impl, platform) in this process."""
    import jax
    from jax import export

    from mmdit.attention import registry
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.train import sharding
    from mmdit.train import step as step_lib

    key = tuple(cfg.get(k).to_json_best_effort() if cfg.get(k) is not None else None for k in ("model", "flow", "tasks"))
    key += (impl, platform)
    if key in _CHECKS:
        return _CHECKS[key]
    c = cfg.copy_and_resolve_references()
    with c.unlocked():
        c.model.attention.impl = impl
        c.model.attention.fallback = None
        c.model.attention.interpret = False
        if c.model.attention.get("cross_impl", "xla") == "auto":  # checked as the same impl (its auto choice
            c.model.attention.cross_impl = impl  # on GPU, cudnn, needs the cuDNN library to lower)
    reason = None
    try:
        with registry.target_platform(platform):
            model = DiffusionModel.from_config(c)  # cross_impl "auto" resolves for the target here
            params = jax.eval_shape(model.init, jax.random.key(0))
            batch = sharding.batch_shapes(model, 1)
            rng = jax.eval_shape(lambda: jax.random.key(0))
            fn = jax.jit(jax.value_and_grad(step_lib.make_loss_fn(model, c), has_aux=True))
            # Triton calls carry no serialisation guarantee; lowering them is what is checked here.
            checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
            export.export(fn, platforms=(EXPORT_PLATFORM[platform],), disabled_checks=checks)(params, batch, rng)
    except Exception as e:  # noqa: BLE001 -- any failure to trace or lower is the answer
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        reason = f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]
    _CHECKS[key] = reason
    return reason


def check_impls(cfg, platform: str, impls) -> dict:
    """``{impl: None (lowers) or the reason it does not}`` for each impl, in order."""
    return {impl: trace_check(cfg, impl, platform) for impl in dict.fromkeys(impls)}


def candidates(cfg, model, boxed, topo: Topology, rules, impl: str, impls=None):
    """``[(Estimate, error or None)]`` over mesh shapes × remat × attention (``impls``: default the
    configured ``impl`` only)."""
    import jax

    from mmdit.parallel import validate_rules

    spec = model.spec
    impls = list(impls) if impls is not None else [impl]
    out = []
    for shape in mesh_shapes(topo.devices):
        mesh = jax.sharding.AbstractMesh(tuple(shape.values()), tuple(shape))
        try:
            validate_rules(
                rules,
                mesh,
                params_shapes=boxed.params,
                batch_size=int(cfg.train.global_batch_size),
                num_heads=spec.heads,
                seq_len=spec.num_tokens,
                sequence_strategy=spec.sequence_parallel,
            )
            err = None
        except ValueError as e:
            err = str(e).splitlines()[0]
        for remat, impl in itertools.product(REMAT_COST, impls):
            out.append((estimate(cfg, model, boxed, shape, rules, remat=remat, impl=impl), err))
    return out


def rank_key(e: Estimate):
    m = e.mesh
    # a fused kernel that lowers for the target beats dense XLA attention at equal recompute
    return (REMAT_COST[e.remat], e.attention == "xla", m["tensor"], m["sequence"], m["fsdp"], e.total)


def plan(
    cfg,
    topo: Topology,
    *,
    hbm_gb: float | None = None,
    headroom: float = HEADROOM,
    search: bool = False,
    compile_: bool = True,
    check: bool = True,
) -> dict:
    """Everything ``mmdit-plan`` prints, as a dict (``cfg`` with a ``train`` section: :func:`default_train`).

    ``check``: trace-check the configured attention impl (and, with ``search``, the platform's
    candidates :data:`CANDIDATE_IMPLS`) for the target platform (:func:`trace_check`); the search
    only ranks impls that lower, and ``attention_checks`` reports each one's result."""
    import jax

    from mmdit.model import accounting
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.parallel import resolve_mesh_shape
    from mmdit.train import sharding
    from mmdit.train.state import abstract_state, make_optimizer

    # The analytic side needs shapes only: build the model with the reference attention, so a TPU
    # kernel can be planned on a host that cannot run it; `impl` is what gets estimated.
    impl = resolve_impl(cfg, topo.platform)
    shapes_cfg = cfg.copy_and_resolve_references()
    with shapes_cfg.unlocked():
        shapes_cfg.model.attention.impl = "xla"
        shapes_cfg.model.attention.fallback = None
    model = DiffusionModel.from_config(shapes_cfg)
    rules = sharding.rules_of(cfg)
    boxed = abstract_state(model, make_optimizer(config_spec.train_spec(cfg)), boxed=True)
    hbm = (hbm_gb or topo.hbm_gb or 80) * (1 - headroom)
    B = int(cfg.train.global_batch_size)
    shape = resolve_mesh_shape(sharding.mesh_config(cfg), topo.devices)
    est = estimate(cfg, model, boxed, shape, rules, impl=impl)
    distill = distill_estimate(cfg, model, est)
    if distill is not None:  # three param sets, two optimizer states (mmdit distill)
        est.parts.update(distill["parts"])
        compile_ = False
    flops = accounting.train_step_flops(model.spec, B)
    res = {
        "config": {
            "params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(sharding.strip_boxes(boxed.params)))),
            "tokens": model.spec.num_tokens,
            "batch": B,
            "remat": model.spec.remat,
            "attention": impl,
            "sequence_parallel": model.spec.sequence_parallel,
        },
        "topology": dataclasses.asdict(topo),
        "hbm_gb": hbm_gb or topo.hbm_gb or 80,
        "usable_gb": hbm,
        "mesh": shape,
        "estimate": {
            "kind": "analytic estimate",
            "parts_gb": {k: v / GB for k, v in est.parts.items()},
            "total_gb": est.total / GB,
            "fits": est.total <= hbm * GB,
            "sampling_forward_gb": sampling_estimate(cfg, model, boxed, shape, rules, impl) / GB,
        },
        "flops_train_step": flops,
        "flops_per_device": flops / topo.devices,
    }
    if topo.peak:
        res["step_time_at_40pct_mfu_s"] = flops / (0.4 * topo.peak * topo.devices)
    if distill is not None:
        res["distill"] = {"rollout_passes": distill["rollout_passes"]}
        res["compiled"] = {"skipped": "a distill config is planned analytically (teacher, critic and student)"}
    if compile_:
        devices, why = compile_devices(topo)
        if devices is None:
            res["compiled"] = {"skipped": why}
        else:
            try:
                res["compiled"] = {k: {kk: vv / GB for kk, vv in v.items()} for k, v in compiled_memory(cfg, devices).items()}
                res["compiled"]["fits"] = res["compiled"]["train_step"]["total"] <= hbm
            except ValueError as e:
                res["compiled"] = {"error": str(e)}
    # Only implementations whose train step lowers for the target are estimated and recommended.
    considered = [impl] + (list(CANDIDATE_IMPLS[topo.platform]) if search else [])
    checks = check_impls(cfg, topo.platform, considered) if check else {}
    res["attention_checks"] = {k: ("lowers" if v is None else v) for k, v in checks.items()}
    runnable = [i for i in dict.fromkeys(considered) if checks.get(i) is None]
    if checks.get(impl) is not None:
        res["config"]["attention_runs"] = False
    if search:
        rows = candidates(cfg, model, boxed, topo, rules, impl, runnable)
        ok = sorted((e for e, err in rows if err is None and e.total <= hbm * GB), key=rank_key)
        res["search"] = {
            "considered": len(rows),
            "valid": sum(err is None for _, err in rows),
            "fitting": len(ok),
            "best": None
            if not ok
            else {"mesh": ok[0].mesh, "remat": ok[0].remat, "attention": ok[0].attention, "total_gb": ok[0].total / GB},
            "top": [{"mesh": e.mesh, "remat": e.remat, "attention": e.attention, "total_gb": e.total / GB} for e in ok[:8]],
            "smallest": min(
                (
                    {"mesh": e.mesh, "remat": e.remat, "attention": e.attention, "total_gb": e.total / GB}
                    for e, err in rows
                    if err is None
                ),
                key=lambda r: r["total_gb"],
                default=None,
            ),
        }
    return res
