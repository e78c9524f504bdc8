"""The MM-DiT: twin (or more) streams with their own weights, coupled by joint self-attention.

Call signature (all dicts keyed by stream / condition name)::

    model = MMDiT(build_spec(config.model))
    v = model.apply(params, tokens, sigma, conds=..., cond_masks=..., cond_keep=..., known=..., valid=...)

* ``tokens[s]``: patchified latents ``[B, S_s, C_s * prod(patch_s)]`` (``StreamSpec.patchify``);
* ``sigma[s]``: per-token noise level ``[B, S_s]`` in [0, 1] (timestep input is ``1000 * sigma``);
* ``conds[c]``: condition features ``[B, L_c, C_c]``; ``cond_masks[c]`` ``[B, L_c]`` valid flags;
  ``cond_keep[c]`` ``[B]`` -- False drops the condition for that sample (classifier-free guidance);
  a condition in ``model.streams.<s>.concat`` is per token, ``[B, S_s, C_c]``, joined to the stream's tokens
  before its patch embedding; one with ``added_to=h`` is attended inside ``h``'s cross-attention (Wan I2V);
* ``known[s]`` ``[B, S_s]`` clean tokens (default ``sigma == 0``); ``valid[s]`` ``[B, S_s]`` (False:
  absent stream / padding, never attended);
* returns the predicted velocity ``{s: [B, S_s, C_s * prod(patch_s)]}`` for generated streams.

Parameters: ``params[s]`` holds stream ``s``'s embeddings and output head, ``params["blocks"][s]``
its per-layer weights stacked on a leading ``layers`` axis (``nn.scan``).
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from mmdit.attention import masks
from mmdit.attention import registry as attention_registry
from mmdit.model.attention import QKV, CrossAttention, joint_attention
from mmdit.model.layers import (
    MLP,
    ConditionEmbedding,
    ImageEmbedding,
    LayerNorm,
    ModulationTable,
    OutputHead,
    TimestepEmbedding,
    TokenEmbedding,
    dense,
    modulate,
)
from mmdit.model.rope import joint_angles
from mmdit.model.spec import ModelSpec, StreamArch

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


class StreamBlock(nn.Module):
    """One stream's share of one layer (Wan's WanTransformerBlock, split around joint attention)."""

    arch: StreamArch
    spec: ModelSpec

    def setup(self):
        sp, a = self.spec, self.arch
        self.modulation = ModulationTable(6, a.dim, sp.param_dtype)
        self.norm1 = LayerNorm(sp.eps)
        self.attn = QKV(sp.heads, sp.head_dim, sp.eps, sp.dtype, sp.param_dtype)
        self.attn_out = dense(a.dim, ("heads", "embed"), sp.dtype, sp.param_dtype)
        if a.cross:
            self.norm2 = LayerNorm(sp.eps, affine=True, param_dtype=sp.param_dtype)
            self.cross = {
                c: CrossAttention(
                    a.dim, sp.heads, sp.head_dim, sp.eps, sp.dtype, sp.param_dtype, added=sp.added_condition(c) is not None
                )
                for c in a.cross
            }
        self.norm3 = LayerNorm(sp.eps)
        self.ffn = MLP(a.dim, a.ffn, sp.dtype, sp.param_dtype)

    def attention_inputs(self, x, mod, angles):
        m = self.modulation(mod)
        xn = modulate(self.norm1(x), m[0], m[1]).astype(self.spec.dtype)
        return self.attn(xn, angles), m

    def finish(self, x, attn_out, m, conds, cross_masks, cond_keep):
        o = attn_out.reshape(attn_out.shape[:2] + (-1,))
        x = x + self.attn_out(o).astype(jnp.float32) * m[2]
        if self.arch.cross:
            h = self.norm2(x).astype(self.spec.dtype)
            for c in self.arch.cross:
                g = self.spec.added_condition(c)
                added = None if g is None else (conds[g], cross_masks[g], cond_keep[g])
                y = self.cross[c](h, conds[c], cross_masks[c], self.spec.cross_attention, added).astype(jnp.float32)
                x = x + y * cond_keep[c][:, None, None]
        y = self.ffn(modulate(self.norm3(x), m[3], m[4]))
        x = x + y.astype(jnp.float32) * m[5]
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _rebuild_mask(spec: ModelSpec, meta: masks.TokenMeta, block_map=None, is_full=False):
    pred = spec.rule.bind(spec.names)
    bm = None if block_map is None else ((spec.attention.block_q, spec.attention.block_k), block_map)
    return masks.MaskSpec(spec.rule, pred, meta, meta, is_full=is_full, precomputed_block_map=bm)


def _cross_mask(window, q_meta, k_meta):
    rule = masks.Full() if window is None else masks.Local(float(window))
    return masks.MaskSpec(rule, rule.bind(("stream", "condition")), q_meta, k_meta, is_full=False, num_groups=1)


class Block(nn.Module):
    """One layer over all streams. ``ctx`` holds the per-forward constants (scan broadcast)."""

    spec: ModelSpec
    static_full: bool = False  # every valid pair attended in every layer (mask-free kernels may run)

    @nn.compact
    def __call__(self, xs, is_joint, ctx):
        sp = self.spec
        parts = {a.name: StreamBlock(a, sp, name=a.name) for a in sp.streams}
        qs, ks, vs, mods = {}, {}, {}, {}
        for name, part in parts.items():
            (qs[name], ks[name], vs[name]), mods[name] = part.attention_inputs(xs[name], ctx["mod"][name], ctx["angles"][name])
        meta = ctx["meta"]
        meta = meta._replace(group=jnp.where(is_joint, jnp.zeros_like(meta.stream), meta.stream))
        bm = None
        if ctx.get("block_maps") is not None:
            joint_bm, separate_bm = ctx["block_maps"]
            bm = jnp.where(is_joint, joint_bm, separate_bm)
        mask = _rebuild_mask(sp, meta, bm, is_full=self.static_full)
        outs = joint_attention(qs, ks, vs, mask, sp.attention, sp.sequence_parallel)
        new = {}
        for name, part in parts.items():
            a = sp.stream(name)
            cross_masks = {c: _cross_mask(sp.condition(c).window, *ctx["cross_meta"][name][c]) for c in sp.attended(a)}
            new[name] = part.finish(xs[name], outs[name], mods[name], ctx["conds"].get(name, {}), cross_masks, ctx["cond_keep"])
        return new, None


class StreamIO(nn.Module):
    """A stream's input embedding, timestep embedding, condition embeddings and output head."""

    arch: StreamArch
    spec: ModelSpec

    def setup(self):
        sp, a = self.spec, self.arch
        self.patch_embedding = TokenEmbedding(a.dim, sp.dtype, sp.param_dtype)
        self.time_embedding = TimestepEmbedding(a.dim, sp.freq_dim, 6, sp.dtype, sp.param_dtype)
        embedding = lambda c: ImageEmbedding if sp.condition(c).embedding == "norm_mlp" else ConditionEmbedding  # noqa: E731
        self.cond_embedding = {c: embedding(c)(a.dim, sp.dtype, sp.param_dtype) for c in sp.attended(a)}
        if not a.geometry.condition:
            self.head = OutputHead(a.dim, a.geometry.token_dim, sp.eps, sp.dtype, sp.param_dtype)

    def embed(self, tokens, sigma, conds):
        x = self.patch_embedding(tokens).astype(jnp.float32)
        temb, mod = self.time_embedding(sigma)
        c = {name: self.cond_embedding[name](conds[name]) for name in self.spec.attended(self.arch)}
        return x, temb, mod, c

    def output(self, x, temb):
        return self.head(x, temb)


