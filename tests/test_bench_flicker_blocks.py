"""bench/flicker_blocks.py's block split: the blocks' shares add up to the clip's flicker, and a change
confined to one codec block lands in that block alone."""

import importlib.util
import os

import numpy as np

from mmdit.eval.image_quality import background_flicker_pairs, background_mask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    spec = importlib.util.spec_from_file_location("flicker_blocks", os.path.join(REPO, "bench", "flicker_blocks.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_block_split_adds_up_to_the_flicker_and_keeps_a_change_in_its_block():
    frames = np.full((5, 32, 32, 3), 120, np.uint8)
    frames[2, 8:16, 16:24] = 140  # one frame of one block brightens, then returns
    grid, pixels = load().block_flicker(frames, 8)
    assert grid.shape == (4, 4) and pixels == int(background_mask(frames).sum())
    assert np.isclose(grid.sum() / pixels, background_flicker_pairs(frames).mean(), rtol=1e-6)
    assert grid[1, 2] > 0 and np.count_nonzero(grid) == 1
