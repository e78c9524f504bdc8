"""Where the background flicker of generated clips sits: per 8x8 codec block, generated vs ground truth.

Samples ``--task`` on ``--num`` eval clips of a trained workdir (EMA params, its config's sampler, seed 0),
decodes them and the ground truth through the same codecs, and splits ``mmdit.eval.image_quality``'s background
flicker (mean squared frame-to-frame change over background pixels) into the codec's spatial blocks: each
block's share of the mean, summed over clips, for the generated and the ground-truth clips. Blocks with no
background pixel are 0. Also: the flicker with the generated latents' later frames set to zero in every block
the ground truth keeps exactly still (its residual latents are exact zeros there, ``codecs.video.residual_gain``):
what an oracle dead zone on still blocks could remove at most.

    python3 bench/flicker_blocks.py --workdir runs/demo [--num 16] [--task t2av]

Prints both grids; JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmdit.eval.image_quality import background_flicker_pairs, background_mask  # noqa: E402
from mmdit.eval.identity import to_unit_frames  # noqa: E402
from mmdit.eval.run import ClipDecoder, eval_batch  # noqa: E402
from mmdit.model.diffusion import DiffusionModel  # noqa: E402
from mmdit.sample.sampler import Sampler  # noqa: E402
from mmdit.tasks import roles  # noqa: E402
from mmdit.train.checkpoint import restore_inference  # noqa: E402
from mmdit.util.files import write_json_atomic  # noqa: E402


def block_flicker(frames: np.ndarray, block: int) -> tuple[np.ndarray, int]:
    """``(sum over frame pairs' mean of squared RGB change, per block [H/b, W/b], background pixels)`` of one clip
    ``frames`` uint8 ``[N, H, W, 3]``: the block sums add up to the clip's flicker times its background size."""
    x = to_unit_frames(frames).astype(np.float64)
    mask = background_mask(x)
    energy = (np.diff(x, axis=0) ** 2).mean(axis=(0, 3)) * mask  # [H, W]
    h, w = energy.shape
    return energy.reshape(h // block, block, w // block, block).sum(axis=(1, 3)), int(mask.sum())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a trained workdir (its data/eval unless --data)")
    p.add_argument("--data", default=None)
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--task", default="t2av")
    p.add_argument("--out", default="bench/results/flicker_blocks.json")
    args = p.parse_args(argv)
    cfg, params, step = restore_inference(args.workdir)
    model = DiffusionModel.from_config(cfg)
    data = args.data or os.path.join(args.workdir, "data", "eval")
    batch = eval_batch(data, args.num)
    schema = model.input_spec()
    known, raw = schema.latents_of(batch), schema.conditions_of(batch)
    visual = roles(model.spec, cfg.model).visual
    decode = ClipDecoder(cfg, model.spec, known, raw)
    block = int(decode.video_codec.spatial_compression)
    out = Sampler(model, cfg).sample(
        params, jax.random.key(0), task=args.task, batch=args.num, known_latents=known, raw_conds=raw
    )
    gen, _ = decode(out)
    gt, _ = decode({})
    sums = {"generated": 0.0, "ground_truth": 0.0}
    pixels = 0
    for i in range(args.num):
        g, n = block_flicker(gen[i], block)
        t, _ = block_flicker(gt[i], block)
        sums["generated"] = sums["generated"] + g
        sums["ground_truth"] = sums["ground_truth"] + t
        pixels += n
    grids = {k: v / pixels for k, v in sums.items()}  # each block's share of the pooled flicker
    result = {"workdir": args.workdir, "checkpoint_step": int(step), "task": args.task, "num": args.num, "block": block}
    for k, grid in grids.items():
        result[k] = {"flicker_pooled": float(grid.sum()), "per_block": grid.tolist()}
        print(f"{k}: pooled flicker {grid.sum():.2e}; per block (1e-6):")
        print(np.array2string(grid * 1e6, precision=2, suppress_small=True))
    lat = np.asarray(out[visual], np.float32)
    if cfg.codecs.video.get("residual_gain", None):
        truth = np.asarray(known[visual], np.float32)
        still = np.abs(truth[:, 1:]).max(axis=(1, 4)) == 0  # [B, h, w]: the ground truth never changes there
        zeroed = lat.copy()
        zeroed[:, 1:][np.broadcast_to(still[:, None, :, :, None], zeroed[:, 1:].shape)] = 0.0
        frames, _ = decode({**out, visual: zeroed})
        mean = float(np.mean([background_flicker_pairs(f).mean() for f in frames]))
        base = float(np.mean([background_flicker_pairs(f).mean() for f in gen]))
        truth_mean = float(np.mean([background_flicker_pairs(f).mean() for f in gt]))
        result["still_blocks_per_clip"] = float(still.sum(axis=(1, 2)).mean())
        result["flicker"] = {"generated": base, "still_blocks_zeroed": mean, "ground_truth": truth_mean}
        print(
            f"mean flicker {base:.2e}; with the {result['still_blocks_per_clip']:.1f} still blocks per clip zeroed "
            f"{mean:.2e}; ground truth {truth_mean:.2e}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
