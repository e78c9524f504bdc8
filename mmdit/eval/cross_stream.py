"""Cross-stream probe: how much does denoising one stream use the *other* stream, and its timing?

For each generated stream ``g`` of a multi-stream model, every other stream is given clean (known,
σ = 0, as in TV2A / A2V) and ``g`` is noised to σ. The flow-matching loss of ``g`` is measured with

* ``right``: the true partner streams of the same clip;
* ``other_clip``: the partners of another clip in the batch (batch rolled by one): identity, voice
  and timing all wrong;
* ``time_shifted``: the same clip's partners rolled in time by ``shift`` latent frames (identity
  right, timing wrong).

Ratios ``right / other_clip`` and ``right / time_shifted`` below 1 mean the model reads the other
stream; a ``time_shifted`` ratio of ~1.000 while ``other_clip`` is below 1 means it reads only
clip-global facts (who is speaking) and none of the timing -- the failure that shows up as lip-sync
at chance level. Noise and σ are shared by the three variants, so the ratios are paired comparisons.
A model with no cross-stream attention (``joint_layers=()``) gives exactly 1 for both.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def cross_stream_probe(
    model,
    params,
    latents: Mapping[str, jnp.ndarray],
    raw_conds: Mapping,
    *,
    sigmas: Sequence[float] = (0.3, 0.6, 0.9),
    seeds: int = 4,
    shift: int | None = None,
) -> dict:
    """Losses and ratios per generated stream and σ (see module docstring).

    ``latents``: ``{stream: [B, T, ...]}`` clean latents of ``B >= 2`` clips (time on axis 1);
    ``raw_conds``: the raw conditions of the batch (``text_tokens``...). ``shift`` defaults to
    ``max(1, T // 8)`` latent frames per stream. Returns ``{stream: {sigma: {"right", "other_clip",
    "time_shifted", "ratio_other_clip", "ratio_time_shifted"}}}`` (floats; σ keys as strings).
    """
    names = [a.name for a in model.spec.streams if a.name in latents]
    generated = [n for n in model.spec.generated if n in names]
    if len(names) < 2:
        raise ValueError(f"the cross-stream probe needs at least two streams in the latents, got {names}")
    b = next(iter(latents.values())).shape[0]
    if b < 2:
        raise ValueError(f"the cross-stream probe needs a batch of >= 2 clips (it swaps partners), got {b}")
    lat = {n: jnp.asarray(latents[n], jnp.float32) for n in names}
    tok = model.tokens(lat)
    other_clip = {n: jnp.roll(t, 1, axis=0) for n, t in tok.items()}

    def rolled_in_time(n):
        steps = shift if shift is not None else max(1, lat[n].shape[1] // 8)
        return model.tokens({n: jnp.roll(lat[n], steps, axis=1)})[n]

    time_shifted = {n: rolled_in_time(n) for n in names}

    def loss(gen_tokens, partners, s, key, gen_index):
        gen = generated[gen_index]
        noise = jax.random.normal(key, gen_tokens.shape, gen_tokens.dtype)
        x = (1.0 - s) * gen_tokens + s * noise
        inputs = {**partners, gen: x}
        sigma = {n: jnp.zeros(inputs[n].shape[:2]) for n in names}
        sigma[gen] = jnp.full(x.shape[:2], s)
        known = {n: jnp.ones(inputs[n].shape[:2], bool) for n in names}
        known[gen] = jnp.zeros(x.shape[:2], bool)
        v = model.velocity(params, inputs, sigma, raw_conds, known=known)
        return jnp.mean(jnp.square(v[gen] - (noise - gen_tokens)))

    loss = jax.jit(loss, static_argnums=4)

    out = {}
    for gi, gen in enumerate(generated):
        per_sigma = {}
        for s in sigmas:
            acc = {"right": [], "other_clip": [], "time_shifted": []}
            for seed in range(seeds):
                key = jax.random.fold_in(jax.random.key(seed), gi)
                for label, partners in (("right", tok), ("other_clip", other_clip), ("time_shifted", time_shifted)):
                    p = {n: partners[n] for n in names if n != gen}
                    acc[label].append(float(loss(tok[gen], p, float(s), key, gi)))
            r = {k: float(np.mean(v)) for k, v in acc.items()}
            r["ratio_other_clip"] = r["right"] / r["other_clip"]
            r["ratio_time_shifted"] = r["right"] / r["time_shifted"]
            per_sigma[f"{s:g}"] = r
        out[gen] = per_sigma
    return out


def probe_eval_split(model, params, data_dir: str, num: int = 8, **kwargs) -> dict:
    """:func:`cross_stream_probe` on the first ``num`` clips of an eval split (records directory)."""
    from mmdit.eval.run import eval_batch

    batch = eval_batch(data_dir, num)
    schema = model.input_spec()
    latents, raw = schema.latents_of(batch), schema.conditions_of(batch)
    return cross_stream_probe(model, params, latents, raw, **kwargs)


def format_probe(result: dict) -> str:
    """A table: stream, σ, loss with the right partner, and the two ratios."""
    lines = [f"{'generated':10s} {'sigma':>5s} {'loss':>7s} {'/other clip':>11s} {'/time shifted':>13s}"]
    for gen, per_sigma in result.items():
        for s, r in per_sigma.items():
            lines.append(f"{gen:10s} {s:>5s} {r['right']:7.4f} {r['ratio_other_clip']:11.3f} {r['ratio_time_shifted']:13.3f}")
    return "\n".join(lines)
