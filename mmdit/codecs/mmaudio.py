"""The MMAudio audio codec: waveform <-> MMAudio VAE latents, decoded to sound by its BigVGAN vocoder (jax).

Encode (waveform ``float32 [B, T]`` in [-1, 1] at ``sample_rate``): log-mel front end
(:mod:`mmdit.codecs.mmaudio_mel`, ``hop`` samples per frame) -> VAE encoder -> posterior **mean** (the
reference's ``latent_dist.mode()``) -> times ``scaling_factor`` -> latents ``float32 [B, L, C]``, ``L = T // (2 hop)``
(the encoder halves the frame rate). With MMAudio's 16 kHz model: hop 256, ``C = 20``, **31.25 latents per
second**, 512 samples (32 ms) per latent.

Decode (latents ``[B, L, C]``): divide by ``scaling_factor`` -> VAE decoder -> log-mel ``[B, 2L, M]`` -> vocoder ->
waveform ``float32 [B, 2 L hop]`` in [-1, 1]. ``scaling_factor`` is the checkpoint config's (diffusers' pipeline
multiplies the posterior mean by it before the DiT and divides before decoding); a codec argument overrides it.

**Chunked decode** (:meth:`MMAudioCodec.decode_init` / :meth:`MMAudioCodec.decode_chunk`): the decoder is not
causal (k=3 convolutions look both ways and its middle block attends over the whole clip) and BigVGAN's convs
look both ways too, so chunks cannot reproduce the one-shot decode exactly. Each chunk is decoded inside a window
of up to ``left_context`` earlier latents plus the chunk, and the last ``lookahead`` latents of what has been
received are held back (re-decoded with the next chunk, when their right-hand context exists); ``final=True``
flushes them. The concatenated chunks have exactly ``num_samples(L)`` samples; the difference from the one-shot
decode shrinks as ``left_context`` / ``lookahead`` grow and is zero once the window holds the whole clip (see
``tests/test_parity_mmaudio.py`` for the measured seam error). Latency: ``lookahead`` latents (32 ms each at 16 kHz).

Arrays: ``encode`` / ``decode`` accept numpy or jax and return numpy; jitted per input shape.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmdit.codecs.base import AudioCodec, check_wave
from mmdit.codecs.mmaudio_mel import MelFrontEnd
from mmdit.codecs.mmaudio_vae import autoencoder_from_target
from mmdit.codecs.mmaudio_vocoder import vocoder_from_target

VAE_KIND, VOCODER_KIND = "mmaudio_vae", "mmaudio_vocoder"


def _load(path: str, kind: str, arg: str) -> tuple[dict, Any]:
    from mmdit.util import converted

    manifest, params = converted.load(os.path.expanduser(str(path)))
    got = manifest.get("target", {}).get("kind")
    if got != kind:
        raise ValueError(
            f"codecs.audio.{arg}={path!r} holds a {got!r} checkpoint ({manifest.get('family')}), not {kind!r}; "
            f"convert the diffusers {'MMAudioVAE' if kind == VAE_KIND else 'MMAudioVocoder'} folder with "
            f"`mmdit convert --family {kind} --from DIR --to OUT` and pass OUT"
        )
    return manifest["target"], params


@partial(jax.jit, static_argnames=("front_end", "vae", "scaling_factor"))
def encode_latents(params, wave, *, front_end, vae, scaling_factor: float):
    """Waveform ``[B, T]`` -> scaled posterior mean ``[B, T // (2 hop), C]`` (jitted; modules are static)."""
    moments = vae.apply(params, front_end(wave), method=vae.encode)
    return moments[..., : vae.latent_channels] * scaling_factor


@partial(jax.jit, static_argnames=("vae", "vocoder", "scaling_factor"))
def decode_latents(vae_params, vocoder_params, latents, *, vae, vocoder, scaling_factor: float):
    """Scaled latents ``[B, L, C]`` -> waveform ``[B, 2 hop L]`` (jitted; modules are static, so codecs with the same
    configuration share compilations)."""
    mel = vae.apply(vae_params, latents.astype(jnp.float32) / scaling_factor, method=vae.decode)
    return vocoder.apply(vocoder_params, mel)


class MMAudioCodec(AudioCodec):
    """MMAudio VAE + BigVGAN vocoder as an :class:`~mmdit.codecs.base.AudioCodec` (see the module docstring).

    Args:
      vae, vocoder: converted checkpoint folders (``mmdit convert`` of diffusers ``MMAudioVAE`` /
        ``MMAudioVocoder``), loaded with :func:`mmdit.util.converted.load`.
      scaling_factor: latent scale (default: the VAE config's).
      dtype: compute dtype of the networks (``"float32"`` or ``"bfloat16"``; the mel front end and the
        normalisations stay float32).
      left_context, lookahead: chunked-decode window, in latents (see :meth:`decode_chunk`).
    """

    def __init__(
        self,
        vae: str,
        vocoder: str,
        scaling_factor: float | None = None,
        dtype: str = "float32",
        left_context: int = 32,
        lookahead: int = 8,
    ):
        vae_target, vae_params = _load(vae, VAE_KIND, "vae")
        voc_target, voc_params = _load(vocoder, VOCODER_KIND, "vocoder")
        self._setup(vae_target, vae_params, voc_target, voc_params, scaling_factor, dtype, left_context, lookahead)

    @classmethod
    def from_params(cls, vae_target: dict, vae_params, vocoder_target: dict, vocoder_params, **kwargs) -> "MMAudioCodec":
        """A codec from in-memory targets and params (``{"params": ...}`` as the converters return them)."""
        self = cls.__new__(cls)
        args = dict(scaling_factor=None, dtype="float32", left_context=32, lookahead=8) | kwargs
        self._setup(vae_target, vae_params, vocoder_target, vocoder_params, **args)
        return self

    def _setup(self, vae_target, vae_params, voc_target, voc_params, scaling_factor, dtype, left_context, lookahead):
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"codecs.audio.dtype={dtype!r}: use 'float32' or 'bfloat16'")
        if left_context < 0 or lookahead < 0:
            raise ValueError(f"codecs.audio: left_context={left_context} and lookahead={lookahead} must be >= 0")
        compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        self.vae_target, self.vocoder_target = dict(vae_target), dict(voc_target)
        self.front_end = MelFrontEnd.from_target(vae_target)
        self.vae = autoencoder_from_target(vae_target, dtype=compute)
        self.vocoder = vocoder_from_target(voc_target, dtype=compute)
        if self.vocoder.num_mels != self.vae.mel_bins:
            raise ValueError(
                f"codecs.audio: the vocoder takes {self.vocoder.num_mels} mel bins but the VAE makes {self.vae.mel_bins}; "
                "pair the VAE with the vocoder it was released with"
            )
        if self.vocoder.hop_length != self.front_end.hop_length:
            raise ValueError(
                f"codecs.audio: the vocoder upsamples {self.vocoder.hop_length}x (prod(upsample_rates)) but the VAE's mel "
                f"hop_length is {self.front_end.hop_length}; pair the VAE with the vocoder it was released with"
            )
        self.vae_params = jax.tree_util.tree_map(jnp.asarray, dict(vae_params))
        self.vocoder_params = jax.tree_util.tree_map(jnp.asarray, dict(voc_params))
        self.scaling_factor = float(vae_target.get("scaling_factor", 1.0) if scaling_factor is None else scaling_factor)
        self.sample_rate = int(vae_target["sample_rate"])
        self.latent_channels = int(vae_target["latent_channels"])
        self.samples_per_latent = 2 * self.front_end.hop_length
        self.latent_rate = self.sample_rate / self.samples_per_latent
        self.left_context, self.lookahead = int(left_context), int(lookahead)
        self.dtype = dtype

    def __repr__(self) -> str:
        return (
            f"MMAudioCodec({self.sample_rate} Hz, {self.front_end.num_mels} mels, hop {self.front_end.hop_length}) -> "
            f"{self.latent_rate:g} Hz x {self.latent_channels} ch, scaling {self.scaling_factor:g}, {self.dtype}"
        )

    # -- geometry ---------------------------------------------------------------------------------

    def latent_length(self, num_samples: int) -> int:
        """``L = num_samples // (2 hop)`` (512 samples per latent at 16 kHz)."""
        return int(num_samples) // self.samples_per_latent

    def num_samples(self, latent_length: int) -> int:
        """``T = 2 hop L``."""
        return int(latent_length) * self.samples_per_latent

    # -- jitted pieces ----------------------------------------------------------------------------

    def _encode(self, params, wave):
        return encode_latents(params, wave, front_end=self.front_end, vae=self.vae, scaling_factor=self.scaling_factor)

    def _decode(self, vae_params, vocoder_params, latents):
        return decode_latents(
            vae_params, vocoder_params, latents, vae=self.vae, vocoder=self.vocoder, scaling_factor=self.scaling_factor
        )

    def mel(self, wave) -> np.ndarray:
        """The front end alone: ``[B, T]`` -> log-mel ``float32 [B, T // hop, M]``."""
        check_wave(wave)
        return np.asarray(jax.jit(self.front_end)(jnp.asarray(wave, jnp.float32)))

    # -- AudioCodec -------------------------------------------------------------------------------

    def encode(self, wave, sample_rate: int | None = None) -> np.ndarray:
        """Waveform ``float32 [B, T]`` in [-1, 1] -> latents ``float32 [B, T // (2 hop), C]`` (scaled posterior mean)."""
        check_wave(wave)
        self.check_sample_rate(sample_rate)
        t = int(np.shape(wave)[1])
        if self.latent_length(t) < 1:
            raise ValueError(
                f"waveform of {t} samples is shorter than one latent ({self.samples_per_latent} samples at {self.sample_rate} Hz)"
            )
        return np.asarray(self._encode(self.vae_params, jnp.asarray(wave, jnp.float32)), np.float32)

    def decode(self, latents) -> np.ndarray:
        """Latents ``[B, L, C]`` -> waveform ``float32 [B, 2 hop L]`` in [-1, 1] (one shot)."""
        latents = self._check_latents(latents)
        return np.asarray(self._decode(self.vae_params, self.vocoder_params, latents), np.float32)

    def _check_latents(self, latents, name: str = "latents"):
        shape = tuple(np.shape(latents))
        if len(shape) != 3 or shape[-1] != self.latent_channels:
            raise ValueError(f"{name} must be [B, L, {self.latent_channels}] MMAudio latents, got shape {shape}")
        return jnp.asarray(latents, jnp.float32)

    # -- chunked decode ---------------------------------------------------------------------------

    def decode_init(self, batch_size: int) -> dict:
        """State before the first chunk: no context, nothing held back."""
        return {"context": jnp.zeros((int(batch_size), 0, self.latent_channels), jnp.float32), "held": 0, "emitted": 0}

    def decode_chunk(self, state: dict, latents, final: bool = False) -> tuple[dict, np.ndarray]:
        """Decodes the next ``[B, l, C]`` latents (``l >= 0``); returns ``(state, waveform [B, 2 hop n])``.

        ``n`` is the number of latents whose sound is now final: everything received except the last
        ``lookahead`` (all of it when ``final``). Their sound is taken from the decode of the window
        ``[up to left_context latents already emitted] + [held-back latents] + latents``. Over a stream, the
        concatenated outputs have ``num_samples(total latents)`` samples once ``final=True`` was passed.
        """
        latents = self._check_latents(latents)
        context, held = state["context"], int(state["held"])
        if latents.shape[0] != context.shape[0]:
            raise ValueError(f"chunk batch {latents.shape[0]} != the stream's {context.shape[0]} (decode_init(batch_size))")
        window = jnp.concatenate([context, latents], axis=1)
        pending = held + int(latents.shape[1])
        emit = pending if final else max(0, pending - self.lookahead)
        hop2 = self.samples_per_latent
        if emit == 0:
            wave = np.zeros((window.shape[0], 0), np.float32)
        else:
            start = int(window.shape[1]) - pending
            full = self._decode(self.vae_params, self.vocoder_params, window)
            wave = np.asarray(full[:, start * hop2 : (start + emit) * hop2], np.float32)
        keep = min(int(window.shape[1]), self.left_context + pending - emit)
        new_state = {"context": window[:, window.shape[1] - keep :], "held": pending - emit, "emitted": state["emitted"] + emit}
        return new_state, wave

    def decode_chunked(self, latents, chunk: int) -> np.ndarray:
        """Decodes ``[B, L, C]`` in chunks of ``chunk`` latents through :meth:`decode_chunk` (for tests and offline use)."""
        latents = self._check_latents(latents)
        state, out = self.decode_init(latents.shape[0]), []
        n = int(latents.shape[1])
        for i in range(0, max(n, 1), max(1, chunk)):
            state, wave = self.decode_chunk(state, latents[:, i : i + chunk], final=i + chunk >= n)
            out.append(wave)
        return np.concatenate(out, axis=1)

    def stream_decoder(self, batch: int):
        """Chunk-by-chunk windowed decode over :meth:`decode_chunk` (:class:`mmdit.codecs.streaming.MMAudioStreamDecoder`)."""
        from mmdit.codecs.streaming import MMAudioStreamDecoder

        return MMAudioStreamDecoder(self, batch)
