"""Shared fixtures (tiny model configs that exercise every structural feature in milliseconds) and the test
environment: the compilation cache and XLA flags below, read by every test process and CLI subprocess."""

import os
import tempfile

import ml_collections as mlc
import pytest

# Keep the main pytest process single-device and quiet; multi-device tests spawn subprocesses.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One persistent XLA compilation cache for the whole run, read and written by both xdist workers and every
# CLI subprocess they spawn (they inherit the environment): a tiny train or distill step compiled once is
# loaded, not recompiled, by the resume, SIGKILL, multi-host and preset tests that run the same program again
# (a 2-step tiny `mmdit train` subprocess: 36 s -> 23 s). Keys cover the HLO, XLA_FLAGS and jax's version, so
# a stale entry is never a wrong one; compiles under 0.5 s are not worth the write.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"mmdit-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
# Unoptimised LLVM codegen: on these tiny programs compiling dominates running (the tiny demo end to end
# 98 s -> 65 s; a cached-rollout gradient test 180 s -> 126 s). A test that sets XLA_FLAGS itself keeps its own.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


def tiny_model_cfg(**overrides) -> mlc.ConfigDict:
    """Video (grid) + audio (sequence) twin with text cross-attention; 3 layers, 2 joint."""
    m = mlc.ConfigDict(
        dict(
            streams=dict(
                video=dict(kind="grid", channels=4, shape=(3, 4, 4), patch=(1, 2, 2), rate=6.25, dim=32, ffn=64, cross=("text",)),
                audio=dict(kind="sequence", channels=6, shape=(12,), patch=(1,), rate=25.0, dim=32, ffn=64, cross=("text",)),
            ),
            conditions=dict(text=dict(dim=16, length=5)),
            num_layers=3,
            heads=4,
            joint_layers=None,
            mask="full",
            chunk_frames=None,
        )
    )
    with m.unlocked():
        for k, v in overrides.items():
            node, parts = m, k.split(".")
            for p in parts[:-1]:
                node = node[p]
            node[parts[-1]] = v
    return m


@pytest.fixture
def tiny_cfg():
    return tiny_model_cfg()