class MMDiT(nn.Module):
    spec: ModelSpec

    def token_meta(self, batch, known, valid, chunk_offset=0) -> masks.TokenMeta:
        """Concatenated metadata ``[B, S]`` of all streams (dict order of ``spec.streams``)."""
        sp = self.spec
        parts = []
        for i, a in enumerate(sp.streams):
            n = a.geometry.num_tokens
            t = jnp.asarray(sp.times[a.name])[None]
            chunk = (
                jnp.zeros((1, n), jnp.int32)
                if sp.chunk_frames is None
                else (jnp.floor(t / sp.chunk_frames + 1e-4).astype(jnp.int32) + chunk_offset)
            )
            kn = jnp.ones((batch, n), bool) if a.geometry.condition else known[a.name]
            parts.append(
                masks.TokenMeta(
                    stream=jnp.full((1, n), i, jnp.int32),
                    time=t,
                    chunk=chunk,
                    known=kn,
                    valid=valid[a.name] if valid is not None else jnp.ones((1, n), bool),
                    group=jnp.zeros((1, n), jnp.int32),
                )
            )
        return masks.TokenMeta.concat(parts)

    @nn.compact
    def __call__(self, tokens, sigma, conds=None, cond_masks=None, cond_keep=None, known=None, valid=None):
        sp = self.spec
        conds, cond_masks = conds or {}, cond_masks or {}
        batch = next(iter(tokens.values())).shape[0]
        self._check_inputs(tokens, sigma, conds)
        if known is None:
            known = {n: sigma[n] == 0 for n in sp.names if n in sigma}
        cond_keep = {c.name: jnp.ones((batch,), bool) for c in sp.conditions} | dict(cond_keep or {})
        io = {a.name: StreamIO(a, sp, name=a.name) for a in sp.streams}
        xs, temb, mod, cemb = {}, {}, {}, {}
        for a in sp.streams:
            sig = sigma[a.name] if a.name in sigma else jnp.zeros((batch, a.geometry.num_tokens), jnp.float32)
            tok = tokens[a.name]
            if a.geometry.condition and a.name in cond_keep:
                tok = tok * cond_keep[a.name][:, None, None].astype(tok.dtype)  # in-sequence condition dropout
            if a.concat:  # Wan I2V: per-token condition channels joined to the tokens (= channel concat before patchify)
                extra = [conds[c] * cond_keep[c][:, None, None].astype(conds[c].dtype) for c in a.concat]
                tok = jnp.concatenate([tok] + [e.astype(tok.dtype) for e in extra], axis=-1)
            xs[a.name], temb[a.name], mod[a.name], cemb[a.name] = io[a.name].embed(tok, sig, conds)
            xs[a.name] = nn.with_logical_constraint(xs[a.name], ("batch", "length", "embed"))
        meta = self.token_meta(batch, known, valid)
        ctx = {
            "mod": mod,
            "angles": joint_angles({a.name: a.geometry for a in sp.streams}, sp.times, sp.head_dim, sp.rope_theta),
            "meta": meta,
            "conds": cemb,
            "cond_keep": {k: v.astype(jnp.float32) for k, v in cond_keep.items()},
            "cross_meta": self._cross_meta(batch, cond_masks, valid),
            "block_maps": self._block_maps(meta),
        }
        static_full = isinstance(sp.rule, masks.Full) and valid is None and len(sp.joint_layers) == sp.num_layers
        flags = jnp.asarray(sp.layer_is_joint())
        block = Block
        if sp.remat != "none":
            block = nn.remat(block, policy=_REMAT_POLICIES[sp.remat], prevent_cse=not sp.scan)
        if sp.scan:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast),
                length=sp.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            xs, _ = scanned(sp, static_full, name="blocks")(xs, flags, ctx)
        else:
            for i in range(sp.num_layers):
                xs, _ = block(sp, static_full, name=f"blocks_{i}")(xs, flags[i], ctx)
        return {
            a.name: io[a.name].output(xs[a.name], temb[a.name]).astype(jnp.float32)
            for a in sp.streams
            if not a.geometry.condition
        }

    # -- helpers -------------------------------------------------------------------------------

    def _check_inputs(self, tokens, sigma, conds):
        sp = self.spec
        for a in sp.streams:
            if a.name not in tokens:
                raise ValueError(f"missing tokens for stream {a.name!r}; got streams {sorted(tokens)}")
            want = (a.geometry.num_tokens, a.geometry.token_dim)
            if tuple(tokens[a.name].shape[1:]) != want:
                raise ValueError(
                    f"stream {a.name!r}: tokens have shape {tuple(tokens[a.name].shape)}, model expects "
                    f"[B, {want[0]}, {want[1]}] (model.streams.{a.name}.shape/patch/channels)"
                )
            if not a.geometry.condition and a.name not in sigma:
                raise ValueError(f"missing sigma for generated stream {a.name!r}")
        for c in {c for a in sp.streams for c in sp.attended(a) + a.concat}:
            if c not in conds:
                raise ValueError(
                    f"condition {c!r} is cross-attended or concatenated (model.streams.*.cross / concat) but not given"
                )

    def _cross_meta(self, batch, cond_masks, valid):
        """Per (stream, condition): (query meta, key meta) for the cross-attention mask."""
        sp = self.spec
        out = {}
        for a in sp.streams:
            out[a.name] = {}
            n = a.geometry.num_tokens
            qv = valid[a.name] if valid is not None else jnp.ones((1, n), bool)
            q = masks.TokenMeta(
                stream=jnp.zeros((1, n), jnp.int32),
                time=jnp.asarray(sp.times[a.name])[None],
                chunk=jnp.zeros((1, n), jnp.int32),
                known=jnp.zeros((1, n), bool),
                valid=qv,
                group=jnp.zeros((1, n), jnp.int32),
            )
            for c in sp.attended(a):
                arch = sp.condition(c)
                L = arch.length
                if arch.rate is not None:
                    t = jnp.arange(L, dtype=jnp.float32)[None] * (sp.reference_rate / arch.rate)
                else:
                    t = jnp.zeros((1, L), jnp.float32)
                kv = cond_masks.get(c, jnp.ones((1, L), bool))
                k = masks.TokenMeta(
                    stream=jnp.ones((1, L), jnp.int32),
                    time=t,
                    chunk=jnp.zeros((1, L), jnp.int32),
                    known=jnp.ones((1, L), bool),
                    valid=kv,
                    group=jnp.zeros((1, L), jnp.int32),
                )
                out[a.name][c] = (q, k)
        return out

    def _block_maps(self, meta):
        """(joint, per-stream) block maps, computed once per forward for block-sparse kernels."""
        sp = self.spec
        if not attention_registry.needs_block_map(sp.attention.impl) or sp.sequence_parallel != "none":
            return None
        pred = sp.rule.bind(sp.names)
        bq, bk = sp.attention.block_q, sp.attention.block_k
        joint = masks.block_map(pred, meta, meta, bq, bk)
        sep_meta = meta._replace(group=meta.stream)
        separate = masks.block_map(pred, sep_meta, sep_meta, bq, bk)
        return joint, separate
