"""Shared fixtures: tiny model configs that exercise every structural feature in milliseconds."""

import os

import ml_collections as mlc
import pytest

# Keep the main pytest process single-device and quiet; multi-device tests spawn subprocesses.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


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
