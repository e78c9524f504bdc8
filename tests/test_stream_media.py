"""stream_media / DecodeWorker: decode overlapped with the producer, order, backpressure, errors, early close."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from mmdit.codecs.base import AudioCodec, VideoCodec
from mmdit.codecs.clip import to_uint8
from mmdit.codecs.mel import MelCodec
from mmdit.codecs.pixels import PixelCodec
from mmdit.sample.stream_media import DecodeWorker, MediaChunk, stream_media


class SlowVideoCodec(VideoCodec):
    """One 2x2 frame per latent frame (value = the latent), ``delay`` seconds per push; ``fail_at`` raises."""

    latent_channels, temporal_compression, spatial_compression, fps = 1, 1, 2, 25.0

    def __init__(self, delay: float = 0.0, fail_at: int | None = None):
        self.delay, self.fail_at, self.pushes = delay, fail_at, []

    def encode(self, frames, trim=False):
        raise NotImplementedError

    def decode(self, latents):
        return np.repeat(np.repeat(np.asarray(latents, np.float32), 2, 2), 2, 3).repeat(3, -1)

    def stream_decoder(self, batch):
        codec = self

        class Decoder:
            def push(self, z):
                codec.pushes.append((threading.current_thread().name, float(np.asarray(z).ravel()[0])))
                if codec.fail_at is not None and len(codec.pushes) - 1 == codec.fail_at:
                    raise ZeroDivisionError(f"decode failed at push {codec.fail_at}")
                time.sleep(codec.delay)
                return codec.decode(z)

            def finish(self):
                return np.zeros((batch, 0, 2, 2, 3), np.float32)

        return Decoder()


def producer(n: int, delay: float = 0.0, log: list | None = None, fail_at: int | None = None):
    """``n`` chunks ``{"video": [1, 1, 1, 1, 1]}`` holding the chunk index / 10, ``delay`` s each."""
    for i in range(n):
        if fail_at == i:
            raise KeyError("producer failed")
        time.sleep(delay)
        if log is not None:
            log.append(i)
        yield {"video": np.full((1, 1, 1, 1, 1), i / 10, np.float32)}


def test_pixels_and_mel_chunks_concatenate_to_the_one_shot_decode():
    video, audio = PixelCodec(spatial=4, temporal=4, luma_coeffs=4, chroma_coeffs=1), MelCodec(griffin_lim_iters=2)
    rng = np.random.default_rng(0)
    zv = rng.standard_normal((2, 5, 2, 2, video.latent_channels)).astype(np.float32)
    za = rng.standard_normal((2, 20, audio.latent_channels)).astype(np.float32) * 0.3
    chunks = [{"video": zv[:, i : i + 1], "audio": za[:, 4 * i : 4 * i + 4]} for i in range(5)]
    out = list(stream_media(iter(chunks), {"video": video, "audio": audio}))
    assert [m.index for m in out] == [0, 1, 2, 3, 4, 5] and [m.final for m in out] == [False] * 5 + [True]
    frames = np.concatenate([m.frames for m in out], axis=1)
    np.testing.assert_array_equal(frames, to_uint8(video.decode(zv)))
    assert frames.dtype == np.uint8 and out[0].frames.shape == (2, 1, 8, 8, 3) and out[1].frames.shape[1] == 4
    wave = np.concatenate([m.audio for m in out], axis=1)
    assert wave.shape == (2, audio.num_samples(20)) and wave.dtype == np.float32
    np.testing.assert_array_equal(out[2].latents["audio"], za[:, 8:12])
    assert out[-1].latents == {} and all(m.t_decode > 0 for m in out)


@pytest.mark.parametrize("overlap", [True, False])
def test_order_sink_and_final_chunk(overlap):
    codec, seen = SlowVideoCodec(), []
    out = list(stream_media(producer(4), {"video": codec}, overlap=overlap, sink=lambda m: seen.append(m.index)))
    assert [m.index for m in out] == seen == [0, 1, 2, 3, 4]
    assert [float(m.frames[0, 0, 0, 0, 0]) for m in out[:4]] == [float(to_uint8(i / 10)) for i in range(4)]
    threads = {name for name, _ in codec.pushes}
    assert threads == ({"mmdit-decode"} if overlap else {threading.current_thread().name})


def test_overlap_runs_decode_and_producer_concurrently():
    """A 0.15 s producer and a 0.15 s decode: ~max per chunk with overlap, ~sum without."""
    n, delay = 6, 0.15

    def run(overlap):
        t0 = time.perf_counter()
        out = list(stream_media(producer(n, delay), {"video": SlowVideoCodec(delay)}, overlap=overlap))
        return time.perf_counter() - t0, out

    t_seq, out = run(False)
    t_ovl, _ = run(True)
    assert t_seq >= 2 * n * delay
    assert t_ovl < 0.75 * t_seq, (t_ovl, t_seq)  # ideal: (n + 1) / (2n) = 0.58
    assert all(m.t_dit >= delay * 0.9 for m in out[:-1]) and all(m.t_decode >= delay * 0.9 for m in out[:-1])


def test_backpressure_bounds_chunks_in_flight():
    """A fast producer and a slow decoder: the producer is never more than queue_size + 1 chunks ahead."""
    pulled, ahead = [], []
    for m in stream_media(producer(8, log=pulled), {"video": SlowVideoCodec(0.05)}, queue_size=2):
        if not m.final:
            ahead.append(len(pulled) - (m.index + 1))
    assert max(ahead) <= 3 and len(pulled) == 8


@pytest.mark.parametrize("overlap", [True, False])
def test_decode_error_is_raised_in_the_caller_after_the_good_chunks(overlap):
    got = []
    with pytest.raises(ZeroDivisionError, match="push 2"):
        for m in stream_media(producer(6), {"video": SlowVideoCodec(fail_at=2)}, overlap=overlap):
            got.append(m.index)
    assert got == [0, 1]
    assert not [t for t in threading.enumerate() if t.name == "mmdit-decode"]


@pytest.mark.parametrize("overlap", [True, False])
def test_producer_error_delivers_what_was_produced_first(overlap):
    got = []
    with pytest.raises(KeyError, match="producer failed"):
        for m in stream_media(producer(6, fail_at=3), {"video": SlowVideoCodec(0.02)}, overlap=overlap):
            got.append((m.index, m.final))
    assert got == [(0, False), (1, False), (2, False), (3, True)]


def test_early_close_stops_and_joins_the_worker():
    pulled, sunk = [], []
    codec = SlowVideoCodec(0.05)
    gen = stream_media(producer(100, log=pulled), {"video": codec}, sink=lambda m: sunk.append(m.index))
    first = [next(gen).index for _ in range(2)]
    gen.close()
    assert first == [0, 1]
    assert not [t for t in threading.enumerate() if t.name == "mmdit-decode"]
    n_sunk = len(sunk)
    time.sleep(0.2)
    assert len(sunk) == n_sunk <= 4 and len(pulled) <= 4  # nothing runs after close; the producer stopped


def test_bad_arguments():
    with pytest.raises(ValueError, match="at most one VideoCodec"):
        list(stream_media(producer(1), {"a": SlowVideoCodec(), "b": SlowVideoCodec()}))
    with pytest.raises(ValueError, match="has streams \\['video'\\] but codecs has \\['audio'\\]"):
        list(stream_media(producer(1), {"video": SlowVideoCodec(), "audio": MelCodec()}))
    with pytest.raises(ValueError, match="queue_size"):
        list(stream_media(producer(1), {"video": SlowVideoCodec()}, queue_size=0))
    with pytest.raises(ValueError, match="jax.Device"):
        list(stream_media(producer(1), {"video": SlowVideoCodec()}, device="gpu:1"))
    assert list(stream_media(iter([]), {"video": SlowVideoCodec()})) == []
    assert issubclass(MelCodec, AudioCodec) and MediaChunk.__dataclass_fields__["final"].default is False


def test_decode_worker_contract():
    worker = DecodeWorker(lambda x: 10 // x)
    for x in (1, 2, 0, 5):
        worker.submit(x)
    assert worker.pending == 4 and [worker.get(), worker.get()] == [10, 5]
    with pytest.raises(ZeroDivisionError):
        worker.get()
    with pytest.raises(RuntimeError, match="not run"):
        worker.get()  # items after a failure do not run
    worker.close()
    worker.close()
    with pytest.raises(RuntimeError, match="after close"):
        worker.submit(1)


@pytest.mark.slow
def test_decode_on_a_second_device():
    """With two (host) devices, device="auto" decodes on the second; frames equal the one-device decode."""
    script = textwrap.dedent(
        """
        import jax, numpy as np
        from mmdit.codecs.pixels import PixelCodec
        from mmdit.sample.stream_media import stream_media, decode_device
        assert len(jax.devices()) == 2 and decode_device("auto") == jax.devices()[1]
        codec = PixelCodec(spatial=4, temporal=2, luma_coeffs=4, chroma_coeffs=1)
        z = np.random.default_rng(0).standard_normal((1, 4, 2, 2, codec.latent_channels)).astype(np.float32)
        chunks = [{"video": jax.device_put(z[:, i : i + 1], jax.devices()[0])} for i in range(4)]
        on2 = np.concatenate([m.frames for m in stream_media(iter(chunks), {"video": codec}, device="auto")], 1)
        on1 = np.concatenate([m.frames for m in stream_media(iter(chunks), {"video": codec}, device=None)], 1)
        assert (on1 == on2).all() and on1.shape == (1, 7, 8, 8, 3)
        print("ok")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
