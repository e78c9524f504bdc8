"""Tests for mmdit.sample.guidance: multi-condition CFG algebra, the batched plan layout, scale
schedules and guidance resolution."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmdit import config_spec
from mmdit.sample import guidance


def _streams(key, b=3):
    kv, ka = jax.random.split(key)
    return {"video": jax.random.normal(kv, (b, 6, 4)), "audio": jax.random.normal(ka, (b, 5, 2))}


def _v(key, b=2):
    return _streams(key, b)


def test_cfg_single_condition_is_standard_cfg():
    vu, vc = _v(jax.random.PRNGKey(10)), _v(jax.random.PRNGKey(11))
    for mode in ("nested", "independent"):
        out = guidance.guided_velocity([vu, vc], {"text": 4.0}, mode)
        for n in vu:
            np.testing.assert_allclose(out[n], vu[n] + 4.0 * (vc[n] - vu[n]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(guidance.guided_velocity([vu], {})["audio"], vu["audio"])


def test_cfg_nested_and_independent_algebra():
    conds = ["text", "ref_audio", "audio"]
    ev = [_v(jax.random.PRNGKey(20 + k)) for k in range(4)]
    ones = guidance.guided_velocity(ev, {c: 1.0 for c in conds}, "nested")
    for n in ev[0]:
        np.testing.assert_allclose(ones[n], ev[3][n], rtol=1e-5, atol=1e-6)
    s = {"text": 2.0, "ref_audio": 3.0, "audio": 5.0}
    nested = guidance.guided_velocity(ev, s, "nested")
    indep = guidance.guided_velocity(ev, s, "independent")
    for n in ev[0]:
        v = [np.asarray(e[n]) for e in ev]
        np.testing.assert_allclose(nested[n], v[0] + 2 * (v[1] - v[0]) + 3 * (v[2] - v[1]) + 5 * (v[3] - v[2]), rtol=1e-5)
        np.testing.assert_allclose(indep[n], v[0] + 2 * (v[1] - v[0]) + 3 * (v[2] - v[0]) + 5 * (v[3] - v[0]), rtol=1e-5)
    assert [list(p.values()) for p in guidance.cfg_batch_plan(conds, "nested")] == [
        [False] * 3,
        [True, False, False],
        [True, True, False],
        [True] * 3,
    ]
    assert [list(p.values()) for p in guidance.cfg_batch_plan(conds, "independent")] == [
        [False] * 3,
        [True, False, False],
        [False, True, False],
        [False, False, True],
    ]
    with pytest.raises(ValueError):
        guidance.guided_velocity(ev[:3], s)


def test_cfg_per_stream_scales():
    vu, vc = _v(jax.random.PRNGKey(30)), _v(jax.random.PRNGKey(31))
    out = guidance.guided_velocity([vu, vc], {"text": {"video": 4.0}})
    np.testing.assert_allclose(out["video"], vu["video"] + 4.0 * (vc["video"] - vu["video"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["audio"], vc["audio"], rtol=1e-5, atol=1e-6)  # default 1.0
    out = guidance.guided_velocity([vu, vc], {"text": {"video": 4.0, "audio": 3.0}})
    np.testing.assert_allclose(out["audio"], vu["audio"] + 3.0 * (vc["audio"] - vu["audio"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["nested", "independent"])
def test_cfg_plan_combine_round_trip(mode):
    b = 3
    plan = guidance.cfg_batch_plan(["text", "audio"], mode)
    x = _streams(jax.random.PRNGKey(40), b)
    flags = guidance.cfg_keep_flags(plan, b)
    assert flags["text"].shape == (3 * b,)

    def model(xb, keep):  # a toy conditional model with a distinct output per pattern
        t = keep["text"].astype(jnp.float32)[:, None, None]
        a = keep["audio"].astype(jnp.float32)[:, None, None]
        return {n: v * (1 + t) + 3 * a * v**2 + t * a for n, v in xb.items()}

    stacked = model(guidance.repeat_for_cfg(x, plan), flags)
    scales = {"audio": {"video": 2.0, "audio": 6.0}, "text": 4.0}  # order is taken from the plan
    batched = guidance.combine_cfg(stacked, plan, scales)
    evals = [model(x, {c: jnp.full((b,), k) for c, k in p.items()}) for p in plan]
    ref = guidance.guided_velocity(evals, {"text": 4.0, "audio": scales["audio"]}, mode)
    for n in x:
        assert batched[n].shape == x[n].shape
        np.testing.assert_allclose(batched[n], ref[n], rtol=1e-6)
    with pytest.raises(ValueError):
        guidance.combine_cfg(stacked, plan, {"text": 1.0})


def test_guidance_schedule():
    assert guidance.guidance_scale(5.0, 0.3) == 5.0
    np.testing.assert_allclose(guidance.guidance_scale(5.0, 0.0, "cosine"), 5.0)
    np.testing.assert_allclose(guidance.guidance_scale(5.0, 1.0, "cosine"), 1.0, atol=1e-6)
    np.testing.assert_allclose(guidance.guidance_scale(5.0, 0.5, "cosine"), 3.0, atol=1e-6)
    p = jnp.linspace(0, 1, 11)
    assert np.all(np.diff(np.asarray(guidance.guidance_scale(5.0, p, "cosine"))) < 0)
    tree = guidance.guidance_scale({"text": {"video": 4.0, "audio": 3.0}}, 1.0, "cosine")
    np.testing.assert_allclose(tree["text"]["audio"], 1.0, atol=1e-6)
    np.testing.assert_allclose(guidance.step_progress(9, 10), 1.0)
    np.testing.assert_allclose(guidance.step_progress(0, 1), 0.0)


def test_guidance_interval_gates_each_stream_by_its_own_sigma():
    scales = {"text": 2.0, "joint": {"video": 3.0, "audio": 4.0}}
    sigma = {"video": jnp.float32(0.8), "audio": jnp.float32(0.3)}
    out = guidance.guidance_scale(scales, 0.5, sigma=sigma, interval=(0.5, 1.0))
    got = jax.tree.map(float, out)
    assert got == {"text": {"video": 2.0, "audio": 1.0}, "joint": {"video": 3.0, "audio": 1.0}}
    # the upper bound is inclusive, the lower exclusive
    edge = guidance.guidance_scale(scales, 0.0, sigma={"video": 1.0, "audio": 0.5}, interval=(0.5, 1.0))
    assert jax.tree.map(float, edge) == {"text": {"video": 2.0, "audio": 1.0}, "joint": {"video": 3.0, "audio": 1.0}}
    # composes with the cosine schedule: annealed inside the interval, 1 outside
    cos = guidance.guidance_scale(scales, 0.5, "cosine", sigma=sigma, interval=(0.5, 1.0))
    np.testing.assert_allclose(float(cos["text"]["video"]), 1.5, atol=1e-6)
    np.testing.assert_allclose(float(cos["joint"]["audio"]), 1.0)
    # the full interval leaves the scales as they are (no sigma needed)
    assert guidance.guidance_scale(scales, 0.5, interval=(0.0, 1.0)) is scales
    assert guidance.is_full_interval((0.0, 1.0)) and not guidance.is_full_interval((0.2, 1.0))
    with pytest.raises(ValueError, match="sigma per stream"):
        guidance.guidance_scale(scales, 0.5, interval=(0.5, 1.0))


def _defaults():
    return config_spec.SampleSpec(
        steps=4,
        shift=1.0,
        stream_shift={},
        guidance={"text": 4.0},
        guidance_mode="nested",
        guidance_schedule="constant",
        tasks=("t2av",),
        num_per_task=1,
    )


def test_guidance_interval_validation_and_structure():
    d = _defaults()
    for bad in ((0.5, 0.2), (-0.1, 1.0), (0.5,), "x,y"):
        with pytest.raises(ValueError, match=r"sample.guidance_interval"):
            guidance.resolve_guidance(None, defaults=d, conditions=["text"], generated=["video"], interval=bad)
    g = guidance.resolve_guidance(None, defaults=d, conditions=["text"], generated=["video"], interval="0.5,1")
    assert g.interval == (0.5, 1.0)
    full = guidance.resolve_guidance(None, defaults=d, conditions=["text"], generated=["video"])
    assert full.interval == (0.0, 1.0)
    assert g.structure() != full.structure()  # the gate is compiled into the sampler's loop


def test_independent_guidance_of_several_conditions_needs_the_full_interval():
    """Outside a limited interval independent CFG would compose its single-condition velocities (it never
    evaluates the fully conditional one): refused by name, at config validation and at resolve time."""
    defaults = dataclasses.replace(_defaults(), guidance_mode="independent")
    kw = dict(defaults=defaults, conditions=["text", "ref_audio"], generated=["video"])
    two = {"text": 2.0, "ref_audio": 3.0}
    with pytest.raises(ValueError, match=r"guidance_mode='independent' .*sample.guidance_interval=\(0.5, 1\)"):
        guidance.resolve_guidance(two, interval=(0.5, 1.0), **kw)
    assert guidance.resolve_guidance(two, interval=(0.0, 1.0), **kw).mode == "independent"  # full interval: fine
    assert guidance.resolve_guidance({"text": 2.0}, interval=(0.5, 1.0), **kw).interval == (0.5, 1.0)  # one condition
    assert guidance.resolve_guidance(two, "nested", interval=(0.5, 1.0), **kw).mode == "nested"
    # absent from every sample: dropped first, leaving one guided condition
    one = guidance.resolve_guidance(two, interval=(0.5, 1.0), present={"ref_audio": np.zeros(2, bool)}, **kw)
    assert list(one.scales) == ["text"]
    with pytest.raises(ValueError, match="sample.guidance_mode='independent'"):
        config_spec.check_guidance_mode_interval("independent", ["text", "ref_audio"], (0.0, 0.8))
    # a config: the demo guides text and joint inside (0.5, 1]
    from mmdit import config_lib

    cfg = config_lib.override(config_lib.load("configs/demo.py:tiny"), ["sample.guidance_mode=independent"])
    with pytest.raises(ValueError, match=r"\['text', 'joint'\] and sample.guidance_interval=\(0.5, 1\)"):
        config_spec.build_run_spec(cfg)


def test_resolve_guidance_plain_arguments():
    """resolve_guidance needs no model: defaults from the sample section, validation by name."""
    defaults = dataclasses.replace(_defaults(), guidance_mode="independent")
    kw = dict(defaults=defaults, conditions=["text", "ref_audio"], generated=["audio", "video"])
    g = guidance.resolve_guidance(**kw)
    assert g == guidance.Guidance({"text": 4.0}, "independent", "constant")
    g = guidance.resolve_guidance({"ref_audio": 2, "text": {"video": 3}}, None, "cosine", **kw)
    assert list(g.scales) == ["ref_audio", "text"] and g.scales["text"] == {"audio": 1.0, "video": 3.0}
    assert g.plan() == guidance.cfg_batch_plan(["ref_audio", "text"], "independent")
    assert g.structure() == ((("ref_audio", None), ("text", ("audio", "video"))), "independent", "cosine", None)
    # A condition absent from every sample is dropped; unguided settings share one structure.
    g = guidance.resolve_guidance({"text": 2.0}, "nested", None, present={"text": np.zeros(3, bool)}, **kw)
    assert g.scales == {} and g.structure() == ((), "nested", "constant")
    unguided = dataclasses.replace(defaults, guidance={})
    assert guidance.resolve_guidance(defaults=unguided, conditions=[], generated=["audio"]).scales == {}
    for bad, field in (({"audio": 1.0}, "sample.guidance"), ({"text": {"motion": 1.0}}, "sample.guidance")):
        with pytest.raises(ValueError, match=field):
            guidance.resolve_guidance(bad, **kw)
    with pytest.raises(ValueError, match="sample.guidance_mode"):
        guidance.resolve_guidance(None, "both", **kw)
    with pytest.raises(ValueError, match="sample.guidance_schedule"):
        guidance.resolve_guidance(None, None, "linear", **kw)
