"""A procedurally generated talking-portrait world: the embedded default's data.

Every clip is a deterministic function of ``(config.seed, index)``: a cartoon face of one of
``num_identities`` identities speaks a short transcript drawn from a small vocabulary, and the
world returns the video, the speech, the transcript, the spoken phones and the ground-truth mouth
opening. Nothing is downloaded and nothing is random across runs or machines (numpy's PCG64 seeded
by ``SeedSequence([seed, index])``).

The world (what a model trained on it has to learn):

* **Identity** (``SyntheticWorld.identity_params``): skin, hair and background colours, face size and
  position, eye spacing, mouth width, and the **voice** -- fundamental frequency ``f0`` (95..240 Hz)
  and a formant scale (0.85..1.2, correlated with ``f0``), so a model can infer appearance from voice
  and voice from appearance.
* **Speech**: words are strings of phones, one letter per phone (vowels ``a e i o u``, nasals
  ``m n``, liquid ``l``, stops ``b d p t k``, fricatives ``s f``). Vowels and voiced consonants are a
  glottal pulse train at the voice's pitch (declining over the utterance, with a slight vibrato) shaped
  by three formant resonances; stops are a closure followed by a short noise burst; fricatives are
  shaped noise; pauses (phone ``"_"``) are silent. Shaping happens in the STFT domain (512-point,
  hop 128) so a clip costs a few milliseconds.
* **Face**: anti-aliased ellipses (hair, face, eyes, lips, mouth) over a vertically graded
  background. The head sways by about a pixel, the eyes blink every 1.5..4 s, and the mouth's height
  follows the phone being spoken (open vowels wide open, ``i``/``u`` half, consonants nearly closed,
  pauses closed), smoothed with a 20 ms Gaussian (co-articulation). Lips and voice are in sync
  (offset 0).

Shapes and units of a :class:`Clip` (``N`` frames at ``fps``, ``T = N * sample_rate / fps`` samples):
``video`` uint8 ``[N, H, W, 3]``; ``audio`` float32 ``[T]`` in [-1, 1] at ``sample_rate`` Hz;
``mouth_open`` float32 ``[N]`` in [0, 1], the opening at each frame's centre time ``(n + 0.5) / fps``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.special import ndtr

# phone -> (kind, mouth opening in [0, 1], voiced RMS, noise RMS, noise colour, F1, F2, F3 in Hz)
# noise colour: 0 = broadband (f), 1 = high (s, t, k), 2 = low (p, b, d). Loudness grows with the
# mouth opening (open vowels loudest, closures silent), as in real speech.
_PHONES = {
    "a": ("vowel", 1.00, 1.00, 0.0, 0, 750, 1200, 2500),
    "o": ("vowel", 0.78, 0.80, 0.0, 0, 500, 850, 2500),
    "e": ("vowel", 0.62, 0.65, 0.0, 0, 480, 1850, 2550),
    "u": ("vowel", 0.42, 0.45, 0.0, 0, 320, 800, 2300),
    "i": ("vowel", 0.36, 0.40, 0.0, 0, 300, 2250, 3000),
    "l": ("liquid", 0.30, 0.28, 0.0, 0, 360, 1300, 2700),
    "m": ("nasal", 0.00, 0.10, 0.0, 0, 250, 1000, 2200),
    "n": ("nasal", 0.12, 0.12, 0.0, 0, 250, 1400, 2400),
    "b": ("stop", 0.00, 0.02, 0.20, 2, 250, 900, 2300),
    "p": ("stop", 0.00, 0.00, 0.22, 2, 250, 900, 2300),
    "d": ("stop", 0.08, 0.02, 0.20, 2, 250, 1600, 2600),
    "t": ("stop", 0.08, 0.00, 0.22, 1, 250, 1600, 2600),
    "k": ("stop", 0.12, 0.00, 0.22, 1, 250, 1900, 2600),
    "s": ("fric", 0.12, 0.00, 0.14, 1, 250, 1600, 2600),
    "f": ("fric", 0.05, 0.00, 0.07, 0, 250, 1200, 2500),
    "_": ("pause", 0.00, 0.00, 0.0, 0, 250, 1200, 2500),
}
# phone kind -> (min, max) duration in seconds
_DURATIONS = {
    "vowel": (0.10, 0.21),
    "liquid": (0.06, 0.10),
    "nasal": (0.06, 0.10),
    "stop": (0.07, 0.11),
    "fric": (0.08, 0.13),
    "pause": (0.06, 0.25),
}

DEFAULT_VOCABULARY = (
    "ba",
    "mia",
    "lobo",
    "tuki",
    "sami",
    "depa",
    "nolu",
    "fika",
    "moda",
    "pilo",
    "kusa",
    "bena",
    "tomi",
    "lafu",
    "sela",
    "dumo",
    "pika",
    "nabu",
    "oki",
    "ema",
    "ulas",
    "fenik",
    "mok",
    "tas",
)

_SKIN = np.array([[236, 200, 170], [224, 172, 138], [198, 140, 104], [160, 106, 72], [120, 80, 56], [242, 214, 190]], np.float32)
_HAIR = np.array([[30, 24, 20], [90, 56, 30], [170, 120, 60], [200, 190, 170], [120, 30, 20], [60, 60, 70]], np.float32)
_BACKGROUND = np.array(
    [[40, 90, 160], [60, 150, 90], [150, 60, 140], [30, 140, 150], [200, 200, 70], [90, 90, 200], [200, 90, 60], [70, 70, 70]],
    np.float32,
)
_MOUTH = np.array([70, 16, 26], np.float32)
_EYE = np.array([25, 25, 35], np.float32)


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Knobs of the synthetic world. ``min_seconds == max_seconds`` gives fixed-length clips.

    ``sample_rate`` must be a multiple of ``fps`` (16000 / 25 = 640 samples per frame) so a clip's
    audio lasts exactly as long as its video.
    """

    seed: int = 0
    video_size: int = 64
    fps: int = 25
    sample_rate: int = 16000
    min_seconds: float = 2.0
    max_seconds: float = 4.0
    num_identities: int = 16
    vocabulary: tuple[str, ...] = DEFAULT_VOCABULARY
    speech_gain: float = 0.7  # peak amplitude of every clip's waveform

    def validate(self) -> None:
        if self.sample_rate % self.fps:
            raise ValueError(
                f"WorldConfig.sample_rate={self.sample_rate} is not a multiple of fps={self.fps}; "
                "choose e.g. sample_rate=16000 with fps=25"
            )
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ValueError(f"WorldConfig needs 0 < min_seconds <= max_seconds, got {self.min_seconds}, {self.max_seconds}")
        if self.min_seconds * self.fps < 8:
            raise ValueError(f"WorldConfig.min_seconds={self.min_seconds} is shorter than 8 frames; use >= 0.32 s")
        if self.video_size < 32:
            raise ValueError(f"WorldConfig.video_size={self.video_size} is too small for a legible face; use >= 32")
        if self.num_identities < 1:
            raise ValueError(f"WorldConfig.num_identities={self.num_identities} must be >= 1")
        for word in self.vocabulary:
            bad = set(word) - (set(_PHONES) - {"_"})
            if not word or bad:
                raise ValueError(
                    f"WorldConfig.vocabulary word {word!r} has letters {sorted(bad)} that are not "
                    f"phones; use letters from {''.join(sorted(set(_PHONES) - {'_'}))}"
                )


