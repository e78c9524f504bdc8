"""The trainable model as a whole: condition encoders (when trained jointly) + the MM-DiT.

Params: ``{"dit": MMDiT params, "text_encoder": ByteTextEncoder params (only for the embedded
byte-level text path)}``. Raw conditions come from records / sampler inputs:

* ``text_tokens`` int32 ``[B, L]`` (byte tokenizer, encoded here), or ``text`` features
  ``[B, L, C]`` precomputed offline (UMT5) with an optional ``text_mask`` ``[B, L]``;
* any other condition ``c`` as features ``[B, L_c, C_c]`` (+ ``c_mask``).

Latents are per stream ``[B, *latent_shape]``; :meth:`DiffusionModel.velocity` patchifies, runs the
DiT and returns velocities in token space ``[B, S, C * prod(patch)]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mmdit.model.mmdit import MMDiT
from mmdit.model.spec import ModelSpec, build_spec


@dataclasses.dataclass(frozen=True, eq=False)
class DiffusionModel:
    spec: ModelSpec
    text_encoder: object | None  # a flax module (ByteTextEncoder) or None

    @classmethod
    def from_config(cls, cfg) -> "DiffusionModel":
        spec = build_spec(cfg.model)
        enc = None
        te = cfg.model.get("text_encoder", None)
        if te is not None and te.get("kind", "byte") == "byte":
            from mmdit.codecs.text import ByteTextEncoder

            if "text" not in [c.name for c in spec.conditions]:
                raise ValueError("model.text_encoder is set but model.conditions has no 'text'")
            dim = spec.condition("text").dim
            if te.get("dim", dim) != dim:
                raise ValueError(f"model.text_encoder.dim={te.dim} must equal model.conditions.text.dim={dim}")
            enc = ByteTextEncoder(dim=dim, layers=int(te.get("layers", 2)), heads=int(te.get("heads", 4)), max_len=spec.condition("text").length)
        return cls(spec, enc)

    @property
    def dit(self) -> MMDiT:
        return MMDiT(self.spec)

    # -- inputs ------------------------------------------------------------------------------

    def tokens(self, latents: dict) -> dict:
        return {a.name: a.spec.patchify(latents[a.name]) for a in self.spec.streams if a.name in latents}

    def latents(self, tokens: dict) -> dict:
        return {n: self.spec.stream(n).spec.unpatchify(t) for n, t in tokens.items()}

    def encode_conditions(self, params, raw: dict):
        """Raw conditions -> (features ``{c: [B, L, C]}``, masks ``{c: [B, L]}``)."""
        conds, masks = {}, {}
        for c in self.spec.conditions:
            if c.name == "text" and self.text_encoder is not None:
                if "text_tokens" not in raw:
                    raise ValueError("the byte text encoder needs `text_tokens` int32 [B, L] in the batch")
                conds["text"], masks["text"] = self.text_encoder.apply(params["text_encoder"], raw["text_tokens"])
            elif c.name in raw:
                conds[c.name] = raw[c.name]
                if c.name + "_mask" in raw:
                    masks[c.name] = raw[c.name + "_mask"]
            else:
                raise ValueError(f"condition {c.name!r} (model.conditions) is missing from the inputs; have {sorted(raw)}")
        return conds, masks

    # -- init / apply ------------------------------------------------------------------------

    def dummy_inputs(self, batch: int = 1):
        sp = self.spec
        tokens = {a.name: jnp.zeros((batch, a.spec.num_tokens, a.spec.token_dim)) for a in sp.streams}
        sigma = {a.name: jnp.zeros((batch, a.spec.num_tokens)) for a in sp.streams if not a.spec.condition}
        raw = {}
        for c in sp.conditions:
            if c.name == "text" and self.text_encoder is not None:
                raw["text_tokens"] = jnp.zeros((batch, c.length), jnp.int32)
            else:
                raw[c.name] = jnp.zeros((batch, c.length, c.dim))
        return tokens, sigma, raw

    def init(self, rng, batch: int = 1) -> dict:
        tokens, sigma, raw = self.dummy_inputs(batch)
        k_dit, k_txt = jax.random.split(rng)
        params = {}
        if self.text_encoder is not None:
            params["text_encoder"] = self.text_encoder.init(k_txt, raw["text_tokens"])
        conds, masks = self.encode_conditions(params, raw)
        params["dit"] = self.dit.init(k_dit, tokens, sigma, conds, masks)
        return params

    def velocity(self, params, tokens, sigma, raw_conds, *, cond_keep=None, known=None, valid=None):
        conds, masks = self.encode_conditions(params, raw_conds)
        return self.dit.apply(params["dit"], tokens, sigma, conds, masks, cond_keep, known, valid)
