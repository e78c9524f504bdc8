"""Converter family ``mmaudio_vae``: diffusers ``MMAudioVAE`` (MMAudio's mel VAE; Kandinsky 6's ``audio_vae``) ->
:class:`mmdit.codecs.mmaudio_vae.MMAudioAutoencoder` params + the mel front-end settings.

Name map (diffusers -> ours; every conv ``weight [out, in, k]`` -> ``kernel [k, in, out]``):

* ``vae.data_mean`` / ``vae.data_std`` ``[1, M, 1]`` -> ``data_mean`` / ``data_std`` ``[M]``;
* ``vae.{encoder|decoder}.conv_in|conv_out|learnable_gain`` -> same names under ``encoder`` / ``decoder``;
* ``vae.encoder.down.{l}.block.{i}.*`` -> ``encoder/down_{l}_block_{i}/*``, ``down.{l}.downsample`` ->
  ``down_{l}_downsample``; ``vae.decoder.up.{l}...`` likewise (``up_{l}_block_{i}``, ``up_{l}_upsample``);
* ``vae.{encoder|decoder}.mid.{block_1|attn_1|block_2}.*`` -> ``.../mid/{block_1|attn_1|block_2}/*``.

``mel_converter.mel_basis`` / ``hann_window`` are buffers computed from the config; they are not converted but
checked against ours (a mismatch means the checkpoint's front end differs from the config).

**MMAudio's own checkpoints** (``v1-16.pth`` / ``v1-44.pth``, re-saved as safetensors next to a config.json with
``"_class_name": "MMAudioVAE"``; see BUILD.md) are recognised by their names (no ``vae.`` prefix) and their conv
weights get MMAudio's ``remove_weight_norm`` folded in (:func:`fold_mp_weight`); diffusers' release has it folded.

The target also carries ``log_base``: ``"e"`` (what diffusers computes) unless ``config.json`` has
``"mel_log_base": "10"`` -- MMAudio's original 16 kHz VAE was trained on ``log10`` mels, which diffusers'
class cannot express; set that key when converting a 16 kHz checkpoint re-saved in diffusers format.
"""

from __future__ import annotations

import re

import numpy as np

from mmdit.convert.param_tree import ParamTree, abstract_shapes
from mmdit.convert.source import ConvertError

NAME = "mmaudio_vae"
DESCRIPTION = "MMAudio mel-spectrogram VAE (diffusers MMAudioVAE: Kandinsky 6 audio_vae, MMAudio 16 kHz / 44.1 kHz)"

DEFAULTS = dict(
    mel_bins=128,
    latent_channels=40,
    hidden_channels=512,
    channel_multipliers=[1, 2, 4],
    layers_per_block=2,
    sample_rate=44100,
    n_fft=2048,
    hop_length=512,
    scaling_factor=0.417,
)
BASIS_TOL = 1e-5
NORMALIZE_EPS = (
    1e-4  # MMAudio's weight normalisation eps  # max |ours - stored| of the mel filterbank (both float32 of the same formula)
)


def matches(hf_config: dict) -> bool:
    return hf_config.get("_class_name") == "MMAudioVAE"


def _cfg(hf_config: dict) -> dict:
    return {k: hf_config.get(k, v) for k, v in DEFAULTS.items()}


def check(hf_config: dict) -> None:
    c = _cfg(hf_config)
    mults = list(c["channel_multipliers"])
    if len(mults) < 2:
        raise ConvertError(
            f"config.json channel_multipliers={mults}: the MMAudio VAE needs >= 2 levels (it upsamples after level 1)"
        )
    if c["layers_per_block"] < 1:
        raise ConvertError(f"config.json layers_per_block={c['layers_per_block']}: must be >= 1")
    if c["n_fft"] < c["hop_length"] or (c["n_fft"] - c["hop_length"]) % 2:
        raise ConvertError(
            f"config.json n_fft={c['n_fft']}, hop_length={c['hop_length']}: need n_fft >= hop_length with an even difference"
        )
    if str(hf_config.get("mel_log_base", "e")) not in ("e", "10"):
        raise ConvertError(
            f"config.json mel_log_base={hf_config['mel_log_base']!r}: use 'e' (diffusers) or '10' (MMAudio 16 kHz)"
        )


def target(hf_config: dict) -> dict:
    c = _cfg(hf_config)
    return {
        "kind": "mmaudio_vae",
        "mel_bins": int(c["mel_bins"]),
        "latent_channels": int(c["latent_channels"]),
        "hidden_channels": int(c["hidden_channels"]),
        "channel_multipliers": [int(m) for m in c["channel_multipliers"]],
        "layers_per_block": int(c["layers_per_block"]),
        "sample_rate": int(c["sample_rate"]),
        "n_fft": int(c["n_fft"]),
        "hop_length": int(c["hop_length"]),
        "scaling_factor": float(c["scaling_factor"]),
        "log_base": str(hf_config.get("mel_log_base", "e")),
    }


