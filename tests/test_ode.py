"""Tests for mmdit.sample.ode: the inference σ schedule and the Euler / Heun integrators."""

import jax
import jax.numpy as jnp
import numpy as np

from mmdit.sample import ode


def test_sampling_sigmas():
    s = np.asarray(ode.sampling_sigmas(10))
    assert s.shape == (11,)
    np.testing.assert_allclose(s, np.linspace(1, 0, 11), atol=1e-6)
    s3 = np.asarray(ode.sampling_sigmas(10, shift=3.0))
    assert s3[0] == 1.0 and s3[-1] == 0.0 and np.all(np.diff(s3) < 0)
    np.testing.assert_allclose(s3[5], 0.75, rtol=1e-6)


def _gaussian_velocity(mu, std):
    """Exact velocity E[ε − x | x_σ] of the flow from N(mu, std²) data (per stream, per channel)."""

    def fn(x, sigma_tokens, step):
        out = {}
        for n, xs in x.items():
            s = sigma_tokens[n][..., None]
            m, sd = mu[n], std[n]
            var = (1 - s) ** 2 * sd**2 + s**2
            r = xs - (1 - s) * m
            e_x = m + (1 - s) * sd**2 / var * r
            e_eps = s / var * r
            out[n] = e_eps - e_x
        return out

    return fn


def test_euler_recovers_gaussian_flow_and_holds_known_tokens():
    b = 4096
    mu = {"video": jnp.array([1.5, -0.5, 0.0]), "audio": jnp.array([-2.0, 3.0])}
    std = {"video": jnp.array([0.5, 2.0, 1.0]), "audio": jnp.array([0.6, 1.5])}
    kv, ka, kk = jax.random.split(jax.random.PRNGKey(8), 3)
    noise = {"video": jax.random.normal(kv, (b, 4, 3)), "audio": jax.random.normal(ka, (b, 2, 2))}
    known = {"video": jnp.zeros((b, 4), bool).at[:, 0].set(True)}
    clean = {"video": jax.random.normal(kk, (b, 4, 3)) * 10.0}
    seen = []

    def record(i, x_next, x0_hat):
        jax.debug.callback(lambda i: seen.append(int(i)), i)

    v_fn = _gaussian_velocity(mu, std)

    def checked(x, sigma_tokens, step):
        # Known tokens must see σ = 0 at every step; poison the output if they do not.
        bad = jnp.any(sigma_tokens["video"][:, 0] != 0)
        return jax.tree.map(lambda v: jnp.where(bad, jnp.nan, v), v_fn(x, sigma_tokens, step))

    sample = jax.jit(
        lambda nz: ode.euler_sample(checked, nz, ode.sampling_sigmas(200), known=known, known_values=clean, callback=record)
    )
    out = sample(noise)
    assert seen == list(range(200))
    # Known tokens are held bit-exact at their clean values.
    np.testing.assert_array_equal(np.asarray(out["video"])[:, 0], np.asarray(clean["video"])[:, 0])
    # Unknown tokens follow the exact flow map ε ↦ μ + std·ε (Euler error ~1/steps), so the
    # statistics of many samples match N(μ, std²) to ~2-3%.
    for n, first in (("video", 1), ("audio", 0)):
        gen = np.asarray(out[n])[:, first:].reshape(-1, mu[n].shape[0])
        eps = np.asarray(noise[n])[:, first:].reshape(-1, mu[n].shape[0])
        m, sd = np.asarray(mu[n]), np.asarray(std[n])
        np.testing.assert_array_less(np.abs(gen.mean(0) - m), 0.03 * sd)
        np.testing.assert_allclose(gen.std(0), sd, rtol=0.03)
        np.testing.assert_array_less(np.abs(gen - (m + sd * eps)).max(0), 0.04 * sd)
    # Determinism.
    np.testing.assert_array_equal(sample(noise)["audio"], out["audio"])


def test_heun_is_more_accurate_than_euler():
    mu, std = {"a": jnp.array([1.0, -1.0])}, {"a": jnp.array([0.5, 2.0])}
    noise = {"a": jax.random.normal(jax.random.PRNGKey(9), (256, 3, 2))}
    exact = mu["a"] + std["a"] * noise["a"]
    v_fn = _gaussian_velocity(mu, std)
    sig = ode.sampling_sigmas(20, shift=2.0)
    err_e = float(jnp.max(jnp.abs(ode.euler_sample(v_fn, noise, sig)["a"] - exact)))
    err_h = float(jnp.max(jnp.abs(ode.heun_sample(v_fn, noise, sig)["a"] - exact)))
    assert err_h < 0.15 * err_e and err_h < 0.05, (err_e, err_h)
