"""The MM-DiT: twin (or more) streams with their own weights, coupled by joint self-attention.

Call signature (all dicts keyed by stream / condition name)::

    model = MMDiT(build_spec(config.model))
    v = model.apply(params, tokens, sigma, conds=..., cond_masks=..., cond_keep=..., known=..., valid=...)

* ``tokens[s]``: patchified latents ``[B, S_s, C_s * prod(patch_s)]`` (``StreamSpec.patchify``);
* ``sigma[s]``: per-token noise level ``[B, S_s]`` in [0, 1] (timestep input is ``1000 * sigma``);
* ``conds[c]``: condition features ``[B, L_c, C_c]``; ``cond_masks[c]`` ``[B, L_c]`` valid flags;
  ``cond_keep[c]`` ``[B]`` -- False drops the condition for that sample (classifier-free guidance);
  with ``model.joint_guidance``, ``cond_keep["joint"]`` ``[B]`` False confines that sample's tokens to their
  own stream in every layer (no cross-stream attention: the partner stream guided like a condition);
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
import numpy as np

from mmdit.attention import masks
from mmdit.attention import registry as attention_registry
from mmdit.model.attention import QKV, CrossAttention, joint_attention, joint_attention_with_context
from mmdit.model.layers import (
    MLP,
    ConditionEmbedding,
    ImageEmbedding,
    LayerNorm,
    ModulationTable,
    OutputHead,
    SilenceEmbedding,
    TimestepEmbedding,
    TokenEmbedding,
    dense,
    modulate,
    speaking_per_token,
)
from mmdit.model.inputs import FACE_BOX, SPEAKING_FRAMES
from mmdit.model.rope import angles as rope_angles
from mmdit.model.rope import apply_rope, stream_angles
from mmdit.model.spec import JOINT_KEEP, X0_MIN_SIGMA, ModelSpec, StreamArch

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def _scan_unroll(spec: ModelSpec) -> int:
    """Layers per ``nn.scan`` iteration: all of them on CPU, where XLA's while loop stacks every saved
    activation per layer (zero-filled buffers, dynamic-update-slice / dynamic-slice: ~20% of a train
    step) and models are small enough to compile unrolled; 1 elsewhere (a loop keeps compile time flat).
    Params stay stacked on the ``layers`` axis either way."""
    return spec.num_layers if attention_registry.platform() == "cpu" else 1


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

    def attention_inputs(self, x, mod):
        """``(q, k, v)`` ``[B, S, H, Dh]`` *before* RoPE (the caller rotates; a KV cache keeps k
        unrotated so a cached chunk can be read at any window position) and the modulation."""
        m = self.modulation(mod)
        xn = modulate(self.norm1(x), m[0], m[1]).astype(self.spec.dtype)
        return self.attn(xn, None), m

    def finish(self, x, attn_out, m, conds, cross_masks, cond_keep, cross_kv=None):
        """The layer's rest after joint attention. ``cross_kv``: ``{condition: kv}`` keys/values of the
        cross-attended conditions computed earlier (streaming), else computed here. Returns ``(x,
        {condition: kv used})``."""
        o = attn_out.reshape(attn_out.shape[:2] + (-1,))
        x = x + self.attn_out(o).astype(jnp.float32) * m[2]
        used = {}
        if self.arch.cross:
            h = self.norm2(x).astype(self.spec.dtype)
            for c in self.arch.cross:
                g = self.spec.added_condition(c)
                added = None if g is None else (conds[g], cross_masks[g], cond_keep[g])
                kv = None if cross_kv is None else cross_kv[c]
                y, used[c] = self.cross[c](h, conds[c], cross_masks[c], self.spec.cross_attention, added, kv)
                y = y.astype(jnp.float32)
                if _face_local(self.spec, self.arch, c):  # nothing outside the face box, to_out's bias included
                    y = y * cross_masks[c].q.valid[..., None]
                x = x + y * cond_keep[c][:, None, None]
        y = self.ffn(modulate(self.norm3(x), m[3], m[4]))
        x = x + y.astype(jnp.float32) * m[5]
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), used


def _rebuild_mask(spec: ModelSpec, meta: masks.TokenMeta, block_map=None, is_full=False):
    pred = spec.rule.bind(spec.names)
    bm = None if block_map is None else ((spec.attention.block_q, spec.attention.block_k), block_map)
    return masks.MaskSpec(spec.rule, pred, meta, meta, is_full=is_full, precomputed_block_map=bm)


def _face_local(spec: ModelSpec, arch: StreamArch, condition: str) -> bool:
    """Whether ``arch``'s cross-attention to ``condition`` is restricted to the face box (grid streams only)."""
    return spec.condition(condition).face_local and arch.geometry.kind == "grid"