@dataclasses.dataclass
class Clip:
    """One talking clip. See the module docstring for shapes and units."""

    video: np.ndarray  # uint8 [N, H, W, 3]
    audio: np.ndarray  # float32 [T] in [-1, 1], T = N * sample_rate / fps
    text: str  # transcript: the spoken words joined by spaces
    identity: int
    mouth_open: np.ndarray  # float32 [N] in [0, 1]
    phones: list[tuple[str, float, float]]  # (phone, start_s, end_s); "_" is a pause
    fps: int = 25
    sample_rate: int = 16000

    @property
    def seconds(self) -> float:
        return self.video.shape[0] / self.fps

    @property
    def utterance_span(self) -> tuple[float, float] | None:
        """``(start_s, end_s)`` from the first spoken phone's start to the last one's end (the pauses
        between words inside it count as speaking: the subject's turn); None when nothing is spoken."""
        spoken = [(s, e) for p, s, e in self.phones if p != "_"]
        return (spoken[0][0], spoken[-1][1]) if spoken else None


@dataclasses.dataclass(frozen=True)
class Identity:
    """Appearance and voice of one identity (lengths in pixels, colours 0..255, frequencies in Hz)."""

    skin: np.ndarray  # float32 [3]
    hair: np.ndarray
    background: np.ndarray
    face_rx: float
    face_ry: float
    cx: float
    cy: float
    eye_spacing: float  # half distance between the eyes
    mouth_width: float  # half width of the mouth
    f0: float
    formant_scale: float


