"""Mask rules against brute-force loops; block maps against dense masks."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from mmdit.attention import masks as M

NAMES = ("video", "audio")


def random_meta(rng, S=29, batch=2, groups=False):
    stream = (rng.random(S) < 0.4).astype(np.int32)
    time = np.where(stream == 0, rng.integers(0, 6, S), rng.random(S) * 6).astype(np.float32)
    chunk = np.floor(time / 2).astype(np.int32)
    known = rng.random((batch, S)) < 0.3
    valid = rng.random((batch, S)) < 0.9
    group = stream.copy() if groups else np.zeros(S, np.int32)
    b = lambda x: np.broadcast_to(x, (batch, S))
    return M.TokenMeta(
        stream=jnp.asarray(b(stream)),
        time=jnp.asarray(b(time)),
        chunk=jnp.asarray(b(chunk)),
        known=jnp.asarray(known),
        valid=jnp.asarray(valid),
        group=jnp.asarray(b(group)),
    )


def brute(rule_name, meta, b, i, j):
    s, t, c, kn = (np.asarray(f)[b] for f in meta[:4])
    if rule_name == "full":
        return True
    if rule_name == "local(1.5)":
        return s[i] == s[j] or abs(t[i] - t[j]) <= 1.5
    if rule_name == "chunk_causal":
        return c[j] in (0, c[i] - 1, c[i])
    if rule_name == "causal":
        return c[j] <= c[i]
    if rule_name == "no_peek":
        return not (kn[i] and not kn[j])
    if rule_name == "no_peek('audio')":
        return s[i] != 1 or s[j] == 1
    if rule_name == "same_stream":
        return s[i] == s[j]
    raise KeyError(rule_name)


BASIC = ["full", "local(1.5)", "chunk_causal", "causal", "no_peek", "no_peek('audio')", "same_stream"]


def brute_dense(expr_fn, meta):
    B, S = meta.stream.shape
    out = np.zeros((B, S, S), bool)
    valid, group = np.asarray(meta.valid), np.asarray(meta.group)
    for b, i, j in itertools.product(range(B), range(S), range(S)):
        out[b, i, j] = expr_fn(b, i, j) and valid[b, j] and group[b, i] == group[b, j]
    return out


@pytest.mark.parametrize("rule", BASIC)
@pytest.mark.parametrize("groups", [False, True])
def test_basic_rules_match_brute_force(rule, groups):
    meta = random_meta(np.random.default_rng(hash(rule) % 1000), groups=groups)
    spec = M.make_mask_spec(rule, NAMES, meta)
    want = brute_dense(lambda b, i, j: brute(rule, meta, b, i, j), meta)
    np.testing.assert_array_equal(np.asarray(spec.dense()), want)


@pytest.mark.parametrize(
    "expr,fn",
    [
        ("chunk_causal & no_peek", lambda r, m, b, i, j: r("chunk_causal", m, b, i, j) and r("no_peek", m, b, i, j)),
        ("local(1.5) | chunk_causal", lambda r, m, b, i, j: r("local(1.5)", m, b, i, j) or r("chunk_causal", m, b, i, j)),
        (
            "(local(1.5) | causal) & no_peek('audio')",
            lambda r, m, b, i, j: (r("local(1.5)", m, b, i, j) or r("causal", m, b, i, j)) and r("no_peek('audio')", m, b, i, j),
        ),
    ],
)
def test_composed_rules_match_brute_force(expr, fn):
    meta = random_meta(np.random.default_rng(7))
    spec = M.make_mask_spec(expr, NAMES, meta)
    want = brute_dense(lambda b, i, j: fn(brute, meta, b, i, j), meta)
    np.testing.assert_array_equal(np.asarray(spec.dense()), want)


@pytest.mark.parametrize("rule", ["full", "chunk_causal", "local(1.5) & no_peek", "same_stream"])
@pytest.mark.parametrize("bq,bk", [(4, 4), (8, 3), (16, 16)])
def test_block_map_consistent_with_dense(rule, bq, bk):
    meta = random_meta(np.random.default_rng(3), S=37)
    spec = M.make_mask_spec(rule, NAMES, meta)
    dense = np.asarray(spec.dense())
    bm = np.asarray(spec.block_map(bq, bk))
    B, S, _ = dense.shape
    nq, nk = -(-S // bq), -(-S // bk)
    assert bm.shape == (B, nq, nk)
    for b, i, j in itertools.product(range(B), range(nq), range(nk)):
        blk = dense[b, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
        full_block = blk.shape[1] == bk and blk.all()  # padded query rows are "don't care"
        if not blk.any():
            assert bm[b, i, j] == M.EMPTY, (b, i, j)
        elif full_block:
            assert bm[b, i, j] == M.FULL, (b, i, j)
        else:
            assert bm[b, i, j] == M.PARTIAL, (b, i, j)


def test_block_map_padded_query_rows_do_not_spoil_full_blocks():
    S = 6  # 2 blocks of 4, last one half padding
    fields = dict(
        stream=np.zeros(S, np.int32),
        time=np.zeros(S, np.float32),
        chunk=np.zeros(S, np.int32),
        known=np.zeros(S, bool),
        valid=np.ones(S, bool),
        group=np.zeros(S, np.int32),
    )
    meta = M.TokenMeta(**{f: jnp.asarray(x)[None] for f, x in fields.items()})
    bm = np.asarray(M.make_mask_spec("full", NAMES, meta).block_map(4, 8))
    assert bm[0, 1, 0] == M.PARTIAL  # keys 6, 7 are padding
    bm = np.asarray(M.make_mask_spec("full", NAMES, meta).block_map(4, 6))
    assert bm[0, 1, 0] == M.FULL  # padded query rows are "don't care"


def test_parse_errors_name_the_field_and_fix():
    with pytest.raises(ValueError, match="unknown mask rule 'chunky'"):
        M.parse_rule("chunky & full")
    with pytest.raises(ValueError, match="model.mask.*names stream.*'motion'.*model.streams"):
        M.make_mask_spec("no_peek('motion')", NAMES, random_meta(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="cannot parse"):
        M.parse_rule("full &")
    assert str(M.parse_rule("chunk_causal & (local(2) | no_peek)")) == "(chunk_causal & (local(2) | no_peek))"


def test_register_rule_extends_the_grammar():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Window(M.Rule):
        n: int

        def bind(self, names):
            return lambda q, k: jnp.abs(q.chunk - k.chunk) <= self.n

    M.register_rule("window_chunks", Window)
    meta = random_meta(np.random.default_rng(1))
    d = np.asarray(M.make_mask_spec("window_chunks(0)", NAMES, meta).dense())
    c, v = np.asarray(meta.chunk), np.asarray(meta.valid)
    np.testing.assert_array_equal(d, (c[:, :, None] == c[:, None, :]) & v[:, None, :])
