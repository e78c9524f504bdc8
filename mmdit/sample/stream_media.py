"""Latent chunks -> media chunks, the codec decode overlapped with the DiT (TalkingMachines' score/VAE split).

:func:`stream_media` takes the latent chunks a streaming sampler yields (``{stream: latents [B, ...]}`` in time
order) and yields :class:`MediaChunk` s in the same order. With ``overlap=True`` a :class:`DecodeWorker` thread
decodes (and, through ``sink``, writes) chunk ``t`` while the caller's thread runs the DiT for chunk ``t + 1``,
so a stream runs at ``max(DiT, decode)`` per chunk instead of their sum. ::

    codecs = {"video": video_codec, "audio": audio_codec}
    with FragmentedMP4Writer(path, fps, sample_rate, width, height) as mp4:
        sink = lambda m: mp4.write(m.frames[0], m.audio[0])    # on the worker thread, in order
        for media in stream_media(sampler.stream(params, state), codecs, sink=sink):
            print(media.index, media.t_dit, media.t_decode)    # frames uint8 [B, n, H, W, 3], audio [B, m]

Guarantees: chunks come out in order, each exactly once, then one ``final`` chunk with what the decoders held
back (mel / MMAudio lookahead); at most ``queue_size + 1`` chunks are in flight (the producer is not asked for
more until the consumer takes one: backpressure, bounded memory); an exception in a decoder or the sink is
re-raised in the caller's thread at that chunk (with the worker's traceback); if the producer raises, the
chunks already produced are decoded and yielded first (and the final one), then its exception is raised; closing the generator
early (``break``, ``.close()``) stops the worker after the chunk it is on, and joins it before returning, so a
``sink`` writing to a file never runs after the caller closes that file.

Devices: ``device=None`` decodes on the worker thread wherever the codec computes (numpy codecs: CPU; jax
codecs: the default device). ``device=<jax.Device>`` (or ``"auto"``: the second device when there is one) sends
each chunk's latents there with an asynchronous ``jax.device_put`` as soon as the DiT made them, and runs the
decode under ``jax.default_device(device)``: the transfer and decode overlap the DiT on the first device. (jax
codecs' parameters are not moved: keep them uncommitted, as the codecs create them, or place them on
``device`` yourself to avoid a copy per chunk.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import numpy as np

from mmdit.codecs.base import AudioCodec, VideoCodec
from mmdit.codecs.clip import to_uint8


@dataclasses.dataclass
class MediaChunk:
    """One chunk of decoded media.

    ``index``: the latent chunk's index (0, 1, ...); the ``final`` chunk after the last has ``index`` = number of
    chunks and holds only what the decoders held back. ``frames``: ``uint8 [B, n, H, W, 3]`` (``n`` may be 0), None
    without a video codec. ``audio``: ``float32 [B, m]`` in [-1, 1], None without an audio codec. ``latents``: this
    chunk's latents as numpy (``{}`` for the final chunk). Times in seconds: ``t_dit`` the producer took for this
    chunk (blocking until its arrays were ready), ``t_decode`` the decode, ``t_sink`` the ``sink`` call.
    """

    index: int
    frames: np.ndarray | None
    audio: np.ndarray | None
    latents: dict
    t_dit: float = 0.0
    t_decode: float = 0.0
    t_sink: float = 0.0
    final: bool = False


class DecodeWorker:
    """Runs ``fn(item)`` for submitted items on one background thread, in submission order.

    ``submit(item)`` never blocks (the caller bounds ``pending``); ``get()`` blocks for the oldest result and
    re-raises the exception ``fn`` raised for it; after a failure later items are not run. ``close()`` drops
    queued items, waits for the running one and joins the thread (idempotent).
    """

    _STOP = object()

    def __init__(self, fn: Callable[[Any], Any], name: str = "mmdit-decode"):
        self._fn = fn
        self._inbox: queue.Queue = queue.Queue()
        self._outbox: queue.Queue = queue.Queue()
        self._pending = 0
        self._abandon = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failed = False
        while True:
            item = self._inbox.get()
            if item is self._STOP:
                return
            if failed or self._abandon.is_set():
                self._outbox.put((False, RuntimeError("not run: the decode worker failed or was closed")))
                continue
            try:
                self._outbox.put((True, self._fn(item)))
            except BaseException as e:  # handed to the caller's thread
                failed = True
                self._outbox.put((False, e))

    @property
    def pending(self) -> int:
        """Items submitted and not yet taken with :meth:`get`."""
        return self._pending

    def ready(self) -> bool:
        """Whether :meth:`get` would return without waiting."""
        return not self._outbox.empty()

    def submit(self, item) -> None:
        if self._abandon.is_set():
            raise RuntimeError("DecodeWorker.submit after close()")
        self._pending += 1
        self._inbox.put(item)

    def get(self):
        if not self._pending:
            raise RuntimeError("DecodeWorker.get with nothing submitted")
        ok, value = self._outbox.get()
        self._pending -= 1
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._abandon.set()
        self._inbox.put(self._STOP)
        self._thread.join()


def decode_device(device):
    """``"auto"``: the second jax device when there is one, else None; a ``jax.Device`` or None as given."""
    if device == "auto":
        devices = jax.devices()
        return devices[1] if len(devices) > 1 else None
    if device is not None and not isinstance(device, jax.Device):
        raise ValueError(f"device={device!r}: pass a jax.Device, 'auto' or None")
    return device


@dataclasses.dataclass
class _Item:
    index: int
    latents: dict  # {} marks the end of the stream
    t_dit: float
    final: bool = False


class _ChunkDecoder:
    """The per-stream stream decoders of one stream of chunks (made at the first chunk, used on one thread)."""

    def __init__(self, codecs: Mapping, device, sink):
        video = [s for s, c in codecs.items() if isinstance(c, VideoCodec)]
        audio = [s for s, c in codecs.items() if isinstance(c, AudioCodec)]
        other = [s for s, c in codecs.items() if s not in video + audio]
        if len(video) > 1 or len(audio) > 1 or other or not codecs:
            raise ValueError(
                f"codecs={dict(codecs)!r}: give at most one VideoCodec and one AudioCodec, keyed by the latent "
                "stream each decodes (e.g. {'video': video_codec, 'audio': audio_codec})"
            )
        self.codecs, self.device, self.sink = dict(codecs), device, sink
        self.video, self.audio = (video or [None])[0], (audio or [None])[0]
        self.decoders: dict | None = None

    def __call__(self, item: _Item) -> MediaChunk:
        t0 = time.perf_counter()
        ctx = jax.default_device(self.device) if self.device is not None else contextlib.nullcontext()
        with ctx:
            media = self._decode(item)
        t_decode = time.perf_counter() - t0
        host = {} if item.final else {s: np.asarray(v) for s, v in item.latents.items()}
        chunk = MediaChunk(
            index=item.index,
            frames=None if self.video is None else to_uint8(media[self.video]),
            audio=None if self.audio is None else np.asarray(media[self.audio], np.float32),
            latents=host,
            t_dit=item.t_dit,
            t_decode=t_decode,
            final=item.final,
        )
        if self.sink is not None:
            t1 = time.perf_counter()
            self.sink(chunk)
            chunk.t_sink = time.perf_counter() - t1
        return chunk

    def _decode(self, item: _Item) -> dict:
        if item.final:
            return {s: d.finish() for s, d in self.decoders.items()}
        missing = [s for s in self.codecs if s not in item.latents]
        if missing:
            raise ValueError(
                f"latent chunk {item.index} has streams {sorted(item.latents)} but codecs has {missing} too: pass "
                "codecs only for the streams the sampler yields, or merge given latents into the chunk dicts"
            )
        if self.decoders is None:
            self.decoders = {s: c.stream_decoder(int(np.shape(item.latents[s])[0])) for s, c in self.codecs.items()}
        return {s: d.push(item.latents[s]) for s, d in self.decoders.items()}


def stream_media(
    latent_chunks: Iterable[Mapping],
    codecs: Mapping[str, VideoCodec | AudioCodec],
    *,
    overlap: bool = True,
    device=None,
    sink: Callable[[MediaChunk], None] | None = None,
    queue_size: int = 1,
) -> Iterator[MediaChunk]:
    """Decodes ``latent_chunks`` (``{stream: latents [B, ...]}`` per chunk, time order) into :class:`MediaChunk` s.

    Args:
      latent_chunks: the sampler's chunks (jax or numpy arrays); every chunk has the streams of ``codecs``
        (others are passed through in ``MediaChunk.latents`` only).
      codecs: ``{stream: codec}``, at most one video and one audio codec (each with ``stream_decoder``).
      overlap: decode on a :class:`DecodeWorker` thread while the next chunk is produced; False decodes inline
        (the sequential baseline).
      device: where to decode (module docstring): None, a ``jax.Device`` or ``"auto"``.
      sink: called with each :class:`MediaChunk` (the final one too) right after its decode, on the decode
        thread, in order (e.g. a writer's ``write``); its time is ``t_sink``.
      queue_size: chunks that may wait for or sit in the decoder beyond the one being produced (>= 1).

    Yields:
      :class:`MediaChunk` per latent chunk, in order, then one with ``final=True`` (none if there were no chunks).
    """
    if queue_size < 1:
        raise ValueError(f"queue_size={queue_size}: at least 1 chunk must be able to wait for the decoder")
    device = decode_device(device)
    decode = _ChunkDecoder(codecs, device, sink)
    chunks = iter(latent_chunks)
    if not overlap:
        yield from _sequential(chunks, decode, device)
        return
    worker = DecodeWorker(decode)
    try:
        index, failure = 0, None
        while True:
            try:
                item = _next_item(chunks, index, device)
            except Exception as e:  # the producer failed: deliver what it made, then raise
                failure = e
                break
            if item is None:
                break
            worker.submit(item)
            index += 1
            while worker.pending > queue_size or worker.ready():
                yield worker.get()
        if index:
            worker.submit(_Item(index, {}, 0.0, final=True))
        while worker.pending:
            yield worker.get()
        if failure is not None:
            raise failure
    finally:
        worker.close()


def _next_item(chunks: Iterator, index: int, device) -> _Item | None:
    """The producer's next chunk, timed until its arrays are ready (and sent toward ``device``); None at the end."""
    t0 = time.perf_counter()
    try:
        latents = next(chunks)
    except StopIteration:
        return None
    latents = jax.block_until_ready(dict(latents))
    t_dit = time.perf_counter() - t0
    if device is not None:
        latents = jax.device_put(latents, device)  # asynchronous: the copy overlaps what the caller does next
    return _Item(index, latents, t_dit)


def _sequential(chunks: Iterator, decode: _ChunkDecoder, device) -> Iterator[MediaChunk]:
    index, failure = 0, None
    while True:
        try:
            item = _next_item(chunks, index, device)
        except Exception as e:  # as with overlap: the tail of what was produced, then the producer's error
            failure = e
            break
        if item is None:
            break
        yield decode(item)
        index += 1
    if index:
        yield decode(_Item(index, {}, 0.0, final=True))
    if failure is not None:
        raise failure
