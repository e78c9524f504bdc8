"""``mmdit-plan --config C --topology T``: will this run fit, and on which mesh?

Plans the train step (and one sampling forward) for a target topology without the hardware:
``8xcpu`` (compiles on N fake CPU devices), ``8xH100`` / ``64xH200`` / ``NxA100`` (compiles when such a
GPU backend is attached, else an analytic estimate), ``v5p-64`` / ``v6e-16`` / ``v4-32`` (compiles
ahead of time when libtpu is installed, else an analytic estimate). ``--search`` ranks mesh shapes
x remat x attention and names the first that fits ``--hbm-gb``.

The memory model, the compilation and the search are :mod:`mmdit.train.plan`; this module parses
the arguments and prints the result.
"""

from __future__ import annotations

import argparse
import json
import sys

from mmdit import config_spec
from mmdit.cli.errors import entry_point
from mmdit.train import plan as plan_lib


def format_plan(r: dict) -> str:
    """The human-readable report of a :func:`mmdit.train.plan.plan` result."""
    c, e = r["config"], r["estimate"]
    mesh = " ".join(f"{a}={n}" for a, n in r["mesh"].items())
    lines = [
        f"{r['topology']['name']}: {r['topology']['devices']} devices, {r['hbm_gb']:.0f} GiB each "
        f"({r['usable_gb']:.1f} usable after headroom); mesh {mesh}",
        f"model {c['params'] / 1e9:.2f}B params, {c['tokens']} tokens, batch {c['batch']}, remat {c['remat']}, "
        f"attention {c['attention']}, sequence_parallel {c['sequence_parallel']}",
        f"per-device memory ({e['kind']}):",
    ]
    if "distill" in r:
        lines.append(
            "  (mmdit distill: teacher, fake score and student params, two optimizer states, the student's "
            f"rollout of {r['distill']['rollout_passes']} chunk passes)"
        )
    lines += [f"  {k:<20}{v:>10.2f} GiB" for k, v in e["parts_gb"].items()]
    lines.append(f"  {'total':<20}{e['total_gb']:>10.2f} GiB -> {'fits' if e['fits'] else 'does NOT fit'}")
    lines.append(f"  sampling forward    {e['sampling_forward_gb']:>10.2f} GiB (estimate)")
    comp = r.get("compiled", {})
    if "train_step" in comp:
        lines.append(
            f"compiled: train step {comp['train_step']['total']:.3f} GiB, sampling forward "
            f"{comp['sampling_forward']['total']:.3f} GiB per device"
        )
    elif comp:
        lines.append(f"compiled: {comp.get('skipped') or comp.get('error')}")
    lines.append(
        f"FLOPs per train step {r['flops_train_step']:.3e} ({r['flops_per_device']:.3e} per device)"
        + (f"; at 40% MFU {r['step_time_at_40pct_mfu_s']:.2f} s/step" if "step_time_at_40pct_mfu_s" in r else "")
    )
    for impl, result in r.get("attention_checks", {}).items():
        lines.append(f"attention {impl}: {result}")
    s = r.get("search")
    if s:
        lines.append(f"search: {s['considered']} candidates, {s['valid']} pass the sharding checks, {s['fitting']} fit")
        for row in s["top"]:
            lines.append(
                f"  {' '.join(f'{a}={n}' for a, n in row['mesh'].items())} remat={row['remat']} "
                f"attention={row['attention']}: {row['total_gb']:.1f} GiB"
            )
        if s["best"]:
            b = s["best"]
            lines.append(f"best: mesh {b['mesh']} remat={b['remat']} attention={b['attention']} ({b['total_gb']:.1f} GiB)")
        elif s["smallest"]:
            sm = s["smallest"]
            lines.append(
                f"nothing fits; smallest: mesh {sm['mesh']} remat={sm['remat']} attention={sm['attention']} "
                f"({sm['total_gb']:.1f} GiB): use more devices, a smaller --batch, or grad accumulation"
            )
    return "\n".join(lines)


@entry_point("mmdit-plan")
def main(argv=None):
    p = argparse.ArgumentParser(prog="mmdit-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file (configs/X.py[:arg]) or preset name")
    p.add_argument("--topology", required=True, help="8xH100, 64xH200, 8xcpu, v5p-64, v6e-16, ...")
    p.add_argument("--hbm-gb", type=float, default=None, help="GiB per device (default: the device's; H100 80)")
    p.add_argument("--headroom", type=float, default=plan_lib.HEADROOM, help="fraction of HBM kept free (default 0.1)")
    p.add_argument("--mesh", default=None, help="mesh axis sizes, e.g. data=1,fsdp=8 (replaces config.mesh sizes)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default train.global_batch_size, else 8)")
    p.add_argument("--search", action="store_true", help="rank mesh shapes x remat x attention that fit")
    p.add_argument("--no-compile", action="store_true", help="analytic estimate only")
    p.add_argument("--no-check", action="store_true", help="skip lowering the step per attention impl for the target")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    try:
        topo = plan_lib.parse_topology(args.topology)
        if topo.platform == "cpu":
            import jax

            jax.config.update("jax_num_cpu_devices", topo.devices)  # before any backend use
        cfg = config_spec.load(args.config, args.set)
        cfg = plan_lib.default_train(plan_lib.apply_mesh(cfg, plan_lib.parse_mesh(args.mesh)), args.batch)
        res = plan_lib.plan(
            cfg,
            topo,
            hbm_gb=args.hbm_gb,
            headroom=args.headroom,
            search=args.search,
            compile_=not args.no_compile,
            check=not args.no_check,
        )
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"mmdit-plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2, default=str) if args.json else format_plan(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
