"""The trainable model as a whole: condition encoders (when trained jointly) + the MM-DiT.

Params: ``{"dit": MMDiT params, "text_encoder": ByteTextEncoder params (only for the embedded
byte-level text path)}``. Raw conditions come from records / sampler inputs as
:meth:`DiffusionModel.input_spec` describes them (:mod:`mmdit.model.inputs`): ``text_tokens`` int32
``[B, L]`` when the byte text encoder is on (encoded here), else features ``[B, L_c, C_c]`` (+ an
optional ``c_mask`` bool ``[B, L_c]``) per condition; ``speaking_frames`` / ``face_box`` (silence
embedding, face-local masks) pass through to the DiT in its ``conds`` under their own names. Derived
conditions (``model.conditions.<c>.derived``: ``first_frame``) are no input: :meth:`DiffusionModel.velocity`
computes them from the tokens (:mod:`mmdit.model.derived_conditions`).

Latents are per stream ``[B, *latent_shape]``; :meth:`DiffusionModel.velocity` patchifies, runs the
DiT and returns velocities in token space ``[B, S, C * prod(patch)]``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmdit.model import inputs
from mmdit.model.chunks import check_chunking
from mmdit.model.derived_conditions import derived_conditions
from mmdit.model.mmdit import MMDiT
from mmdit.model.spec import ModelSpec, build_spec
from mmdit.model.text_encoder import ByteTextEncoder


def _batch_of(raw: dict) -> int:
    """The batch size of a raw-condition dict (its first array's leading dim)."""
    return int(np.shape(next(iter(raw.values())))[0])


@dataclasses.dataclass(frozen=True, eq=False)
class DiffusionModel:
    spec: ModelSpec
    text_encoder: object | None  # a flax module (ByteTextEncoder) or None

    @classmethod
    def from_config(cls, cfg) -> "DiffusionModel":
        spec = build_spec(cfg.model)
        check_chunking(spec)  # model.chunk_frames must cut every stream into whole tokens and chunks
        enc = None
        te = cfg.model.get("text_encoder", None)
        if te is not None and te.get("kind", "byte") == "byte":
            if "text" not in [c.name for c in spec.conditions]:
                raise ValueError("model.text_encoder is set but model.conditions has no 'text'")
            dim = spec.condition("text").dim
            if te.get("dim", dim) != dim:
                raise ValueError(f"model.text_encoder.dim={te.dim} must equal model.conditions.text.dim={dim}")
            enc = ByteTextEncoder(
                dim=dim, layers=int(te.get("layers", 2)), heads=int(te.get("heads", 4)), max_len=spec.condition("text").length
            )
        return cls(spec, enc)

    @property
    def dit(self) -> MMDiT:
        return MMDiT(self.spec)

    # -- inputs ------------------------------------------------------------------------------

    def input_spec(self) -> inputs.InputSpec:
        """Every input array of this model: names, per-example shapes, dtypes, roles (built once)."""
        return self._input_spec

    @functools.cached_property
    def _input_spec(self) -> inputs.InputSpec:
        return inputs.input_spec(self.spec, ("text",) if self.text_encoder is not None else ())

    def tokens(self, latents: dict) -> dict:
        return {a.name: a.geometry.patchify(latents[a.name]) for a in self.spec.streams if a.name in latents}

    def latents(self, tokens: dict) -> dict:
        return {n: self.spec.stream(n).geometry.unpatchify(t) for n, t in tokens.items()}

    def encode_conditions(self, params, raw: dict):
        """Raw conditions (fields of :meth:`input_spec`) -> (features ``{c: [B, L, C]}``, masks
        ``{c: [B, L]}``); a condition without a mask gets none (all tokens attended)."""
        conds, masks = {}, {}
        fields = self.input_spec().condition_fields
        for c in self.spec.conditions:
            for f in (f for f in fields if f.source == c.name):
                if f.name not in raw:
                    if f.optional:
                        continue
                    raise ValueError(
                        f"condition {c.name!r} (model.conditions) needs input {f.name!r} "
                        f"{np.dtype(f.dtype).name} [B, {', '.join(map(str, f.shape))}]; have {sorted(raw)}"
                    )
                if f.role == "tokens":
                    conds[c.name], masks[c.name] = self.text_encoder.apply(params["text_encoder"], raw[f.name])
                elif f.role == "features":
                    conds[c.name] = raw[f.name]
                else:
                    masks[c.name] = raw[f.name]
        for f in self.input_spec().by_role("speaking", "region"):  # per-clip inputs, read by the DiT from conds
            conds[f.name] = raw[f.name] if f.name in raw else f.default(_batch_of(raw))
        return conds, masks

    # -- init / apply ------------------------------------------------------------------------

    def dummy_inputs(self, batch: int = 1):
        """Zero ``(tokens, sigma, raw_conds)`` of batch ``batch`` (raw conditions: every field of
        :meth:`input_spec`, masks all True)."""
        sp = self.spec
        tokens = {a.name: jnp.zeros((batch, a.geometry.num_tokens, a.geometry.token_dim)) for a in sp.streams}
        sigma = {a.name: jnp.zeros((batch, a.geometry.num_tokens)) for a in sp.streams if not a.geometry.condition}
        return tokens, sigma, self.input_spec().zero_conditions(batch)

    def init(self, rng, batch: int = 1) -> dict:
        """Fresh params ``{"dit": ..., "text_encoder": ... (with a text encoder)}``, boxed (``nn.Partitioned``).
        Jitted: the init forward compiles once instead of dispatching op by op (the tiny demo model: 22 s ->
        7 s on 2 CPU cores); under an outer jit or ``jax.eval_shape`` (the train and export paths) it traces
        as before, and their params are bit-identical."""
        return self._jitted_init(rng, batch=batch)

    @functools.cached_property
    def _jitted_init(self):
        return jax.jit(self._init, static_argnames="batch")

    def _init(self, rng, batch: int) -> dict:
        tokens, sigma, raw = self.dummy_inputs(batch)
        k_dit, k_txt = jax.random.split(rng)
        params = {}
        if self.text_encoder is not None:
            params["text_encoder"] = self.text_encoder.init(k_txt, raw["text" + inputs.TOKENS_SUFFIX])
        conds, masks = self.encode_conditions(params, raw)
        conds.update(derived_conditions(self.spec, tokens))
        params["dit"] = self.dit.init(k_dit, tokens, sigma, conds, masks)
        return params

    def velocity(self, params, tokens, sigma, raw_conds, *, cond_keep=None, known=None, valid=None):
        """Velocities ``{generated s: [B, S_s, C_s * prod(patch)]}`` of ``tokens`` (every stream) at
        per-token ``sigma``. Derived conditions (``first_frame``) are computed here from ``tokens``: they
        carry information only where the task gives those tokens clean, and ``cond_keep`` (the task's
        ``present`` AND condition dropout / CFG) zeroes them everywhere else."""
        conds, masks = self.encode_conditions(params, raw_conds)
        conds.update(derived_conditions(self.spec, tokens))
        return self.dit.apply(params["dit"], tokens, sigma, conds, masks, cond_keep, known, valid)
