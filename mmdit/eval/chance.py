"""Chance levels and the ground-truth ceiling for the sync figures of a set of clips.

For the clips of one task (their mouth tracks ``m_i`` and audio envelopes ``e_i``, float ``[N]`` per
video frame), each metric of :func:`mmdit.eval.sync_metrics.pair_metrics` gets

* ``score`` -- the mean over the matched pairs ``(m_i, e_i)``;
* ``chance_mismatched`` -- the mean over every mismatched pair ``(m_i, e_j)``, ``j != i``: the same
  mouths and the same sounds, from different clips (needs >= 2 clips, else None);
* ``chance_shuffled`` -- the mean over the matched pairs with the envelope cut into
  ``SHUFFLE_BLOCK``-frame blocks put in random order (``SHUFFLE_DRAWS`` draws per clip, fixed seed);
* ``ceiling`` -- the same metric on the eval records' own video + audio through the same codecs;
* ``fraction`` -- :func:`~mmdit.eval.sync_metrics.fraction_of_way` from ``chance_mismatched`` to the
  ceiling (0 = chance, 1 = as synced as the ground truth).

Chance is computed per task from that task's own outputs, so a model that never moves the mouth, or
that makes every clip the same, is measured against what its own clips score unpaired.
"""

from __future__ import annotations

import numpy as np

from mmdit.eval.sync_metrics import SYNC_METRICS, block_shuffle, fraction_of_way, pair_metrics

SHUFFLE_BLOCK = 4  # frames (0.16 s at 25 fps, about a syllable)
SHUFFLE_DRAWS = 4


def _mean_metrics(rows: list[dict]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in SYNC_METRICS}


def sync_levels(mouths, envelopes, max_offset: int = 8, seed: int = 0) -> dict[str, dict[str, float | None]]:
    """``{metric: {score, chance_mismatched, chance_shuffled}}`` for matched tracks ``mouths[i]``,
    ``envelopes[i]`` (each float ``[N]``; ``N`` may differ between clips only if mismatched pairs are
    trimmed to the shorter, which this does)."""
    if len(mouths) != len(envelopes) or not len(mouths):
        raise ValueError(f"sync_levels: {len(mouths)} mouth tracks vs {len(envelopes)} envelopes; pass one of each per clip")
    rng = np.random.default_rng(seed)
    matched = [pair_metrics(m, e, max_offset) for m, e in zip(mouths, envelopes)]
    mismatched = []
    for i, m in enumerate(mouths):
        for j, e in enumerate(envelopes):
            if i != j:
                n = min(len(m), len(e))
                mismatched.append(pair_metrics(m[:n], e[:n], max_offset))
    shuffled = [
        pair_metrics(m, block_shuffle(e, SHUFFLE_BLOCK, rng), max_offset)
        for m, e in zip(mouths, envelopes)
        for _ in range(SHUFFLE_DRAWS)
    ]
    score, shuf = _mean_metrics(matched), _mean_metrics(shuffled)
    mis = _mean_metrics(mismatched) if mismatched else dict.fromkeys(SYNC_METRICS)
    return {k: {"score": score[k], "chance_mismatched": mis[k], "chance_shuffled": shuf[k]} for k in SYNC_METRICS}


def with_ceiling(levels: dict, ceiling_levels: dict) -> dict:
    """``levels`` (from :func:`sync_levels`) with ``ceiling`` (the ground truth's ``score``) and
    ``fraction`` (chance_mismatched -> ceiling) added to every metric."""
    out = {}
    for k, v in levels.items():
        ceiling = ceiling_levels[k]["score"]
        out[k] = {**v, "ceiling": ceiling, "fraction": fraction_of_way(v["score"], v["chance_mismatched"], ceiling)}
    return out
