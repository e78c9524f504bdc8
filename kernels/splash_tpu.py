"""TPU attention under a metadata mask predicate, on JAX's Splash attention (Pallas Mosaic), for
*static* masks (the ``splash`` registry entry). Our own kernel, which takes traced metadata and
block maps, is :mod:`mmdit_kernels.flash_tpu`.

Splash attention takes *static* block-sparse masks: a :class:`splash_attention_mask.Mask` that is
evaluated on the host while building its ``MaskInfo`` (visit lists and the distinct partial
tiles). We express our predicate as such a mask (:class:`MetadataMask`), evaluating ``mask_fn`` on
the host (numpy metadata, jitted on the CPU device) one strip of tiles at a time, so a 75k-token
mask is never materialised (a strip is ``block_q x Sk`` or ``Sq x block_k`` booleans).

Consequences, all checked:

* Metadata must be concrete (numpy or committed arrays, not tracers): per-batch ``known`` flags that
  come from the traced batch cannot drive a static mask (:class:`TracedMetadataError`; use the GPU
  kernel or the XLA implementation then). Constant metadata works under ``jit``: the kernel is
  built at trace time.
* One mask is shared by every head (Splash masks are per head; ours do not depend on the head), so
  the kernel is built once per (mask predicate, metadata, lengths, tiles) and reused for any
  head count, including the ``H / n`` heads of each device under a head-sharded ``shard_map``.
* Building ``MaskInfo`` walks every tile in Python (minutes at 75k tokens): built kernels are
  cached (LRU) by a fingerprint of the predicate (its code and closure values) and a digest of the
  metadata bytes. Batch elements with identical metadata share a kernel.
* Splash needs at least one attended key per row; rows with none (and padded rows) are given key 0
  and their output is zeroed afterwards, so they output 0 and pass no gradient.

Splash does not scale scores: ``q`` is multiplied by ``scale`` before the call.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import types
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

LANES = 128  # Splash tiles must be multiples of the TPU lane width.
_CACHE_SIZE = 16
_KERNELS: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()


class TracedMetadataError(ValueError):
    """Splash masks are static: metadata must be concrete when the kernel is built."""


def fingerprint(obj, _depth: int = 0):
    """A hashable value equal for predicates that compute the same thing: a function's code plus
    (recursively) its closure values and defaults; hashable values as themselves; else identity."""
    if _depth > 12:
        return ("id", id(obj))
    rec = functools.partial(fingerprint, _depth=_depth + 1)
    if isinstance(obj, types.FunctionType):
        cells = []
        for cell in obj.__closure__ or ():
            try:
                cells.append(rec(cell.cell_contents))
            except ValueError:  # empty cell
                cells.append(("empty",))
        return ("fn", obj.__code__, tuple(cells), rec(obj.__defaults__))
    if isinstance(obj, functools.partial):
        return ("partial", rec(obj.func), rec(obj.args), rec(tuple(sorted(obj.keywords.items()))))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, tuple(rec(x) for x in obj))
    if isinstance(obj, np.ndarray):
        return ("array", obj.dtype.str, obj.shape, obj.tobytes())
    try:
        hash(obj)
    except TypeError:
        return ("id", id(obj))
    return obj


def _concrete(meta: Sequence, name: str) -> tuple[np.ndarray, ...]:
    out = []
    for i, f in enumerate(meta):
        if isinstance(f, jax.core.Tracer):
            raise TracedMetadataError(
                f"splash attention needs concrete metadata to build its static mask, but {name}[{i}] "
                "is traced (e.g. per-batch known flags computed inside jit). Build the metadata with "
                "numpy outside jit, or use the 'pallas' kernels (flash_tpu / flash_gpu) or 'xla' attention for traced masks."
            )
        out.append(np.asarray(f))
    return tuple(out)


class MetadataMask(mask_lib.Mask):
    """``bool [Sq_pad, Sk_pad]`` Splash mask: ``mask_fn`` on one batch element's metadata.

    Keys at positions ``>= seq_k`` are masked; rows with no attended key (including padded rows
    ``>= seq_q``) attend key 0 instead (see :attr:`row_any` to zero them afterwards). Evaluated in
    strips of whole tile rows or tile columns with a small LRU cache, which matches how Splash's
    ``MaskInfo`` builder walks the tiles (row-major for the forward, column-major for dk/dv).
    """

    def __init__(self, mask_fn, q_meta, k_meta, seq_q, seq_k, shape, block_q, block_k, key):
        self._fn, self._q, self._k = mask_fn, q_meta, k_meta
        self._seq_q, self._seq_k = seq_q, seq_k
        self._shape, self._bq, self._bk = tuple(shape), block_q, block_k
        self._key = key
        self._cpu = jax.devices("cpu")[0]
        padded_q = tuple(np.pad(f, (0, shape[0] - f.shape[0])) for f in q_meta)
        padded_k = tuple(np.pad(f, (0, shape[1] - f.shape[0])) for f in k_meta)
        self._q_dev, self._k_dev = jax.device_put((padded_q, padded_k), self._cpu)
        self._eval = jax.jit(self._evaluate, static_argnums=(0, 1, 2))
        self._rows = collections.OrderedDict()
        self._cols = collections.OrderedDict()
        self._last = None
        self._row_any_dev = jax.device_put(np.ones(shape[0], bool), self._cpu)  # no patch yet
        self.row_any = self._compute_row_any()
        self._row_any_dev = jax.device_put(self.row_any, self._cpu)

    @property
    def shape(self):
        return self._shape

    def _evaluate(self, nq, nk, rows_only, q0, k0, q_meta, k_meta, row_any):
        """Strip ``[nq, nk]`` at dynamic offsets ``(q0, k0)`` (one compile per strip shape), or with
        ``rows_only`` just its ``[nq]`` row-wise any."""
        qpos = q0 + jnp.arange(nq)[:, None]
        kpos = k0 + jnp.arange(nk)[None, :]
        qf = tuple(jax.lax.dynamic_slice_in_dim(f, q0, nq)[:, None] for f in q_meta)
        kf = tuple(jax.lax.dynamic_slice_in_dim(f, k0, nk)[None, :] for f in k_meta)
        m = self._fn(qf, kf) if self._fn is not None else True
        m = jnp.broadcast_to(m & (kpos < self._seq_k) & (qpos < self._seq_q), (nq, nk))
        if rows_only:
            return m.any(axis=1)
        return m | ((kpos == 0) & ~jax.lax.dynamic_slice_in_dim(row_any, q0, nq)[:, None])

    def _strip(self, q0, q1, k0, k1, rows_only=False) -> np.ndarray:
        with jax.default_device(self._cpu), jax.ensure_compile_time_eval():
            out = self._eval(q1 - q0, k1 - k0, rows_only, q0, k0, self._q_dev, self._k_dev, self._row_any_dev)
            return np.asarray(out)

    def _compute_row_any(self) -> np.ndarray:
        sq, sk = self._shape
        return np.concatenate([self._strip(r, r + self._bq, 0, sk, rows_only=True) for r in range(0, sq, self._bq)])

    def _cached(self, cache, key, make):
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        cache[key] = value = make()
        while len(cache) > 2:
            cache.popitem(last=False)
        return value

    def __getitem__(self, idx) -> np.ndarray:
        qs, ks = idx
        q0, q1, _ = qs.indices(self._shape[0])
        k0, k1, _ = ks.indices(self._shape[1])
        i, j = q0 // self._bq, k0 // self._bk
        in_row = q0 >= i * self._bq and q1 <= (i + 1) * self._bq
        in_col = k0 >= j * self._bk and k1 <= (j + 1) * self._bk
        sq, sk = self._shape
        use_col = in_col and (j in self._cols or (i not in self._rows and self._last == ("k", j)))
        self._last = ("k", j) if in_col else None
        if use_col:
            strip = self._cached(self._cols, j, lambda: self._strip(0, sq, j * self._bk, (j + 1) * self._bk))
            return strip[q0:q1, k0 - j * self._bk : k1 - j * self._bk]
        if in_row:
            strip = self._cached(self._rows, i, lambda: self._strip(i * self._bq, (i + 1) * self._bq, 0, sk))
            return strip[q0 - i * self._bq : q1 - i * self._bq, k0:k1]
        return self._strip(q0, q1, k0, k1)

    def __eq__(self, other):
        return isinstance(other, MetadataMask) and self._key == other._key

    def __hash__(self):
        return hash(self._key)


def _digest(arrays: Sequence[np.ndarray]) -> str:
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def get_kernel(mask_fn, q_meta, k_meta, seq_q, seq_k, block_q, block_k, interpret=False):
    """``(splash kernel, row_any bool[Sq_pad])`` for one batch element's metadata (1-D fields).

    Cached by (predicate fingerprint, metadata digest, lengths, tiles, interpret).
    """
    key = (fingerprint(mask_fn), _digest(q_meta), _digest(k_meta), seq_q, seq_k, block_q, block_k, interpret)
    if key in _KERNELS:
        _KERNELS.move_to_end(key)
        return _KERNELS[key]
    with jax.ensure_compile_time_eval():  # concrete arrays even when called while tracing a jit
        entry = _build_kernel(mask_fn, q_meta, k_meta, seq_q, seq_k, block_q, block_k, interpret, key)
    _KERNELS[key] = entry
    while len(_KERNELS) > _CACHE_SIZE:
        _KERNELS.popitem(last=False)
    return entry


def _build_kernel(mask_fn, q_meta, k_meta, seq_q, seq_k, block_q, block_k, interpret, key):
    sqp, skp = _round_up(seq_q, block_q), _round_up(seq_k, block_k)
    mask = MetadataMask(mask_fn, q_meta, k_meta, seq_q, seq_k, (sqp, skp), block_q, block_k, key)
    sizes = splash.BlockSizes(
        block_q=block_q,
        block_kv=block_k,
        block_kv_compute=block_k,
        block_q_dkv=block_q,
        block_kv_dkv=block_k,
        block_kv_dkv_compute=block_k,
        use_fused_bwd_kernel=True,
    )
    kernel = splash.make_splash_mha(
        mask_lib.MultiHeadMask([mask]),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    return kernel, jnp.asarray(mask.row_any)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask_fn: Callable | None = None,
    q_meta: Sequence = (),
    k_meta: Sequence = (),
    scale: float | None = None,
    block_q: int = 128,
    block_k: int = 128,
    interpret: bool = False,
) -> jax.Array:
    """Splash attention ``[B, Sq, H, Dh]`` under ``mask_fn`` over concrete metadata.

    Same contract as :func:`mmdit_kernels.flash_attention` (``q: [B, Sq, H, Dh]``, ``k, v:
    [B, Sk, H, Dh]``, fields ``[B | 1, S]``, rows with no attended key output 0); tiles are rounded
    to multiples of 128 and capped at the padded lengths. ``interpret=True`` runs Splash's kernels
    in the Pallas interpreter (CPU tests). Raises :class:`TracedMetadataError` for traced metadata.
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, Sq, H, Dh] and k, v [B, Sk, H, Dh]; got {q.shape}, {k.shape}, {v.shape}")
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = d**-0.5 if scale is None else float(scale)
    qm, km = _concrete(q_meta, "q_meta"), _concrete(k_meta, "k_meta")
    for name, meta, s in (("q_meta", qm, sq), ("k_meta", km, sk)):
        for i, f in enumerate(meta):
            if f.ndim != 2 or f.shape[1] != s or f.shape[0] not in (1, b):
                raise ValueError(f"{name}[{i}] has shape {f.shape}; expected [{b} or 1, {s}]")
    bq = min(_round_up(block_q, LANES), _round_up(sq, LANES))
    bk = min(_round_up(block_k, LANES), _round_up(sk, LANES))
    sqp, skp = _round_up(sq, bq), _round_up(sk, bk)

    def element(meta, i):
        return tuple(f[min(i, f.shape[0] - 1)] for f in meta)

    kernels, which = {}, []
    for i in range(b):
        qe, ke = element(qm, i), element(km, i)
        sig = (_digest(qe), _digest(ke))
        if sig not in kernels:
            kernels[sig] = get_kernel(mask_fn, qe, ke, sq, sk, bq, bk, interpret)
        which.append(sig)

    def prep(x, s):  # [B, S, H, D] -> [B, H, S_pad, D]
        return jnp.pad(x, ((0, 0), (0, s - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    qs = prep((q.astype(jnp.float32) * scale).astype(q.dtype), sqp)
    ks, vs = prep(k, skp), prep(v, skp)

    def run(entry, qb, kb, vb):
        kernel, row_any = entry
        o = kernel(qb, kb, vb)  # [H, Sq_pad, D]
        return jnp.where(row_any[None, :, None], o, 0).astype(q.dtype)

    if len(kernels) == 1:
        out = jax.vmap(functools.partial(run, kernels[which[0]]))(qs, ks, vs)
    else:
        out = jnp.stack([run(kernels[which[i]], qs[i], ks[i], vs[i]) for i in range(b)])
    return out.transpose(0, 2, 1, 3)[:, :sq]