def _cross_mask(window, q_meta, k_meta, face_local: bool = False):
    rule = masks.Full() if window is None else masks.Local(float(window))
    if face_local:  # the query meta's valid flags mark the tokens inside the face box (MMDiT._cross_meta)
        rule = masks.FaceLocal() if window is None else masks.And(rule, masks.FaceLocal())
    return masks.MaskSpec(rule, rule.bind(("stream", "condition")), q_meta, k_meta, is_full=False, num_groups=1)


class Block(nn.Module):
    """One layer over all streams. ``ctx`` holds the per-forward constants (scan broadcast).

    ``layer = (is_joint, cached)``: ``cached`` is None, or this layer's KV-cache context
    ``{"k": {s: [B, Sc_s, H, Dh]}, "v": {...}}`` (k before RoPE) of earlier chunks, which the queries
    attend besides the current tokens (streaming; ``ctx["kv_meta"]``/``ctx["kv_angles"]`` describe
    it). With ``return_kv`` the layer also returns its own ``{"k", "v"}`` (k before RoPE)."""

    spec: ModelSpec
    static_full: bool = False  # every valid pair attended in every layer (mask-free kernels may run)
    return_kv: bool = False

    @nn.compact
    def __call__(self, xs, layer, ctx):
        sp = self.spec
        is_joint, cached = layer
        parts = {a.name: StreamBlock(a, sp, name=a.name) for a in sp.streams}
        qs, ks, vs, raw_k, mods = {}, {}, {}, {}, {}
        names = ("batch", "length", "heads", "kv")
        for name, part in parts.items():
            (q, raw_k[name], vs[name]), mods[name] = part.attention_inputs(xs[name], ctx["mod"][name])
            ang = ctx["angles"][name]
            qs[name] = nn.with_logical_constraint(apply_rope(q, ang), names)
            ks[name] = nn.with_logical_constraint(apply_rope(raw_k[name], ang), names)
        together = is_joint if ctx.get("keep_joint") is None else is_joint & ctx["keep_joint"][:, None]  # [] or [B, 1]
        joint_group = lambda m: m._replace(group=jnp.where(together, jnp.zeros_like(m.stream), m.stream))  # noqa: E731
        meta = joint_group(ctx["meta"])
        if cached is None:
            bm = None
            if ctx.get("block_maps") is not None:
                joint_bm, separate_bm = ctx["block_maps"]
                bm = jnp.where(is_joint, joint_bm, separate_bm)
            mask = _rebuild_mask(sp, meta, bm, is_full=self.static_full)
            outs = joint_attention(qs, ks, vs, mask, sp.attention, sp.sequence_parallel)
        else:
            ctx_k = {n: apply_rope(cached["k"][n], ctx["kv_angles"][n]) for n in parts}
            k_meta = masks.TokenMeta.concat([joint_group(ctx["kv_meta"]), meta])
            mask = masks.MaskSpec(sp.rule, sp.rule.bind(sp.names), meta, k_meta, num_groups=len(parts))
            outs = joint_attention_with_context(qs, ks, vs, ctx_k, cached["v"], mask, sp.attention)
        new, cross_used = {}, {}
        cross_cache = None if cached is None else cached.get("cross")
        for name, part in parts.items():
            a = sp.stream(name)
            cross_masks = {
                c: _cross_mask(sp.condition(c).window, *ctx["cross_meta"][name][c], _face_local(sp, a, c)) for c in sp.attended(a)
            }
            kv = None if cross_cache is None else cross_cache.get(name)
            new[name], cross_used[name] = part.finish(
                xs[name], outs[name], mods[name], ctx["conds"].get(name, {}), cross_masks, ctx["cond_keep"], kv
            )
        return new, ({"k": raw_k, "v": vs, "cross": cross_used} if self.return_kv else None)


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
        silent = [c for c in sp.attended(a) if sp.condition(c).silence_embedding]
        self.silence = {c: SilenceEmbedding(a.dim, sp.param_dtype, name=f"silence_{c}") for c in silent}
        if not a.geometry.condition:
            self.head = OutputHead(a.dim, a.geometry.token_dim, sp.eps, sp.dtype, sp.param_dtype)
        if a.key_frame_embedding:
            init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",))
            self.key_frame = self.param("key_frame", init, (a.dim,), sp.param_dtype)

    def embed(self, tokens, sigma, conds, chunk_index=0):
        """``(x [B, S, D], temb, modulation, condition embeddings)``. With ``key_frame_embedding`` the tokens of the
        stream's first temporal position get the learned ``key_frame`` vector added -- in a streaming chunk model
        only in chunk 0 (``chunk_index``, int32 scalar, may be traced)."""
        x = self.patch_embedding(tokens).astype(jnp.float32)
        if self.arch.key_frame_embedding:
            first = jnp.asarray(self.arch.geometry.positions()[:, 0] == 0) & (jnp.asarray(chunk_index) == 0)
            x = x + first[None, :, None].astype(jnp.float32) * self.key_frame.astype(jnp.float32)
        temb, mod = self.time_embedding(sigma)
        c = {name: self.cond_embedding[name](conds[name]) for name in self.spec.attended(self.arch)}
        for name, silence in self.silence.items():  # silence mode: the learned embedding where speaking_frames is 0
            arch = self.spec.condition(name)
            times = np.arange(arch.length, dtype=np.float32) * (self.spec.reference_rate / arch.rate)
            speaking = conds.get(SPEAKING_FRAMES)
            if speaking is not None:
                c[name] = silence(c[name], speaking_per_token(speaking, times))
        return x, temb, mod, c

    def output(self, x, temb):
        return self.head(x, temb)