class SyntheticWorld:
    """Deterministic talking-portrait generator: ``clip(index)`` is a pure function of (seed, index)."""

    def __init__(self, cfg: WorldConfig = WorldConfig()):
        cfg.validate()
        self.cfg = cfg
        self.samples_per_frame = cfg.sample_rate // cfg.fps
        self._identities = [self._make_identity(i) for i in range(cfg.num_identities)]

    # ----------------------------------------------------------------------------------- identities
    def identity_params(self, identity: int) -> Identity:
        return self._identities[identity]

    def _make_identity(self, identity: int) -> Identity:
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, 7_919, identity]))
        s = self.cfg.video_size / 64.0
        jitter = lambda: rng.uniform(-12, 12, 3).astype(np.float32)  # noqa: E731
        skin = np.clip(_SKIN[rng.integers(len(_SKIN))] + jitter(), 0, 255)
        hair = np.clip(_HAIR[rng.integers(len(_HAIR))] + jitter(), 0, 255)
        # A background far enough from the skin that the face is findable by colour contrast.
        order = rng.permutation(len(_BACKGROUND))
        background = next((_BACKGROUND[i] for i in order if np.linalg.norm(_BACKGROUND[i] - skin) > 90), _BACKGROUND[order[0]])
        background = np.clip(background + jitter(), 0, 255)
        rx = rng.uniform(16.5, 20.5) * s
        ry = rx * rng.uniform(1.15, 1.28)
        cx = self.cfg.video_size / 2 + rng.uniform(-3, 3) * s
        cy = float(np.clip(self.cfg.video_size / 2 + rng.uniform(-2, 3) * s, 1.2 * ry + 1, self.cfg.video_size - ry - 2))
        voice = rng.uniform()
        f0 = 95.0 * (240.0 / 95.0) ** voice  # log-uniform pitch
        formant_scale = 0.85 + 0.35 * (0.7 * voice + 0.3 * rng.uniform())
        return Identity(
            skin.astype(np.float32),
            hair.astype(np.float32),
            background.astype(np.float32),
            float(rx),
            float(ry),
            float(cx),
            cy,
            float(rx * rng.uniform(0.36, 0.48)),
            float(rx * rng.uniform(0.30, 0.40)),
            float(f0),
            float(formant_scale),
        )

    # ----------------------------------------------------------------------------------------- clip
    def num_frames(self, index: int) -> int:
        """Frame count of clip ``index`` (uniform in [min_seconds, max_seconds], rounded to frames)."""
        return self._plan(index)[0]

    def identity_of(self, index: int) -> int:
        """Identity of clip ``index`` (cheap: nothing is rendered)."""
        return self._plan(index)[1]

    def _plan(self, index: int):
        cfg = self.cfg
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, index]))
        lo, hi = int(round(cfg.min_seconds * cfg.fps)), int(round(cfg.max_seconds * cfg.fps))
        n = int(rng.integers(lo, hi + 1))
        identity = int(rng.integers(cfg.num_identities))
        return n, identity, rng

    def clip(self, index: int) -> Clip:
        """Clip ``index``: video, audio, transcript, identity, ground-truth mouth opening and phones."""
        if index < 0:
            raise ValueError(f"clip index must be >= 0, got {index}")
        cfg = self.cfg
        n, identity, rng = self._plan(index)
        ident = self._identities[identity]
        seconds = n / cfg.fps
        words, phones = _transcript(rng, cfg.vocabulary, seconds)
        audio = self._speech(rng, ident, phones, n * self.samples_per_frame)
        mouth = _mouth_track(phones, n, cfg.fps, rng)
        video = self._render(rng, ident, mouth, n)
        return Clip(video, audio, " ".join(words), identity, mouth, phones, cfg.fps, cfg.sample_rate)

    # --------------------------------------------------------------------------------------- speech
    def _speech(self, rng, ident: Identity, phones, num_samples: int) -> np.ndarray:
        sr, n_fft, hop = self.cfg.sample_rate, 512, 128
        t = np.arange(num_samples) / sr
        # Pitch: declination over the utterance + 5 Hz vibrato; a pulse at every wrap of the phase.
        f0 = ident.f0 * (1.08 - 0.16 * t / max(t[-1], 1e-6)) * (1 + 0.012 * np.sin(2 * np.pi * 5.1 * t))
        phase = np.cumsum(f0 / sr)
        pulses = np.diff(np.floor(phase), prepend=0.0).astype(np.float32) * np.sqrt(sr / ident.f0)
        noise = rng.standard_normal(num_samples).astype(np.float32)  # unit power, like the pulse train

        frames = 1 + num_samples // hop
        ft = np.arange(frames) * hop / sr  # STFT frame centre times
        ends = np.array([e for _, _, e in phones])
        starts = np.array([s for _, s, _ in phones])
        idx = np.minimum(np.searchsorted(ends, ft, side="right"), len(phones) - 1)
        table = np.array([_PHONES[p][1:] for p, _, _ in phones], np.float32)[idx]  # [frames, 7]
        kind = np.array([_PHONES[p][0] for p, _, _ in phones])[idx]
        pos = (ft - starts[idx]) / np.maximum(ends[idx] - starts[idx], 1e-6)  # position inside phone
        voiced, noise_gain, colour = table[:, 1], table[:, 2], table[:, 3].astype(int)
        is_stop = kind == "stop"
        noise_gain = np.where(is_stop, noise_gain * (pos > 0.72), noise_gain)  # burst at the release
        voiced = np.where(is_stop & (pos > 0.72), 0.0, voiced)
        formants = table[:, 4:7] * ident.formant_scale
        # Co-articulation: gains and formants glide over a few 8 ms STFT frames.
        voiced, noise_gain = _moving_average(voiced, 3), _moving_average(noise_gain, 2)
        formants = np.stack([_moving_average(formants[:, i], 5) for i in range(3)], axis=1)

        freqs = np.fft.rfftfreq(n_fft, 1 / sr).astype(np.float32)  # [257]
        bw = np.array([90.0, 110.0, 160.0], np.float32)
        gains = np.array([1.0, 0.55, 0.28], np.float32)
        r = (freqs[None, :, None] - formants[:, None, :]) / bw  # [frames, 257, 3]
        env = (gains / (1 + r * r)).sum(-1) + 0.01
        env *= np.minimum(1.0, (freqs / 80.0) ** 2) * np.exp(-freqs / 5000.0)  # no DC, gentle tilt
        # Unit-power filters (a white input keeps its power), so the table's gains are RMS levels.
        env /= np.sqrt(np.mean(env * env, axis=1, keepdims=True))
        h_voiced = voiced[:, None] * env
        shapes = np.stack(
            [np.ones_like(freqs), np.clip(freqs / 4500.0, 0, 1.4) ** 2, np.exp(-freqs / 1200.0)]
        )  # broadband / high / low noise
        shapes /= np.sqrt(np.mean(shapes * shapes, axis=1, keepdims=True))
        h_noise = noise_gain[:, None] * shapes[colour]
        spec = _stft(pulses, n_fft, hop) * h_voiced.T + _stft(noise, n_fft, hop) * h_noise.T
        wave = _istft(spec, n_fft, hop, num_samples)
        wave += 3e-4 * rng.standard_normal(num_samples)  # a faint noise floor: pauses are never exactly silent
        peak = np.max(np.abs(wave))
        return (wave * (self.cfg.speech_gain / max(peak, 1e-6))).astype(np.float32)

    # ---------------------------------------------------------------------------------------- video
    def _render(self, rng, ident: Identity, mouth: np.ndarray, n: int) -> np.ndarray:
        size, fps = self.cfg.video_size, self.cfg.fps
        s = size / 64.0
        t = np.arange(n, dtype=np.float32) / fps
        ph = rng.uniform(0, 2 * np.pi, 4)
        cx = ident.cx + s * (0.9 * np.sin(2 * np.pi * 0.31 * t + ph[0]) + 0.4 * np.sin(2 * np.pi * 0.73 * t + ph[1]))
        cy = ident.cy + s * (0.6 * np.sin(2 * np.pi * 0.23 * t + ph[2]) + 0.3 * np.sin(2 * np.pi * 0.57 * t + ph[3]))
        cx, cy = cx[:, None, None].astype(np.float32), cy[:, None, None].astype(np.float32)
        rx, ry = np.float32(ident.face_rx), np.float32(ident.face_ry)
        grid = np.arange(size, dtype=np.float32) + 0.5

        grade = 1.0 + 0.12 * (0.5 - grid / size)[:, None, None]  # vertical background gradient
        img = np.broadcast_to(np.clip(ident.background * grade, 0, 255), (n, size, size, 3)).astype(np.float32)

        def paint(colour, ex, ey, erx, ery, cut_below=None):
            """Paints an ellipse (per-frame centre/radii ``[n, 1, 1]``) inside its bounding box only."""
            ex, ey = np.broadcast_to(ex, (n, 1, 1)), np.broadcast_to(ey, (n, 1, 1))
            erx, ery = np.broadcast_to(erx, (n, 1, 1)), np.broadcast_to(ery, (n, 1, 1))
            x0, x1 = int(max(0, np.floor((ex - erx).min()) - 2)), int(min(size, np.ceil((ex + erx).max()) + 2))
            y0, y1 = int(max(0, np.floor((ey - ery).min()) - 2)), int(min(size, np.ceil((ey + ery).max()) + 2))
            if x0 >= x1 or y0 >= y1:
                return
            yy, xx = grid[y0:y1, None], grid[None, x0:x1]
            cover = _ellipse(xx, yy, ex, ey, erx, ery)
            if cut_below is not None:
                cover = cover * _sigmoid(cut_below - yy)
            sub = img[:, y0:y1, x0:x1]
            sub += cover[..., None] * (np.asarray(colour, np.float32) - sub)

        paint(ident.hair, cx, cy - 0.16 * ry, 1.1 * rx, 1.02 * ry, cut_below=cy + 0.15 * ry)
        paint(ident.skin, cx, cy, rx, ry)
        paint(ident.skin * 0.9, cx, cy + 0.05 * ry, 0.09 * rx, 0.08 * ry)  # nose shade
        # Eyes: white, then iris; blinks squash their height for ~3 frames.
        blink = np.ones(n, np.float32)
        frame = int(rng.uniform(0.3, 2.0) * fps)
        while frame < n:
            blink[frame : frame + 3] = (0.15, 0.05, 0.4)[: len(blink[frame : frame + 3])]
            frame += int(rng.uniform(1.5, 4.0) * fps)
        b = blink[:, None, None]
        for side in (-1.0, 1.0):
            ex, ey = cx + side * np.float32(ident.eye_spacing), cy - 0.18 * ry
            paint((235, 235, 235), ex, ey, 0.2 * rx, 0.12 * ry * b)
            paint(_EYE, ex, ey, 0.1 * rx, 0.1 * ry * b)
        # Mouth: lips (darker, redder skin) around a dark opening whose height follows the phones.
        m = mouth[:, None, None]
        mw = np.float32(ident.mouth_width) * (1.0 - 0.12 * m)
        mh = 0.03 * ry + 0.2 * ry * m
        my = cy + 0.45 * ry
        lips = np.clip(ident.skin * np.array([0.85, 0.6, 0.62], np.float32), 0, 255)
        paint(lips, cx, my, mw + 1.2 * s, mh + 1.1 * s)
        paint(_MOUTH, cx, my, mw, mh)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ helpers
