"""The tiny chunk-causal distillation student shared by the distill and sampler-solver tests."""

import flax.linen as nn
import jax

from mmdit import config_lib


def four_chunk_student():
    """``(cfg, model, params)``: ``configs/demo_distill.py:tiny`` cut into 4 chunks of 2 frames (> 3, so
    bounded positions differ from chunk 3 on), with params perturbed away from the init (velocities
    far from 0)."""
    from configs import demo_stream
    from mmdit.model.diffusion import DiffusionModel

    cfg = config_lib.load("configs/demo_distill.py:tiny")
    cfg.model.chunk_frames = 2.0
    demo_stream.set_clip_chunks(cfg, 4)
    model = DiffusionModel.from_config(cfg)
    params = nn.unbox(model.init(jax.random.key(0)))
    perturb = lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape, p.dtype)  # noqa: E731
    params = jax.jit(lambda tree: jax.tree.map(perturb, tree))(params)  # one compile, not one per leaf shape
    return cfg, model, params