def velocity_from_x0(x_sigma, sigma, x0):
    """The velocity ``v = noise - x0`` implied by a clean-token prediction (``model.prediction="x0"``):
    ``x_sigma = (1 - σ) x0 + σ noise`` gives ``v = (x_sigma - x0) / σ``, with σ clamped below at
    ``X0_MIN_SIGMA`` (JiT's clip: a bounded loss weight near σ = 0, where a sampler's last step still lands
    on ``x0``). ``x_sigma``, ``x0``: ``[B, S, C]``; ``sigma``: ``[B, S]``; returns float32 ``[B, S, C]``."""
    s = jnp.maximum(jnp.asarray(sigma, jnp.float32), X0_MIN_SIGMA)[..., None]
    return (x_sigma.astype(jnp.float32) - x0) / s


def _in_box(arch: StreamArch, box):
    """bool ``[B, S]``: grid tokens whose patch cell overlaps the normalised box ``[B, 4]`` (x0, y0, x1, y1)."""
    g = arch.geometry
    pos = g.positions()  # [S, 3] (t, h, w) token-grid indices
    gh, gw = g.grid[1], g.grid[2]
    y0, y1 = pos[:, 1] / gh, (pos[:, 1] + 1) / gh
    x0, x1 = pos[:, 2] / gw, (pos[:, 2] + 1) / gw
    b = jnp.asarray(box, jnp.float32)[:, :, None]  # [B, 4, 1]
    return (x0 < b[:, 2]) & (x1 > b[:, 0]) & (y0 < b[:, 3]) & (y1 > b[:, 1])