def _transcript(rng, vocabulary, seconds: float):
    """Words and timed phones that fill ``seconds`` exactly (a leading and a trailing pause)."""
    phones = []
    t = rng.uniform(0.06, 0.22)
    phones.append(("_", 0.0, t))
    words = []
    budget = seconds - 0.08  # leave at least 80 ms of trailing silence
    while True:
        word = vocabulary[int(rng.integers(len(vocabulary)))]
        durs = [rng.uniform(*_DURATIONS[_PHONES[p][0]]) for p in word]
        gap = rng.uniform(*_DURATIONS["pause"]) if words and rng.uniform() < 0.6 else 0.0
        if t + gap + sum(durs) > budget:
            if words:
                break
            scale = (budget - t) / sum(durs)  # a very short clip: squeeze the one word in
            durs = [d * scale for d in durs]
        if gap:
            phones.append(("_", t, t + gap))
            t += gap
        for p, d in zip(word, durs):
            phones.append((p, t, t + d))
            t += d
        words.append(word)
        if len(words) == 1 and t >= budget:
            break
    phones.append(("_", t, seconds))
    return words, [(p, float(s), float(e)) for p, s, e in phones]


def _mouth_track(phones, n: int, fps: int, rng) -> np.ndarray:
    """Mouth opening at frame centres: per-phone targets (±8 % jitter) smoothed by a 20 ms Gaussian."""
    t = (np.arange(n) + 0.5) / fps
    starts = np.array([s for _, s, _ in phones])
    ends = np.array([e for _, _, e in phones])
    target = np.array([_PHONES[p][1] for p, _, _ in phones]) * rng.uniform(0.92, 1.08, len(phones))
    sigma = 0.02
    weight = ndtr((t[:, None] - starts) / sigma) - ndtr((t[:, None] - ends) / sigma)  # [N, P]
    return np.clip(weight @ target, 0.0, 1.0).astype(np.float32)


