"""Parameter counts, token counts and FLOPs of a model, from shapes only (``jax.eval_shape``).

FLOPs follow docs/design.md (FLOPs and MFU): a training step costs ``6·N·T + 12·ρ·L·B·S²·H·Dh`` where ``N`` counts
the per-token matmul params (no embeddings, no adaLN MLP), ``T = B·S`` tokens, ``ρ`` the attended
fraction of (q, k) pairs. We refine it per stream (each stream's block params act on its own
tokens; cross-attention k/v projections act on condition tokens) and add cross-attention scores;
a forward pass is a third of a training step.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmdit.attention import masks
from mmdit.model.mmdit import MMDiT
from mmdit.model.spec import ModelSpec


def abstract_inputs(spec: ModelSpec, batch: int = 1):
    f32 = jnp.float32
    tokens = {a.name: jax.ShapeDtypeStruct((batch, a.geometry.num_tokens, a.geometry.token_dim), f32) for a in spec.streams}
    sigma = {a.name: jax.ShapeDtypeStruct((batch, a.geometry.num_tokens), f32) for a in spec.streams if not a.geometry.condition}
    conds = {c.name: jax.ShapeDtypeStruct((batch, c.length, c.dim), f32) for c in spec.conditions}
    return tokens, sigma, conds


def abstract_params(spec: ModelSpec):
    """Param shapes (logically boxed) without allocating."""
    tokens, sigma, conds = abstract_inputs(spec)
    return jax.eval_shape(lambda t, s, c: MMDiT(spec).init(jax.random.key(0), t, s, c), tokens, sigma, conds)


def _size(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def _paths(tree):
    return [("/".join(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


@dataclasses.dataclass
class StreamParams:
    total: int
    blocks: int
    embeddings: int  # patch/time/condition embeddings and output head
    cross: dict  # condition -> params of its cross-attention (blocks) + embedding
    matmul: int  # per-token matmul params of the blocks (N in the FLOP formula), excl. cross k/v
    cross_kv: dict  # condition -> cross-attention k/v projection params (act on condition tokens)


def param_breakdown(spec: ModelSpec, params=None) -> dict[str, StreamParams]:
    params = nn.unbox(params if params is not None else abstract_params(spec))["params"]
    out = {}
    for a in spec.streams:
        top = params[a.name]
        blk = params["blocks"][a.name]
        cross, cross_kv = {}, {}
        matmul = 0
        for path, leaf in _paths(blk):
            n = int(np.prod(leaf.shape))
            c = next((c for c in a.cross if path.startswith(f"cross_{c}/")), None)
            if c is not None:
                added = spec.added_condition(c)  # Wan I2V: its k/v projections sit in the host's module
                if added is not None and any(f"/{m}/" in path for m in ("add_k_proj", "add_v_proj", "norm_added_k")):
                    c = added
                cross[c] = cross.get(c, 0) + n
                if any(f"/{m}/kernel" in path for m in ("to_k", "to_v", "add_k_proj", "add_v_proj")):
                    cross_kv[c] = cross_kv.get(c, 0) + n
                    continue
            if path.endswith("kernel"):
                matmul += n
        for c in spec.attended(a):
            cross[c] = cross.get(c, 0) + (_size(top["cond_embedding_" + c]) if ("cond_embedding_" + c) in top else 0)
        out[a.name] = StreamParams(_size(top) + _size(blk), _size(blk), _size(top), cross, matmul, cross_kv)
    return out


def attended_fraction(spec: ModelSpec, known=None, valid=None, rows_per_chunk: int = 2048) -> float:
    """ρ: the fraction of (q, k) pairs the self-attention mask keeps, averaged over layers
    (per-stream layers keep only same-stream pairs). Exact, computed in row chunks."""
    model = MMDiT(spec)
    known = known or {a.name: jnp.zeros((1, a.geometry.num_tokens), bool) for a in spec.streams}
    meta = model.token_meta(1, known, valid)
    pred = spec.rule.bind(spec.names)
    S = meta.stream.shape[1]

    def count(meta_l):
        total = 0
        for start in range(0, S, rows_per_chunk):
            q = meta_l.slice(start, min(S, start + rows_per_chunk))
            total += int(jnp.sum(masks.dense_mask(pred, q, meta_l)))
        return total

    flags = spec.layer_is_joint()
    joint = count(meta) if flags.any() else 0
    sep = count(meta._replace(group=meta.stream)) if (~flags).any() else 0
    pairs = (joint * flags.sum() + sep * (~flags).sum()) / len(flags)
    return float(pairs) / float(S * S)


def forward_flops(spec: ModelSpec, breakdown=None, rho: float | None = None, batch: int = 1) -> float:
    """FLOPs of one forward pass (multiply-add = 2 FLOPs)."""
    bd = breakdown or param_breakdown(spec)
    rho = attended_fraction(spec) if rho is None else rho
    S = spec.num_tokens
    flops = 0.0
    for a in spec.streams:
        p = bd[a.name]
        flops += 2.0 * p.matmul * a.geometry.num_tokens
        for c, n in p.cross_kv.items():
            L = spec.condition(c).length
            flops += 2.0 * n * L
            flops += 4.0 * spec.num_layers * a.geometry.num_tokens * L * spec.heads * spec.head_dim
    flops += 4.0 * rho * spec.num_layers * S * S * spec.heads * spec.head_dim
    return batch * flops


def train_step_flops(spec: ModelSpec, batch: int, **kw) -> float:
    """Forward + backward (3x forward), the docs/design.md MFU numerator."""
    return 3.0 * forward_flops(spec, batch=batch, **kw)