def build(target: dict):
    """Our ``MMAudioAutoencoder`` (the mel front end is :func:`mel_front_end`)."""
    from mmdit.codecs.mmaudio_vae import autoencoder_from_target

    return autoencoder_from_target(target)


def mel_front_end(target: dict):
    from mmdit.codecs.mmaudio_mel import MelFrontEnd

    return MelFrontEnd.from_target(target)


def IGNORED(hf_config: dict):
    return ("mel_converter.*",)


_BLOCK = re.compile(r"^(down|up)\.(\d+)\.(block)\.(\d+)\.(.*)$")
_RESAMPLE = re.compile(r"^(down|up)\.(\d+)\.(downsample|upsample)\.(.*)$")


def is_original_layout(names) -> bool:
    """True for MMAudio's own state dict (``encoder.*``, ``decoder.*``, ``data_mean`` at the top level, weights not
    yet normalised), False for diffusers' (everything under ``vae.``)."""
    return not any(n.startswith("vae.") for n in names) and "encoder.conv_in.weight" in names


def fold_mp_weight(w: np.ndarray) -> np.ndarray:
    """MMAudio's ``MPConv1D.remove_weight_norm``: unit-RMS rows then ``1 / sqrt(fan_in)``:
    ``w / (1e-4 + |w_o| / sqrt(fan_in)) / sqrt(fan_in)`` per output channel ``o`` (``w [out, in, k]``), in float32."""
    w = np.asarray(w, np.float32)
    fan_in = int(np.prod(w.shape[1:]))
    norm = np.sqrt(np.sum(np.square(w, dtype=np.float64), axis=tuple(range(1, w.ndim)), keepdims=True)).astype(np.float32)
    w = w / (np.float32(NORMALIZE_EPS) + norm * np.float32(1.0 / np.sqrt(fan_in)))
    return (w / np.float32(np.sqrt(fan_in))).astype(np.float32)


def our_path(name: str, original: bool = False) -> tuple[str, ...] | None:
    """Our param path for a diffusers tensor name (None for the front-end buffers); ``original``: MMAudio's own
    names (the same without the ``vae.`` prefix)."""
    if name.startswith("mel_converter."):
        return None
    if original:
        name = "vae." + name
    if not name.startswith("vae."):
        raise ConvertError(f"unexpected tensor {name!r} in an MMAudioVAE checkpoint (expected vae.* or mel_converter.*)")
    rest = name[len("vae.") :]
    if rest in ("data_mean", "data_std"):
        return (rest,)
    part, _, rest = rest.partition(".")
    if part not in ("encoder", "decoder"):
        raise ConvertError(f"unexpected tensor {name!r} in an MMAudioVAE checkpoint")
    m = _BLOCK.match(rest)
    if m:
        head, tail = f"{m[1]}_{m[2]}_block_{m[4]}", m[5]
    else:
        m = _RESAMPLE.match(rest)
        if m:
            head, tail = f"{m[1]}_{m[2]}_{m[3]}", m[4]
        elif rest.startswith("mid."):
            head, tail = "mid", rest[len("mid.") :]
        else:
            head, tail = None, rest
    parts = [part] + ([head] if head else []) + tail.split(".")
    if parts[-1] == "weight":
        parts[-1] = "kernel"
    return tuple(parts)


def expected_shapes(target: dict) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{param path: shape}`` of our module for ``target`` (abstract init: no compute)."""
    import jax
    import jax.numpy as jnp

    return abstract_shapes(build(target), jax.ShapeDtypeStruct((1, 8, target["mel_bins"]), jnp.float32))


def convert(src, hf_config: dict, dtype) -> dict:
    tgt = target(hf_config)
    tree = ParamTree(expected_shapes(tgt), where=src.directory, what="MMAudio VAE", dtype=dtype)
    names = src.names()
    original = is_original_layout(names)
    for name in names:
        path = our_path(name, original)
        if path is None:
            continue
        x = src.get(name)
        if path[-1] in ("data_mean", "data_std"):
            x = x.reshape(-1)
        elif path[-1] == "kernel":
            if x.ndim != 3:
                raise ConvertError(f"{src.directory}: tensor {name!r} has shape {x.shape}; expected a conv weight [out, in, k]")
            if original:
                x = fold_mp_weight(x)
            x = np.ascontiguousarray(x.transpose(2, 1, 0))
        tree.put(name, path, x)
    params = tree.finish()
    _check_front_end(src, tgt)
    return params


def _check_front_end(src, tgt: dict) -> None:
    """The stored mel filterbank / window (if present) equal ours for the config."""
    fe = mel_front_end(tgt)
    for name, ours in (("mel_converter.mel_basis", fe.basis), ("mel_converter.hann_window", fe.window)):
        if name not in src:
            continue
        theirs = src.get(name)
        if theirs.shape != ours.shape or float(np.max(np.abs(theirs - ours))) > BASIS_TOL:
            raise ConvertError(
                f"{src.directory}: {name} {theirs.shape} differs from the front end config.json describes "
                f"(sample_rate={tgt['sample_rate']}, n_fft={tgt['n_fft']}, mel_bins={tgt['mel_bins']}); fix the config"
            )
