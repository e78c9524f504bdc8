"""The honest figures of one task's decoded clips against the ground truth, for ``eval.json``.

:func:`task_figures` combines :mod:`mmdit.eval.chance` (sync scores with chance levels, ceiling and the
fraction of the way from chance to ceiling), :mod:`mmdit.eval.image_quality` (Fréchet distance with its
ground-truth floor, background flicker vs ground truth, identity against the given first frame) and
:mod:`mmdit.eval.contact_sheet` (one PNG per task). Clips are per-clip arrays as
:func:`mmdit.eval.lipsync.clip_tracks` returns them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mmdit.eval import contact_sheet
from mmdit.eval.chance import sync_levels, with_ceiling
from mmdit.eval.image_quality import background_flicker_pairs, identity_vs_reference, split_fd
from mmdit.eval.lipsync import FPS, SAMPLE_RATE, clip_tracks
from mmdit.eval.sync_metrics import change_correlation

SHEET_CLIPS = 4  # clips per contact sheet


@dataclasses.dataclass
class ClipSet:
    """Decoded clips of one task (or the ground truth) and their tracks, all lists over clips."""

    frames: list  # uint8 [n, H, W, 3], trimmed to the frames the audio covers
    waves: list  # float32 [T]
    mouths: list  # float32 [n]
    envelopes: list  # float32 [n]

    @classmethod
    def measure(cls, frames, waves, fps: int = FPS, sample_rate: int = SAMPLE_RATE) -> ClipSet:
        out = cls([], [], [], [])
        for f, w in zip(frames, waves):
            x, mouth, env, _ = clip_tracks(f, w, fps, sample_rate)
            out.frames.append(np.round(x * 255).astype(np.uint8))  # x is float in [0, 1]
            out.waves.append(np.asarray(w, np.float32))
            out.mouths.append(mouth)
            out.envelopes.append(env)
        return out


GLITCH_PAIR = 1e-3  # a frame pair's background change above this (~8 grey levels on every pixel) is a glitched frame


def task_figures(clips: ClipSet, truth: ClipSet, truth_levels: dict, task: str | None, max_offset: int) -> dict:
    """JSON-able figures of ``clips`` (one task's samples; ``task=None`` for the ground truth itself)
    against ``truth`` (the same eval records decoded from their true latents) whose
    :func:`~mmdit.eval.chance.sync_levels` are ``truth_levels``.

    Keys: ``sync`` (per metric: score, chance_mismatched, chance_shuffled, ceiling, fraction);
    ``fraction_at_0`` / ``fraction_change`` (the headline: strict metrics, chance -> ceiling);
    ``fd`` / ``fd_floor``; ``flicker`` / ``flicker_gt`` (mean over clips), ``flicker_median`` /
    ``flicker_median_gt`` (median over clips: the typical clip, unmoved by one glitched clip) and
    ``flicker_worst_pair`` / ``flicker_worst_pair_gt`` (the largest change between two consecutive frames of any
    clip: a glitched frame), ``flicker_glitch_clips`` / ``_gt`` (the share of clips with a frame pair above
    :data:`GLITCH_PAIR`); for ``ti2av`` also
    ``identity_ref_hist_sim`` / ``identity_ref_thumb_cos`` vs the given first frame and their ``_gt``
    ceilings.
    """
    levels = truth_levels if task is None else sync_levels(clips.mouths, clips.envelopes, max_offset)
    sync = with_ceiling(levels, truth_levels)
    out = {
        "sync": sync,
        "fraction_at_0": sync["sync_corr_at_0"]["fraction"],
        "fraction_change": sync["change_corr"]["fraction"],
        **split_fd(clips.frames, truth.frames),
    }
    for suffix, frames in (("", clips.frames), ("_gt", truth.frames)):
        pairs = [background_flicker_pairs(x) for x in frames]
        per_clip = [float(p.mean()) for p in pairs]
        out["flicker" + suffix] = float(np.mean(per_clip))
        out["flicker_median" + suffix] = float(np.median(per_clip))
        out["flicker_worst_pair" + suffix] = float(max(p.max() for p in pairs))
        out["flicker_glitch_clips" + suffix] = float(np.mean([p.max() > GLITCH_PAIR for p in pairs]))
    if task == "ti2av":
        ref = [identity_vs_reference(x, t[0]) for x, t in zip(clips.frames, truth.frames)]
        ceil = [identity_vs_reference(t, t[0]) for t in truth.frames]
        for k in ref[0]:
            out[k] = float(np.mean([r[k] for r in ref]))
            out[k + "_gt"] = float(np.mean([r[k] for r in ceil]))
    return out


def sheet(clips: ClipSet, per_clip: list[dict], name: str, sample_rate: int) -> np.ndarray:
    """The contact sheet (uint8 ``[H, W, 3]``) of the first :data:`SHEET_CLIPS` clips, captioned with
    each clip's lag-0, change and best-lag correlations (``per_clip``: :func:`evaluate_clip` results)."""
    k = min(SHEET_CLIPS, len(clips.frames))
    labels = [
        f"{name} #{j}  r0 {m['sync_corr_at_0']:+.2f}  chg {change_correlation(clips.mouths[j], clips.envelopes[j]):+.2f}"
        f"  best {m['sync_corr']:+.2f}@{int(m['sync_offset']):+d}"
        for j, m in enumerate(per_clip[:k])
    ]
    return contact_sheet.render(
        clips.frames[:k], clips.waves[:k], clips.mouths[:k], clips.envelopes[:k], labels, sample_rate=sample_rate
    )
