"""TensorBoard (tensorboardX, no TensorFlow) and a JSONL copy of every logged scalar.

Only process 0 writes. Videos are logged as animated GIF images (tensorboardX's ``add_video`` writes
nothing without moviepy) next to their audio, so a sample can be watched and heard in TensorBoard.
"""

from __future__ import annotations

import io
import json
import os

import jax
import numpy as np


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.logdir = os.path.join(workdir, "tensorboard")
        self._tb = None
        self._jsonl = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(self.logdir, exist_ok=True)
            self._tb = SummaryWriter(self.logdir)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()

    def video(self, step: int, tag: str, frames: np.ndarray, fps: float) -> None:
        """``frames`` uint8 ``[N, H, W, 3]`` -> an animated GIF image summary."""
        if not self.enabled:
            return
        from PIL import Image
        from tensorboardX.proto.summary_pb2 import Summary

        imgs = [Image.fromarray(f) for f in np.asarray(frames, np.uint8)]
        buf = io.BytesIO()
        imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
        h, w = frames.shape[1:3]
        img = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=buf.getvalue())
        self._tb.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=img)]), step)

    def audio(self, step: int, tag: str, wave: np.ndarray, sample_rate: int) -> None:
        if not self.enabled:
            return
        self._tb.add_audio(
            tag, np.clip(np.asarray(wave, np.float32), -1, 1)[:, None], step, sample_rate=sample_rate
        )  # [T, channels]

    def flush(self):
        if self.enabled:
            self._tb.flush()

    def close(self):
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
