"""``mmdit-info --config configs/X.py[:arg]``: parameter counts per stream, token counts for the
configured clip, attended fraction of the mask, and FLOPs per training and sampling step. Uses
``jax.eval_shape`` only: nothing is allocated, so full-size presets run on a laptop."""

from __future__ import annotations

import argparse
import json
import sys

from mmdit import config_spec
from mmdit.cli.errors import entry_point


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return f"{n:.0f}"


def model_info(cfg, batch: int = 1) -> dict:
    from mmdit.sample.guidance import cfg_batch_plan
    from mmdit.model import accounting
    from mmdit.model.spec import build_spec

    spec = build_spec(cfg.model)
    bd = accounting.param_breakdown(spec)
    rho = accounting.attended_fraction(spec)
    fwd = accounting.forward_flops(spec, bd, rho, batch=batch)
    sample = config_spec.sample_spec(cfg, spec, check_tasks=False)
    guided = list(sample.guidance)
    evals = len(cfg_batch_plan(guided, sample.guidance_mode)) if guided else 1
    return {
        "streams": {
            a.name: {
                "kind": a.geometry.kind,
                "condition_stream": a.geometry.condition,
                "latent_shape": list(a.geometry.latent_shape),
                "tokens": a.geometry.num_tokens,
                "params": bd[a.name].total,
                "params_blocks": bd[a.name].blocks,
                "params_embeddings_and_head": bd[a.name].embeddings,
                "params_cross_attention": bd[a.name].cross,
            }
            for a in spec.streams
        },
        "conditions": {c.name: {"length": c.length, "dim": c.dim, "window": c.window} for c in spec.conditions},
        "params_total": sum(p.total for p in bd.values()),
        "tokens_total": spec.num_tokens,
        "layers": spec.num_layers,
        "joint_layers": list(spec.joint_layers),
        "heads": spec.heads,
        "head_dim": spec.head_dim,
        "mask": str(spec.rule),
        "attended_fraction": rho,
        "batch": batch,
        "flops_forward": fwd,
        "flops_train_step": 3 * fwd,
        "cfg_evaluations_per_step": evals,
        "flops_sample_step": evals * fwd,
    }


def format_info(info: dict) -> str:
    lines = []
    lines.append(f"{'stream':<16}{'kind':<10}{'latent shape':<22}{'tokens':>9}{'params':>12}")
    for name, s in info["streams"].items():
        kind = s["kind"] + ("*" if s["condition_stream"] else "")
        lines.append(f"{name:<16}{kind:<10}{str(tuple(s['latent_shape'])):<22}{s['tokens']:>9}{human(s['params']):>12}")
        for c, n in s["params_cross_attention"].items():
            lines.append(f"{'':<16}  of which cross-attention to {c}: {human(n)}")
    lines.append(
        f"total params {human(info['params_total'])}, tokens {info['tokens_total']}, layers {info['layers']} "
        f"(joint: {len(info['joint_layers'])}), heads {info['heads']}x{info['head_dim']}"
    )
    lines.append(f"mask {info['mask']}: attended fraction rho = {info['attended_fraction']:.4f}")
    lines.append(f"FLOPs per training step (batch {info['batch']}): {human(info['flops_train_step'])}")
    lines.append(
        f"FLOPs per sampling step: {human(info['flops_sample_step'])} ({info['cfg_evaluations_per_step']} evaluation(s) for guidance)"
    )
    if any(s["condition_stream"] for s in info["streams"].values()):
        lines.append("* condition stream (always known, no output head)")
    return "\n".join(lines)


@entry_point("mmdit-info")
def main(argv=None):
    p = argparse.ArgumentParser(prog="mmdit-info", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file (configs/X.py[:arg]) or preset name")
    p.add_argument("--batch", type=int, default=1, help="per-step batch size for the FLOP figures")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--params",
        action="store_true",
        help="list the param paths (what train.trainable / train.freeze / train.lr_groups match) with their training group",
    )
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one-line errors (or MMDIT_DEBUG=1)")
    args = p.parse_args(argv)
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}: the per-step batch size must be >= 1")
    cfg = config_spec.load(args.config, args.set)
    if args.params:
        groups = config_spec.train_spec(cfg).param_groups
        labels = {path: groups.label(path) for path in config_spec.param_paths(cfg)}
        print(json.dumps(labels, indent=2) if args.json else "\n".join(f"{k}  {v}" for k, v in labels.items()))
        return 0
    info = model_info(cfg, args.batch)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
