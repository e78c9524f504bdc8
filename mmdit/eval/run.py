"""Evaluate a model on the eval split: sample every task, decode, measure lip-sync and identity.

For each task in ``cfg.sample.tasks``, ``num`` eval clips give the known latents the task needs
(first frame, the given video or audio) and their transcripts; the sampled latents are decoded by
the config's codecs and scored with :func:`mmdit.eval.lipsync.evaluate_clip`. The same clips
decoded from their *ground-truth* latents give the ceiling of this metric for the world.

Results per task: mean/median of ``sync_corr`` (best correlation within ±8 frames), the share of
samples whose best offset is within ±1 frame, the median offset, and identity consistency; and
:func:`mmdit.eval.figures.task_figures`: the strict sync figures (lag-0 and change correlation) with
their chance levels and ground-truth ceiling, the headline fraction of the way from chance to ceiling,
a Fréchet distance with its ground-truth floor, background flicker, TI2AV identity vs the given frame.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from mmdit.data import media
from mmdit.data.records import open_dataset
from mmdit.eval import contact_sheet
from mmdit.eval.chance import sync_levels
from mmdit.eval.figures import GLITCH_PAIR, ClipSet, sheet, task_figures
from mmdit.eval.lipsync import evaluate_clip
from mmdit import tasks as tasks_lib
from mmdit.util import preflight
from mmdit.util.files import chmod_as_umask, write_json_atomic

MP4_BYTES_ESTIMATE = 4 << 20  # free space asked per clip (the demo's clips are ~100 KiB)


def eval_batch(data_dir: str, num: int) -> dict:
    ds = open_dataset(data_dir)
    if len(ds) < num:
        raise ValueError(
            f"{data_dir} holds {len(ds)} eval clips, fewer than the {num} asked; write more with mmdit-data synth --num-eval"
        )
    rows = [ds[i] for i in range(num)]
    return {k: np.stack([r[k] for r in rows]) if isinstance(rows[0][k], np.ndarray) else [r[k] for r in rows] for k in rows[0]}


def summarize(per_clip: list[dict]) -> dict:
    corr = np.array([m["sync_corr"] for m in per_clip])
    off = np.array([m["sync_offset"] for m in per_clip])
    out = {
        "sync_corr_mean": float(corr.mean()),
        "sync_corr_median": float(np.median(corr)),
        "sync_offset_median": float(np.median(off)),
        "within_1_frame": float(np.mean(np.abs(off) <= 1)),
        "sync_conf_mean": float(np.mean([m["sync_conf"] for m in per_clip])),
        "num": len(per_clip),
    }
    for k in per_clip[0]:
        if k.startswith(("identity", "background", "hist", "face_found")):
            out[k] = float(np.mean([m[k] for m in per_clip]))
    return out


class ClipDecoder:
    """Decodes sampled latents of a batch of eval clips to what lip sync is scored on.

    ``ClipDecoder(cfg, spec, known, raw)(latents) -> (frames, waves)``: ``latents`` ``{stream: [B, *latent_shape]}``
    (the sampled streams; ``known`` ``{stream: [B, *latent_shape]}``, the batch's given latents, fill the
    others) -> ``frames`` uint8 ``[B, N, H, W, 3]`` at ``fps`` frames/s and ``waves`` float ``[B, T]`` at
    ``sample_rate`` Hz: the audio stream's sound, or for a video-only model its driving audio features'
    (:class:`mmdit.sample.run.Soundtrack`; ``raw``: the batch's raw conditions). ``cfg``: the experiment config
    (``codecs.video``, ``codecs.audio``), ``spec``: its ``ModelSpec``."""

    def __init__(self, cfg, spec, known, raw):
        from mmdit.codecs.registry import make_video_codec
        from mmdit.sample.run import Soundtrack

        self.video_codec = make_video_codec(cfg.codecs.video)
        self.track, self.known, self.raw = Soundtrack.from_config(cfg, spec, tasks_lib.roles(spec, cfg.model)), known, raw
        self.fps, self.sample_rate = float(self.video_codec.fps), self.track.sample_rate
        if self.sample_rate is None:
            raise ValueError(
                "mmdit-eval scores lip sync against the clip's sound, but this model has no audio stream and no "
                "decodable codecs.audio_features to hear its driving audio; use the Sampler API"
            )

    def __call__(self, latents):
        frames, waves, _ = self.track.decode(self.video_codec, {**self.known, **latents}, self.raw)
        return frames, waves


def evaluate(
    cfg,
    params,
    data_dir: str,
    out_dir: str | None = None,
    *,
    num: int | None = None,
    seed: int = 0,
    tasks: tuple[str, ...] | None = None,
    progress: bool = False,
    write_videos: bool = True,
    writer=None,
    step: int = 0,
) -> dict:
    """Samples and scores every task; returns ``{task: summary, "ground_truth": summary}`` and, with
    ``out_dir``, writes MP4s, ``eval.json`` and a contact sheet ``contact_<task>.png`` per task there
    (also logged as image ``contact/<task>`` at ``step`` when a :class:`mmdit.train.metrics.MetricWriter`
    is passed as ``writer``). Each summary also holds :func:`mmdit.eval.figures.task_figures`."""
    from mmdit.model.diffusion import DiffusionModel
    from mmdit.sample.sampler import Sampler

    model = DiffusionModel.from_config(cfg)
    sampler = Sampler(model, cfg, progress=progress)
    num = int(num if num is not None else sampler.defaults.num_per_task)
    tasks = tuple(tasks if tasks is not None else sampler.defaults.tasks)
    if num < 1:
        raise ValueError(f"num={num}: evaluate at least one clip per task (--num >= 1)")
    unknown = [t for t in tasks if t not in tasks_lib.TASKS]
    if unknown:
        raise ValueError(f"--tasks {','.join(tasks)}: unknown task(s) {unknown}; known tasks: {sorted(tasks_lib.TASKS)}")
    batch = eval_batch(data_dir, num)
    if out_dir:  # before sampling: a read-only or full output directory fails now, not after the work
        preflight.check_output_dir(out_dir, len(tasks) * num * MP4_BYTES_ESTIMATE, f"{len(tasks) * num} MP4(s)")
    schema = model.input_spec()
    known, raw = schema.latents_of(batch), schema.conditions_of(batch)
    decode = ClipDecoder(cfg, model.spec, known, raw)
    results, files = {}, []
    gt_frames, gt_waves = decode(known)
    # ±8 frames (SyncNet's window) where the clip is long enough for it, else ±4 (short test clips).
    max_offset = 8 if gt_frames.shape[1] >= 40 else 4
    gt_per_clip = [evaluate_clip(f, w, max_offset=max_offset) for f, w in zip(gt_frames, gt_waves)]
    results["ground_truth"] = summarize(gt_per_clip)
    truth = ClipSet.measure(gt_frames, gt_waves)
    truth_levels = sync_levels(truth.mouths, truth.envelopes, max_offset)
    results["ground_truth"].update(task_figures(truth, truth, truth_levels, None, max_offset))
    sheets = {"ground_truth": sheet(truth, gt_per_clip, "ground truth", decode.sample_rate)}
    for i, task in enumerate(tasks):
        lat = sampler.sample(
            params, jax.random.fold_in(jax.random.key(seed), i), task=task, batch=num, known_latents=known, raw_conds=raw
        )
        frames, waves = decode(lat)
        per_clip = [evaluate_clip(f, w, max_offset=max_offset) for f, w in zip(frames, waves)]
        results[task] = summarize(per_clip)
        clips = ClipSet.measure(frames, waves)
        results[task].update(task_figures(clips, truth, truth_levels, task, max_offset))
        sheets[task] = sheet(clips, per_clip, task, decode.sample_rate)
        if out_dir and write_videos:
            os.makedirs(out_dir, exist_ok=True)
            for j, (f, w) in enumerate(zip(frames, waves)):
                path = os.path.join(out_dir, f"{task}_{j}.mp4")
                media.write_mp4(path, f, decode.fps, w, decode.sample_rate)
                chmod_as_umask(path)  # media.write_mp4 goes through mkstemp (0600)
                files.append({"task": task, "file": path, "text": batch["text"][j], **per_clip[j]})
    sheet_files = {}
    for name, image in sheets.items():
        if out_dir:
            sheet_files[name] = contact_sheet.write_png(os.path.join(out_dir, f"contact_{name}.png"), image)
        if writer is not None:
            writer.video(step, f"contact/{name}", image[None], 1.0)  # a one-frame GIF: an image summary
    if writer is not None:
        writer.flush()
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        write_json_atomic(
            os.path.join(out_dir, "eval.json"), {"summary": results, "samples": files, "contact_sheets": sheet_files}
        )
    return results


def _num(x, width: int, digits: int = 2) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"


def _exp(x, width: int = 9) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.1e}"


def format_table(results: dict) -> str:
    """The table ``mmdit demo`` / ``mmdit-eval`` print: the headline (fraction of the way from chance to
    the ground-truth ceiling, lag-0 and change correlations), each score with its chance level and
    ceiling, the lenient best-lag figure, image quality, and TI2AV identity vs the given frame."""
    head = (
        f"{'task':<13}{'frac@0':>7}{'fracΔ':>7} |{'r@0':>6}{'chance':>7}{'ceil':>6} |{'rΔ':>6}{'chance':>7}{'ceil':>6} |"
        f"{'best':>6}{'chance':>7}{'off':>5} |{'FD':>8}{'floor':>8}{'FDtex':>8}{'floor':>8} |{'flicker':>9}{'median':>9}{'worst':>9}"
        f"{'gt':>9}{'n':>4}"
    )
    lines = [head]
    for task, r in results.items():
        sy = r.get("sync", {})
        cell = lambda k: sy.get(k, {})  # noqa: E731
        z, c, b = cell("sync_corr_at_0"), cell("change_corr"), cell("sync_corr")
        lines.append(
            f"{task:<13}{_num(r.get('fraction_at_0'), 7)}{_num(r.get('fraction_change'), 7)} |"
            f"{_num(z.get('score'), 6)}{_num(z.get('chance_mismatched'), 7)}{_num(z.get('ceiling'), 6)} |"
            f"{_num(c.get('score'), 6)}{_num(c.get('chance_mismatched'), 7)}{_num(c.get('ceiling'), 6)} |"
            f"{_num(r['sync_corr_mean'], 6)}{_num(b.get('chance_mismatched'), 7)}{r['sync_offset_median']:>5.1f} |"
            f"{_num(r.get('fd'), 8)}{_num(r.get('fd_floor'), 8)}{_num(r.get('fd_texture'), 8)}"
            f"{_num(r.get('fd_texture_floor'), 8)} |{_exp(r.get('flicker'))}{_exp(r.get('flicker_median'))}"
            f"{_exp(r.get('flicker_worst_pair'))}{_exp(r.get('flicker_gt'))}{r['num']:>4}"
        )
    lines.append(
        "frac = (score - chance) / (ceiling - chance); chance = mismatched clips (video i, audio j != i); "
        "r@0 = lag-0 correlation, rΔ = correlation of frame-to-frame changes, best = max over lags (lenient); "
        "FD = Fréchet distance to ground-truth frames (tex: gradient features only), floor = ground truth vs ground truth; "
        "flicker = mean squared frame-to-frame change of the background ([0,1]^2; one grey level everywhere = 1.5e-5), "
        "mean and median over clips, worst = the largest change between two consecutive frames of any clip"
    )
    for task, r in results.items():
        if r.get("flicker_glitch_clips", 0.0) > 0.0:
            lines.append(
                f"{task}: a glitched frame (background change > {GLITCH_PAIR:g} between two frames) in "
                f"{round(r['flicker_glitch_clips'] * r['num'])} of {r['num']} clips "
                f"(ground truth {round(r.get('flicker_glitch_clips_gt', 0.0) * r['num'])})"
            )
    for task, r in results.items():
        if r.get("face_found", 1.0) < 1.0:
            lost = round((1.0 - r["face_found"]) * r["num"])
            lines.append(f"{task}: no face found in {lost} of {r['num']} clips (scored on the centred portrait layout)")
    for task, r in results.items():
        if "identity_ref_hist_sim" in r:
            lines.append(
                f"{task} identity vs the given first frame: hist-sim {r['identity_ref_hist_sim']:.3f} "
                f"(ground truth {r['identity_ref_hist_sim_gt']:.3f}), thumb-cos {r['identity_ref_thumb_cos']:.3f} "
                f"(ground truth {r['identity_ref_thumb_cos_gt']:.3f})"
            )
    return "\n".join(lines)