class MMDiT(nn.Module):
    spec: ModelSpec

    def token_meta(self, batch, known, valid, chunk_offset=0, time_offset=0.0) -> masks.TokenMeta:
        """Concatenated metadata ``[B, S]`` of all streams (dict order of ``spec.streams``).

        ``chunk_offset`` (int32 scalar) is added to every token's chunk index and ``time_offset``
        (float32 scalar, reference latent frames) to its aligned time: a streaming chunk model's
        tokens are one chunk long and placed by these (:mod:`mmdit.sample.streaming`)."""
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
                    time=t + jnp.asarray(time_offset, jnp.float32),
                    chunk=chunk,
                    known=kn,
                    valid=valid[a.name] if valid is not None else jnp.ones((1, n), bool),
                    group=jnp.zeros((1, n), jnp.int32),
                )
            )
        return masks.TokenMeta.concat(parts)

    @nn.compact
    def __call__(
        self,
        tokens,
        sigma,
        conds=None,
        cond_masks=None,
        cond_keep=None,
        known=None,
        valid=None,
        *,
        kv_context=None,
        chunk_index=0,
        time_offset=0.0,
        return_kv=False,
    ):
        """Velocities ``{s: [B, S_s, C]}`` (module docstring).

        Streaming (:mod:`mmdit.sample.streaming`; ``self.spec`` is then a one-chunk spec):
        ``chunk_index`` (int32 scalar) and ``time_offset`` (float32 scalar, reference latent frames)
        place the tokens in the stream (chunk ids for the mask, aligned time for RoPE and the mask);
        ``kv_context`` = ``{"k": {s: [L, B, Sc_s, H, Dh]}, "v": {...}, "meta": TokenMeta [B, Sc],
        "time": {s: [Sc_s]}}`` is the cached context the queries attend besides their own tokens
        (k before RoPE; ``meta`` in stream order, ``time`` the aligned times RoPE rotates it at);
        ``kv_context["cross"]`` (optional): ``{s: {condition: {"k", "v"}}}`` ``[L, B, L_c, H, Dh]`` keys/values
        of the cross-attended conditions, used instead of projecting the conditions again;
        ``return_kv=True`` returns ``(velocities, {"k": {s: [L, B, S_s, H, Dh]}, "v": {...}, "cross": ...})``.
        """
        sp = self.spec
        conds, cond_masks = conds or {}, cond_masks or {}
        batch = next(iter(tokens.values())).shape[0]
        self._check_inputs(tokens, sigma, conds)
        if known is None:
            known = {n: sigma[n] == 0 for n in sp.names if n in sigma}
        cond_keep = {c.name: jnp.ones((batch,), bool) for c in sp.conditions} | dict(cond_keep or {})
        if JOINT_KEEP in cond_keep and JOINT_KEEP not in sp.keep_names:
            raise ValueError(f"cond_keep[{JOINT_KEEP!r}] switches cross-stream attention, which needs model.joint_guidance=True")
        keep_joint = None
        if sp.joint_guidance:
            keep_joint = jnp.broadcast_to(jnp.asarray(cond_keep.get(JOINT_KEEP, True), bool), (batch,))
        io = {a.name: StreamIO(a, sp, name=a.name) for a in sp.streams}
        xs, temb, mod, cemb, sigs = {}, {}, {}, {}, {}
        for a in sp.streams:
            sig = sigma[a.name] if a.name in sigma else jnp.zeros((batch, a.geometry.num_tokens), jnp.float32)
            sigs[a.name] = sig
            tok = tokens[a.name]
            if a.geometry.condition and a.name in cond_keep:
                tok = tok * cond_keep[a.name][:, None, None].astype(tok.dtype)  # in-sequence condition dropout
            if a.concat:  # Wan I2V: per-token condition channels joined to the tokens (= channel concat before patchify)
                extra = [conds[c] * cond_keep[c][:, None, None].astype(conds[c].dtype) for c in a.concat]
                tok = jnp.concatenate([tok] + [e.astype(tok.dtype) for e in extra], axis=-1)
            xs[a.name], temb[a.name], mod[a.name], cemb[a.name] = io[a.name].embed(tok, sig, conds, chunk_index)
            xs[a.name] = nn.with_logical_constraint(xs[a.name], ("batch", "length", "embed"))
        meta = self.token_meta(batch, known, valid, chunk_index, time_offset)
        rope = lambda a, t: stream_angles(a.geometry, t, sp.head_dim, sp.rope_theta)  # noqa: E731
        offset = jnp.asarray(time_offset, jnp.float32)
        ctx = {
            "mod": mod,
            "angles": {a.name: rope(a, jnp.asarray(sp.times[a.name]) + offset) for a in sp.streams},
            "meta": meta,
            "conds": cemb,
            "cond_keep": {k: v.astype(jnp.float32) for k, v in cond_keep.items()},
            "cross_meta": self._cross_meta(batch, cond_masks, valid, conds.get(FACE_BOX)),
            "block_maps": None if kv_context is not None else self._block_maps(meta, keep_joint),
            "keep_joint": keep_joint,
        }
        cached = None
        if kv_context is not None:
            ctx["kv_meta"] = kv_context["meta"]
            ctx["kv_angles"] = {a.name: self._context_angles(a, kv_context["time"][a.name]) for a in sp.streams}
            cached = {"k": kv_context["k"], "v": kv_context["v"]}
            if kv_context.get("cross") is not None:  # the conditions' cross-attention keys/values, per layer
                cached["cross"] = kv_context["cross"]
        static_full = (  # per-sample joint switching (model.joint_guidance) makes the groups traced
            isinstance(sp.rule, masks.Full)
            and valid is None
            and len(sp.joint_layers) == sp.num_layers
            and cached is None
            and not sp.joint_guidance
        )
        flags = jnp.asarray(sp.layer_is_joint())
        block = Block
        unroll = _scan_unroll(sp)
        if sp.remat != "none":
            block = nn.remat(block, policy=_REMAT_POLICIES[sp.remat], prevent_cse=not sp.scan or unroll > 1)
        if sp.scan:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast),
                length=sp.num_layers,
                unroll=unroll,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            xs, kv = scanned(sp, static_full, return_kv, name="blocks")(xs, (flags, cached), ctx)
        else:
            per_layer = []
            for i in range(sp.num_layers):
                layer_cache = None if cached is None else jax.tree.map(lambda a: a[i], cached)
                xs, kv_i = block(sp, static_full, return_kv, name=f"blocks_{i}")(xs, (flags[i], layer_cache), ctx)
                per_layer.append(kv_i)
            kv = jax.tree.map(lambda *a: jnp.stack(a), *per_layer) if return_kv else None
        out = {
            a.name: io[a.name].output(xs[a.name], temb[a.name]).astype(jnp.float32)
            for a in sp.streams
            if not a.geometry.condition
        }
        if sp.prediction == "x0":
            out = {n: velocity_from_x0(tokens[n], sigs[n], x0) for n, x0 in out.items()}
        return (out, kv) if return_kv else out

    # -- helpers -------------------------------------------------------------------------------

    def _context_angles(self, arch, times):
        """RoPE angles ``[Sc, Dh/2]`` of a stream's cached context: whole chunks of this (one-chunk)
        spec's tokens, each chunk's tokens at the given aligned ``times [Sc]``."""
        g = arch.geometry
        pos = np.tile(g.positions(), (int(np.shape(times)[0]) // g.num_tokens, 1))
        return rope_angles(times, pos[:, 1], pos[:, 2], self.spec.head_dim, self.spec.rope_theta, rotate_hw=g.kind == "grid")

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

    def _cross_meta(self, batch, cond_masks, valid, face_box=None):
        """Per (stream, condition): (query meta, key meta) for the cross-attention mask. For a ``face_local``
        condition of a grid stream the query meta is valid only on tokens whose patch overlaps ``face_box``
        (float32 ``[B, 4]`` normalised x0, y0, x1, y1; None: the whole frame)."""
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
                q_c = q if face_box is None or not _face_local(sp, a, c) else q._replace(valid=qv & _in_box(a, face_box))
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
                out[a.name][c] = (q_c, k)
        return out

    def _block_maps(self, meta, keep_joint=None):
        """(joint, per-stream) block maps, computed once per forward for block-sparse kernels. ``keep_joint``
        (bool ``[B]`` or None): samples whose joint layers keep their streams apart (``model.joint_guidance``)."""
        sp = self.spec
        if not attention_registry.needs_block_map(sp.attention.impl) or sp.sequence_parallel != "none":
            return None
        pred = sp.rule.bind(sp.names)
        bq, bk = sp.attention.block_q, sp.attention.block_k
        joint_meta = meta if keep_joint is None else meta._replace(group=jnp.where(keep_joint[:, None], 0, meta.stream))
        joint = masks.block_map(pred, joint_meta, joint_meta, bq, bk)
        sep_meta = meta._replace(group=meta.stream)
        separate = masks.block_map(pred, sep_meta, sep_meta, bq, bk)
        return joint, separate
