"""Quality over time of long streams (issue 12): does a 60-s stream stay in sync, keep its identity, and
hide its chunk seams?

    python3 bench/stream_quality.py --workdir W [--seconds 60] [--out bench/results/stream_quality.json]

Two streams from a trained chunk-causal run (``configs/demo_stream.py``), both through ``mmdit stream``'s
code path (:class:`~mmdit.sample.streaming.StreamingSampler` + the codecs' streaming decoders):

* **T2AV** from one text prompt (both streams generated);
* **A2V** driven by a ``--seconds``-long utterance of the synthetic world (one identity speaking the whole
  time), whose own video through the codecs is the ground truth.

Per 10-s window: the lip-sync figures of ``mmdit.eval.sync_metrics.pair_metrics`` (best-offset
correlation, offset-0 correlation, change correlation of mouth opening vs audio log-energy) with their
**chance level** (the window's mouth track against the audio of the *other* windows of the same stream)
and the **ground-truth ceiling** (the same window of the ground-truth clip through the codecs); identity
against the first chunk (``identity_vs_reference`` of every frame vs the stream's first frame; ground
truth alike); and a **seam metric**: mean squared frame difference across chunk seams divided by the mean
inside chunks (1.0 = seams invisible; the ground truth's ratio beside it).
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

from mmdit.codecs.registry import make_audio_codec, make_video_codec  # noqa: E402
from mmdit.codecs.text import ByteTokenizer  # noqa: E402
from mmdit.data.synthetic import SyntheticWorld, WorldConfig  # noqa: E402
from mmdit.eval.image_quality import identity_vs_reference  # noqa: E402
from mmdit.eval.lipsync import clip_tracks  # noqa: E402
from mmdit.eval.sync_metrics import fraction_of_way, pair_metrics  # noqa: E402
from mmdit.model.diffusion import DiffusionModel  # noqa: E402
from mmdit.sample.stream_media import stream_media  # noqa: E402
from mmdit.sample.streaming import StreamingSampler, chunks_for_seconds, latent_chunks  # noqa: E402

WINDOW_S = 10.0
FPS, RATE = 25, 16000


def _collect(ss, params, state, codecs, given, num):
    frames, audio, t0 = [], [], time.perf_counter()
    for mc in stream_media(ss.stream(params, state, given=given, num_chunks=num), codecs):
        if mc.frames is not None:
            frames.append(mc.frames[0])
        if mc.audio is not None:
            audio.append(mc.audio[0])
    return np.concatenate(frames), np.concatenate(audio), time.perf_counter() - t0


def _windows(frames, wave, seconds):
    n = int(seconds * FPS)
    out = []
    for start in range(0, len(frames) - n + 1, n):
        f = frames[start : start + n]
        w = wave[start * RATE // FPS : (start + n) * RATE // FPS]
        if len(w) < n * RATE // FPS:
            break
        _, mouth, env, _ = clip_tracks(f, w)
        out.append((f, mouth, env))
    return out


def _seam_ratio(frames, chunk_frames):
    x = frames.astype(np.float32) / 255.0
    d = ((x[1:] - x[:-1]) ** 2).mean(axis=(1, 2, 3))  # d[i]: frame i -> i + 1
    seam = np.zeros(len(d), bool)
    seam[chunk_frames - 1 :: chunk_frames] = True
    return float(d[seam].mean() / max(d[~seam].mean(), 1e-12))


def _report(frames, wave, truth_windows, chunk_frames):
    wins = _windows(frames, wave, WINDOW_S)
    rows = []
    for i, (f, mouth, env) in enumerate(wins):
        m = pair_metrics(mouth, env)
        others = [pair_metrics(mouth, e) for j, (_, _, e) in enumerate(wins) if j != i]
        chance = {k: float(np.mean([o[k] for o in others])) for k in m} if others else {}
        row = {"window": i, **m, "chance": chance}
        if truth_windows is not None and i < len(truth_windows):
            tm = pair_metrics(truth_windows[i][1], truth_windows[i][2])
            row["ceiling"] = tm
            row["fraction_at_0"] = fraction_of_way(m["sync_corr_at_0"], chance.get("sync_corr_at_0"), tm["sync_corr_at_0"])
            row["fraction_change"] = fraction_of_way(m["change_corr"], chance.get("change_corr"), tm["change_corr"])
        row["identity_vs_first"] = identity_vs_reference(f, frames[0])
        rows.append(row)
    return {"windows": rows, "seam_ratio": _seam_ratio(frames, chunk_frames), "seconds": len(frames) / FPS}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--text", default="the cat sat on the mat and then it spoke for a long long time")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "stream_quality.json"))
    args = p.parse_args(argv)

    from mmdit.train.checkpoint import restore_inference_params

    cfg, params = restore_inference_params(args.workdir)
    model = DiffusionModel.from_config(cfg)
    ss = StreamingSampler(model, cfg)
    vcodec, acodec = make_video_codec(cfg.codecs.video), make_audio_codec(cfg.codecs.audio)
    codecs = {"video": vcodec, "audio": acodec}
    num = chunks_for_seconds(args.seconds, ss)
    chunk_frames = ss.layout.latents["video"] * int(vcodec.temporal_compression)
    raw = {"text_tokens": ByteTokenizer().encode_batch([args.text], cfg.model.conditions.text.length)}
    results = {"workdir": args.workdir, "seconds": args.seconds, "chunks": num, "cache": ss.cache_mode, "positions": ss.positions}

    # Ground truth: one long utterance of the synthetic world, through the codecs (the ceiling).
    w = dict(cfg.world)
    w.update(min_seconds=args.seconds + 1, max_seconds=args.seconds + 1, seed=12345)
    clip = SyntheticWorld(WorldConfig(**w)).clip(0)
    truth_frames = np.asarray(vcodec.decode(vcodec.encode(clip.video.astype(np.float32)[None] / 127.5 - 1.0)))[0]
    truth_frames = np.clip((truth_frames + 1.0) * 127.5, 0, 255).astype(np.uint8)
    a_lat = np.asarray(acodec.encode(clip.audio[None], sample_rate=RATE), np.float32)
    truth_wave = np.asarray(acodec.decode(a_lat))[0]
    truth_windows = _windows(truth_frames, truth_wave, WINDOW_S)
    results["ground_truth"] = _report(truth_frames, truth_wave, truth_windows, chunk_frames)

    state = ss.start(params, jax.random.key(0), task="t2av", batch=1, raw_conds=raw)
    frames, wave, wall = _collect(ss, params, state, codecs, None, num)
    results["t2av"] = {**_report(frames, wave, None, chunk_frames), "wall_s": wall}
    print(json.dumps(results["t2av"]["seam_ratio"]), file=sys.stderr)

    raw_a2v = {"text_tokens": ByteTokenizer().encode_batch([clip.text[:200]], cfg.model.conditions.text.length)}
    state = ss.start(params, jax.random.key(1), task="a2v", batch=1, raw_conds=raw_a2v)
    given = ({"audio": a} for a in latent_chunks(a_lat, ss.layout.latents["audio"]))
    frames, wave, wall = _collect(ss, params, state, codecs, given, num)
    results["a2v"] = {**_report(frames, wave, truth_windows, chunk_frames), "wall_s": wall}

    for name in ("t2av", "a2v", "ground_truth"):
        r = results[name]
        for row in r["windows"]:
            print(
                f"{name:12s} window {row['window']}: corr0 {row['sync_corr_at_0']:.3f} (chance {row['chance'].get('sync_corr_at_0', float('nan')):.3f})"
                f" change {row['change_corr']:.3f} (chance {row['chance'].get('change_corr', float('nan')):.3f})"
                f" id-vs-first {row['identity_vs_first']['identity_ref_hist_sim']:.3f}",
                file=sys.stderr,
            )
        print(f"{name:12s} seam ratio {r['seam_ratio']:.3f}", file=sys.stderr)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