def _ellipse(xx, yy, cx, cy, rx, ry):
    """Anti-aliased coverage in [0, 1] of an axis-aligned ellipse (edge ~1 px wide)."""
    u, v = (xx - cx) / rx, (yy - cy) / ry
    g = np.sqrt(u * u + v * v) + 1e-6
    grad = np.sqrt((u / rx) ** 2 + (v / ry) ** 2) / g + 1e-6
    dist = (g - 1.0) / grad  # signed distance to the edge in pixels (first order)
    return np.clip(0.5 - dist, 0.0, 1.0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _moving_average(x: np.ndarray, width: int) -> np.ndarray:
    if width <= 1:
        return x
    kernel = np.hanning(width + 2)[1:-1]
    pad = np.pad(x, (width // 2, width - 1 - width // 2), mode="edge")
    return np.convolve(pad, kernel / kernel.sum(), mode="valid").astype(np.float32)


def _stft(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """Centred Hann STFT ``[n_fft // 2 + 1, 1 + len(x) // hop]`` (reflect padding, like librosa)."""
    pad = np.pad(x, n_fft // 2, mode="reflect")
    frames = 1 + len(x) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    return np.fft.rfft(pad[idx] * np.hanning(n_fft + 1)[:-1].astype(np.float32), axis=1).T


def _istft(spec: np.ndarray, n_fft: int, hop: int, length: int) -> np.ndarray:
    """Weighted overlap-add inverse of :func:`_stft`, trimmed to ``length`` samples."""
    window = np.hanning(n_fft + 1)[:-1]
    frames = np.fft.irfft(spec.T, n=n_fft, axis=1) * window
    total = n_fft + hop * (frames.shape[0] - 1)
    idx = (np.arange(n_fft)[None, :] + hop * np.arange(frames.shape[0])[:, None]).ravel()
    out = np.bincount(idx, weights=frames.ravel(), minlength=total)
    norm = np.bincount(idx, weights=np.tile(window * window, frames.shape[0]), minlength=total)
    out = out / np.maximum(norm, 1e-8)
    return out[n_fft // 2 : n_fft // 2 + length]
