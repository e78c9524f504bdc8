"""Joint self-attention over concatenated streams, and per-stream cross-attention.

Joint attention (MM-DiT): each stream projects its tokens to q, k, v with its own weights
(``[B, S_s, H, Dh]``), applies qk-RMSNorm (across heads, Wan) and its RoPE; the streams are
concatenated along the sequence, attended under one mask, split back, and each stream applies its
own output projection. Layers outside ``joint_layers`` use the same code with every token's
attention *group* set to its stream, so no pair crosses streams (JAM-Flow's selective joint layers)
-- a block-sparse kernel then skips the cross-stream blocks entirely.

Cross-attention: a stream's queries attend to a condition sequence (text, reference audio, audio
features); with a ``window`` it is restricted by aligned time (TalkingMachines' windowed audio
cross-attention) through the same mask machinery (``local(window)`` between different streams).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmdit.attention import masks
from mmdit.attention import registry as attention_registry
from mmdit.model.layers import RMSNorm, DenseParams, dense, stacked_dense
from mmdit.model.rope import apply_rope
from mmdit.parallel import sequence_parallel_attention


class QKV(nn.Module):
    """``x [B, S, D]`` -> q, k, v ``[B, S, H, Dh]`` with qk-RMSNorm and RoPE (``angles [S, Dh/2]``)."""

    heads: int
    head_dim: int
    eps: float = 1e-6
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, angles, kv_input=None, kv=None):
        """``kv``: precomputed ``(k, v)`` ``[B, L, H, Dh]`` (e.g. a streaming cache of a condition's
        keys/values): only q is projected."""
        inner = self.heads * self.head_dim
        split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.head_dim))
        norm = lambda n, t: RMSNorm(self.eps, param_dtype=self.param_dtype, name=n)(t)

        def project(t, names):  # the named projections of t in one product: a list of [B, S, inner]
            ps = [DenseParams(t.shape[-1], inner, ("embed", "heads"), self.param_dtype, name=n)() for n in names]
            y = stacked_dense(t, ps, self.dtype)
            return [y[..., i, :] for i in range(len(names))]

        if kv is None and kv_input is None:  # self-attention: q, k, v of x in one product
            q, k, v = project(x, ("to_q", "to_k", "to_v"))
        else:  # q of x; a condition's k, v in one product, or given (a cache)
            (q,) = project(x, ("to_q",))
            k, v = project(kv_input, ("to_k", "to_v")) if kv is None else kv
        q = split(norm("norm_q", q))
        if kv is None:
            k, v = split(norm("norm_k", k)), split(v)
        if angles is not None:
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        names = ("batch", "length", "heads", "kv")
        return tuple(nn.with_logical_constraint(t, names) for t in (q, k, v))


def joint_attention(qs, ks, vs, mask: masks.MaskSpec, opts, sequence_parallel: str = "none"):
    """Concatenates per-stream ``[B, S_s, H, Dh]`` q/k/v (dict order), attends, splits back.

    ``mask`` describes the concatenated sequence. Returns ``{stream: [B, S_s, H, Dh]}``."""
    names = list(qs)
    sizes = [qs[n].shape[1] for n in names]
    q = jnp.concatenate([qs[n] for n in names], axis=1)
    k = jnp.concatenate([ks[n] for n in names], axis=1)
    v = jnp.concatenate([vs[n] for n in names], axis=1)
    if mask.num_groups is None:  # groups are 0 (joint layers) or the stream index (per-stream layers)
        mask = dataclasses.replace(mask, num_groups=len(names))
    if sequence_parallel != "none":
        mesh = jax.sharding.get_abstract_mesh()
        out = sequence_parallel_attention(q, k, v, mask, opts, mesh=mesh, strategy=sequence_parallel)
    else:
        out = attention_registry.attend(q, k, v, mask, opts)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    parts = jnp.split(out, np.cumsum(sizes)[:-1].tolist(), axis=1) if len(names) > 1 else [out]
    return dict(zip(names, parts))


def joint_attention_with_context(qs, ks, vs, ctx_ks, ctx_vs, mask: masks.MaskSpec, opts):
    """:func:`joint_attention` whose keys/values are a cached context followed by the current
    tokens: queries ``qs[s] [B, S_s, H, Dh]``; keys ``concat(ctx_ks[s] [B, Sc_s, H, Dh] over
    streams) ++ concat(ks[s] over streams)`` (values alike). ``mask.q`` describes the current
    tokens, ``mask.k`` context then current tokens. Returns ``{stream: [B, S_s, H, Dh]}``.
    (No sequence parallelism: a streaming chunk is short.)"""
    names = list(qs)
    sizes = [qs[n].shape[1] for n in names]
    q = jnp.concatenate([qs[n] for n in names], axis=1)
    k = jnp.concatenate([ctx_ks[n] for n in names] + [ks[n] for n in names], axis=1)
    v = jnp.concatenate([ctx_vs[n] for n in names] + [vs[n] for n in names], axis=1)
    out = attention_registry.attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, opts)
    parts = jnp.split(out, np.cumsum(sizes)[:-1].tolist(), axis=1) if len(names) > 1 else [out]
    return dict(zip(names, parts))


class CrossAttention(nn.Module):
    """Queries from a stream ``x [B, S, D]`` attend a condition ``c [B, L, D]``; ``mask`` is a
    :class:`MaskSpec` over (stream tokens, condition tokens). Output ``[B, S, D]``.

    ``added=True`` (Wan I2V): a second condition ``added = (c2 [B, L2, D], mask2, keep2 [B])`` is
    attended with the same queries through its own key/value projections (``add_k_proj`` with
    RMSNorm ``norm_added_k``, ``add_v_proj``); its output, times ``keep2``, is summed with the first
    one's before the shared output projection."""

    dim: int
    heads: int
    head_dim: int
    eps: float = 1e-6
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32
    added: bool = False

    @nn.compact
    def __call__(self, x, c, mask: masks.MaskSpec, opts, added=None, kv=None):
        """``kv``: the condition's keys/values ``{"k", "v"[, "k2", "v2"]}`` ``[B, L, H, Dh]`` computed
        earlier (they depend on the condition only: a stream computes them once). Returns
        ``(out [B, S, D], kv)``."""
        qkv = QKV(self.heads, self.head_dim, self.eps, self.dtype, self.param_dtype, name="qkv")
        q, k, v = qkv(x, None, kv_input=c, kv=None if kv is None else (kv["k"], kv["v"]))
        used = {"k": k, "v": v}
        o = attention_registry.attend(q, k, v, mask, opts)
        if self.added:
            c2, mask2, keep2 = added
            inner, split = self.heads * self.head_dim, lambda t: t.reshape(t.shape[:2] + (self.heads, self.head_dim))
            if kv is None:
                k2 = dense(inner, ("embed", "heads"), self.dtype, self.param_dtype, name="add_k_proj")(c2)
                k2 = split(RMSNorm(self.eps, param_dtype=self.param_dtype, name="norm_added_k")(k2))
                v2 = split(dense(inner, ("embed", "heads"), self.dtype, self.param_dtype, name="add_v_proj")(c2))
            else:
                k2, v2 = kv["k2"], kv["v2"]
            used.update(k2=k2, v2=v2)
            o2 = attention_registry.attend(q, k2, v2, mask2, opts)
            o = o + o2 * keep2[:, None, None, None].astype(o2.dtype)
        o = o.reshape(o.shape[:2] + (self.heads * self.head_dim,))
        return dense(self.dim, ("heads", "embed"), self.dtype, self.param_dtype, name="to_out")(o), used
