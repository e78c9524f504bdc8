"""Does silence mode keep the mouth closed? (issue 14's acceptance: the speaking/silence embedding)

    python3 bench/silence_mouth.py --workdir W [--num N] [--out bench/results/silence_mouth.json]

``W`` is a run of a config whose audio-feature condition has ``silence_embedding`` and ``silence_labels``
(``configs/demo_talking.py``). For ``N`` eval clips of the synthetic world (indices from
``EVAL_INDEX_OFFSET``, never trained on; every clip speaks), the trained model (EMA params) samples the
video through the public :class:`~mmdit.sample.sampler.Sampler` (its config's task, the first frame given)
from the clip's own audio features in three modes of the ``speaking_frames`` input:

* **speaking** -- speaking everywhere (the audio drives the mouth);
* **silence** -- silence mode everywhere (the learned embedding replaces the audio features);
* **listen_2nd_half** -- speaking over the first half of the latent frames, silence mode over the second
  (a listening phase).

Mouth opening is :func:`mmdit.eval.lipsync.mouth_opening_track` on the decoded frames, measured with the
ground-truth clip's portrait layout (so every mode is measured at the same place, against the same skin),
averaged over the clip's **speech frames** (the ground-truth labels' speaking frames, where the audio
has speech). Beside them: the ground truth through the codec in its speech frames (the ceiling: speaking
mode should reach it) and in its silent frames (the floor: silence mode should reach it), and the
untrained model (its initial params) in speaking mode. ``fraction`` = (opening - floor) / (ceiling -
floor): 1 = as open as real speech, 0 = as closed as real silence.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mmdit.data.synth_records import EVAL_INDEX_OFFSET, RecordMaker, world_from_config  # noqa: E402
from mmdit.eval.identity import locate_portrait  # noqa: E402
from mmdit.eval.lipsync import mouth_opening_track  # noqa: E402
from mmdit.model.diffusion import DiffusionModel  # noqa: E402
from mmdit.model.inputs import SPEAKING_FRAMES  # noqa: E402
from mmdit.sample.sampler import Sampler  # noqa: E402

MODES = ("speaking", "silence", "listen_2nd_half")


def silence_condition(spec) -> str:
    """The name of the condition with the silence embedding; ValueError naming the config field if none."""
    names = [c.name for c in spec.conditions if c.silence_embedding]
    if not names:
        raise ValueError(
            "this run's model has no silence embedding: train a config with model.conditions.<c>.silence_embedding=True "
            "and silence_labels=True (configs/demo_talking.py)"
        )
    return names[0]


def speaking_modes(num_frames: int, batch: int) -> dict:
    """``{mode: int32 [batch, F]}``: the ``speaking_frames`` input of each mode (module docstring)."""
    half = np.arange(num_frames) < num_frames // 2
    rows = {"speaking": np.ones(num_frames), "silence": np.zeros(num_frames), "listen_2nd_half": half}
    return {m: np.broadcast_to(np.asarray(rows[m], np.int32), (batch, num_frames)).copy() for m in MODES}


def mean_over(tracks: np.ndarray, masks: np.ndarray) -> float:
    """Mean of ``tracks [B, N]`` over the True entries of ``masks [B, N]`` (NaN when none)."""
    return float(tracks[masks].mean()) if masks.any() else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a training run of a config with silence labels")
    p.add_argument("--num", type=int, default=16, help="eval clips (default 16)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the config's sample.steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "silence_mouth.json"))
    args = p.parse_args(argv)
    if args.num < 1:
        raise SystemExit(f"--num must be >= 1, got {args.num}")

    from mmdit.train.checkpoint import restore_inference

    cfg, params, step = restore_inference(args.workdir)
    model = DiffusionModel.from_config(cfg)
    cond = silence_condition(model.spec)
    task = tuple(cfg.sample.tasks)[0]
    maker = RecordMaker(cfg, world_from_config(cfg))
    visual = maker.roles.visual
    t0 = time.perf_counter()
    records = [maker.record(EVAL_INDEX_OFFSET + i) for i in range(args.num)]
    latents = np.stack([r[f"{visual}_latents"] for r in records])
    features = np.stack([r[cond] for r in records])
    labels = np.stack([r[SPEAKING_FRAMES] for r in records]).astype(bool)  # [B, F] ground truth
    if maker.video_codec.temporal_compression != 1:
        raise ValueError("bench/silence_mouth.py measures per video frame: use a config whose codecs.video.temporal is 1")
    speech, silent = labels.copy(), ~labels
    speech[:, 0] = silent[:, 0] = False  # the first frame is given (task ti2av), not generated

    def decode(lat):
        return np.asarray(maker.video_codec.decode(np.asarray(lat, np.float32)))  # [B, N, H, W, 3] in [-1, 1]

    truth = decode(latents)
    layouts = [locate_portrait(clip) for clip in truth]

    def openings(frames):
        return np.stack([mouth_opening_track(f, layout) for f, layout in zip(frames, layouts)])

    sampler = Sampler(model, cfg)
    steps = int(args.steps or cfg.sample.steps)
    modes = speaking_modes(labels.shape[1], args.num)

    def run(p, speaking):
        raw = {cond: features, SPEAKING_FRAMES: speaking}
        out = sampler.sample(
            p, jax.random.key(args.seed), task=task, batch=args.num, known_latents={visual: latents}, raw_conds=raw, steps=steps
        )
        return openings(decode(out[visual]))

    gt = openings(truth)
    rows = {"ground_truth": {"speech_frames": mean_over(gt, speech), "silent_frames": mean_over(gt, silent)}}
    ceiling, floor = rows["ground_truth"]["speech_frames"], rows["ground_truth"]["silent_frames"]
    tracks = {m: run(params, modes[m]) for m in MODES}
    untrained = model.init(jax.random.key(args.seed))
    tracks["untrained_speaking"] = run(untrained, modes["speaking"])
    half = np.arange(labels.shape[1]) < labels.shape[1] // 2
    for m, tr in tracks.items():
        row = {"speech_frames": mean_over(tr, speech), "silent_frames": mean_over(tr, silent)}
        if m == "listen_2nd_half":
            row["speech_frames_1st_half"] = mean_over(tr, speech & half)
            row["speech_frames_2nd_half"] = mean_over(tr, speech & ~half)
        rows[m] = row
    for row in rows.values():
        for k in [k for k in row if k.startswith("speech_frames")]:
            row[k.replace("speech_frames", "fraction")] = (row[k] - floor) / max(ceiling - floor, 1e-9)

    results = {
        "workdir": os.path.abspath(args.workdir),
        "step": int(step),
        "clips": args.num,
        "task": task,
        "sample_steps": steps,
        "frames_per_clip": int(labels.shape[1]),
        "speech_frames": int(speech.sum()),
        "silent_frames": int(silent.sum()),
        "label_silent_fraction": float(1.0 - labels.mean()),
        "seconds": round(time.perf_counter() - t0, 1),
        "openings": rows,
    }
    print(f"{args.num} eval clips, {int(speech.sum())} speech / {int(silent.sum())} silent frames, step {step}")
    print(f"{'mode':<30}{'speech frames':>14}{'fraction':>10}")
    for m, row in rows.items():
        print(f"{m:<30}{row['speech_frames']:>14.4f}{row['fraction']:>10.2f}")
        if m == "ground_truth":
            print(f"{'ground_truth (silent frames)':<30}{floor:>14.4f}{0.0:>10.2f}")
        if m == "listen_2nd_half":
            for h in ("1st_half", "2nd_half"):
                print(f"{'  ' + h:<30}{row['speech_frames_' + h]:>14.4f}{row['fraction_' + h]:>10.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:  # NaN (no frames of a kind, e.g. tiny clips) as null: strict JSON
        json.dump(json.loads(json.dumps(results), parse_constant=lambda _: None), f, indent=1)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
