"""Converter family ``mmaudio_vocoder``: diffusers ``MMAudioVocoder`` (MMAudio's BigVGAN; Kandinsky 6's
``vocoder``) -> :class:`mmdit.codecs.mmaudio_vocoder.MMAudioVocoder` params.

Name map (diffusers -> ours):

* ``conv_pre.*``, ``conv_post.*`` -> same (``weight [out, in, k]`` -> ``kernel [k, in, out]``);
* ``ups.{s}.0.weight [in, out, k]`` (a ``ConvTranspose1d``) -> ``ups_{s}/kernel [k, in, out]`` (transposed, not
  flipped: our layer flips), ``ups.{s}.0.bias`` -> ``ups_{s}/bias``;
* ``resblocks.{n}.convs1|convs2.{i}.*`` -> ``resblocks_{n}/convs1_{i}|convs2_{i}/*``;
* ``resblocks.{n}.activations.{j}.act.alpha|beta`` -> ``resblocks_{n}/act_{j}/alpha|beta``,
  ``activation_post.act.*`` -> ``activation_post/*``.

The anti-aliasing filters (``*.upsample.filter``, ``*.downsample.lowpass.filter``) are fixed buffers: checked
against ours, not converted.

Weight-normed convs (BigVGAN training checkpoints such as MMAudio's 16 kHz ``best_netG.pt``: ``X.weight_g`` /
``X.weight_v``, or torch's ``X.parametrizations.weight.original0/1``) are folded to ``g * v / |v|`` as
``remove_weight_norm`` does; the rest of the names are diffusers' (BigVGAN's own).

Optional ``config.json`` keys beyond diffusers' (for MMAudio's own 16 kHz BigVGAN re-saved in this layout):
``use_bias_at_final`` (a ``conv_post.bias``; default: whether the checkpoint has one) and ``use_tanh_at_final``
(``tanh`` instead of diffusers' clip to [-1, 1]; default false).
"""

from __future__ import annotations

import re

import numpy as np

from mmdit.convert.param_tree import ParamTree, abstract_shapes
from mmdit.convert.source import ConvertError

NAME = "mmaudio_vocoder"
DESCRIPTION = "MMAudio BigVGAN vocoder (diffusers MMAudioVocoder: Kandinsky 6 vocoder, MMAudio 16 kHz / 44.1 kHz BigVGAN)"

DEFAULTS = dict(
    num_mels=128,
    upsample_initial_channel=1536,
    upsample_rates=[8, 4, 2, 2, 2, 2],
    upsample_kernel_sizes=[16, 8, 4, 4, 4, 4],
    resblock_kernel_sizes=[3, 7, 11],
    resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
)
FILTER_TOL = 1e-6


def matches(hf_config: dict) -> bool:
    return hf_config.get("_class_name") == "MMAudioVocoder"


def _cfg(hf_config: dict) -> dict:
    return {k: hf_config.get(k, v) for k, v in DEFAULTS.items()}


def check(hf_config: dict) -> None:
    c = _cfg(hf_config)
    if len(c["upsample_rates"]) != len(c["upsample_kernel_sizes"]):
        raise ConvertError(
            f"config.json upsample_rates={c['upsample_rates']} and upsample_kernel_sizes={c['upsample_kernel_sizes']} differ in length"
        )
    if len(c["resblock_kernel_sizes"]) != len(c["resblock_dilation_sizes"]):
        raise ConvertError("config.json resblock_kernel_sizes and resblock_dilation_sizes differ in length")
    for r, k in zip(c["upsample_rates"], c["upsample_kernel_sizes"]):
        if (k - r) % 2:
            raise ConvertError(
                f"config.json upsample_kernel_sizes: kernel {k} with rate {r} (odd k - r) does not upsample exactly {r}x; "
                "only exact upsampling is supported"
            )
    if c["upsample_initial_channel"] % (2 ** len(c["upsample_rates"])):
        raise ConvertError(
            f"config.json upsample_initial_channel={c['upsample_initial_channel']} does not halve {len(c['upsample_rates'])} times"
        )


def target(hf_config: dict) -> dict:
    c = _cfg(hf_config)
    return {
        "kind": "mmaudio_vocoder",
        "num_mels": int(c["num_mels"]),
        "upsample_initial_channel": int(c["upsample_initial_channel"]),
        "upsample_rates": [int(r) for r in c["upsample_rates"]],
        "upsample_kernel_sizes": [int(k) for k in c["upsample_kernel_sizes"]],
        "resblock_kernel_sizes": [int(k) for k in c["resblock_kernel_sizes"]],
        "resblock_dilation_sizes": [[int(d) for d in ds] for ds in c["resblock_dilation_sizes"]],
        "final_bias": bool(hf_config.get("use_bias_at_final", False)),
        "final_activation": "tanh" if hf_config.get("use_tanh_at_final", False) else "clip",
    }


def build(target: dict):
    from mmdit.codecs.mmaudio_vocoder import vocoder_from_target

    return vocoder_from_target(target)


def IGNORED(hf_config: dict):
    return ("*.filter",)


_RULES = [
    (re.compile(r"^ups\.(\d+)\.0\.(weight|bias)$"), lambda m: (f"ups_{m[1]}", m[2])),
    (
        re.compile(r"^resblocks\.(\d+)\.(convs1|convs2)\.(\d+)\.(weight|bias)$"),
        lambda m: (f"resblocks_{m[1]}", f"{m[2]}_{m[3]}", m[4]),
    ),
    (
        re.compile(r"^resblocks\.(\d+)\.activations\.(\d+)\.act\.(alpha|beta)$"),
        lambda m: (f"resblocks_{m[1]}", f"act_{m[2]}", m[3]),
    ),
    (re.compile(r"^activation_post\.act\.(alpha|beta)$"), lambda m: ("activation_post", m[1])),
    (re.compile(r"^(conv_pre|conv_post)\.(weight|bias)$"), lambda m: (m[1], m[2])),
]


def our_path(name: str) -> tuple[str, ...] | None:
    """Our param path for a diffusers tensor name (None for the fixed filter buffers)."""
    if name.endswith(".filter"):
        return None
    for pattern, fn in _RULES:
        m = pattern.match(name)
        if m:
            path = fn(m)
            return path[:-1] + ("kernel",) if path[-1] == "weight" else path
    raise ConvertError(f"unexpected tensor {name!r} in an MMAudioVocoder checkpoint")


def expected_shapes(target: dict) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{param path: shape}`` of our vocoder for ``target`` (abstract init: no compute)."""
    import jax
    import jax.numpy as jnp

    return abstract_shapes(build(target), jax.ShapeDtypeStruct((1, 4, target["num_mels"]), jnp.float32))


_WEIGHT_NORM = (  # (magnitude, direction) suffixes of a weight-normed ``X.weight``: old-style and parametrize-style
    (".weight_g", ".weight_v"),
    (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
)


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``torch.nn.utils.weight_norm`` (dim 0) folded: ``g * v / |v|`` with the norm over every axis but the first."""
    v = np.asarray(v, np.float32)
    norm = np.sqrt(np.sum(np.square(v, dtype=np.float64), axis=tuple(range(1, v.ndim)), keepdims=True)).astype(np.float32)
    return (np.asarray(g, np.float32).reshape(norm.shape) * v / norm).astype(np.float32)


def logical_tensors(src) -> dict:
    """``{name: loader}`` with each weight-normed pair (BigVGAN training checkpoints, e.g. MMAudio's 16 kHz
    ``best_netG.pt``) merged into one ``X.weight`` whose loader folds it; other tensors load as stored."""
    names = src.names()
    out = {}
    paired = set()
    for name in names:
        for g_suf, v_suf in _WEIGHT_NORM:
            if name.endswith(g_suf):
                base = name[: -len(g_suf)]
                if base + v_suf not in names:
                    raise ConvertError(f"{src.directory}: {name!r} without its direction tensor {base + v_suf!r}")
                out[base + ".weight"] = lambda g=name, v=base + v_suf: fold_weight_norm(src.get(g), src.get(v))
                paired.update((name, base + v_suf))
    for name in names:
        if name not in paired:
            if any(name.endswith(v_suf) for _, v_suf in _WEIGHT_NORM):
                raise ConvertError(f"{src.directory}: {name!r} without its weight-norm magnitude tensor")
            out[name] = lambda n=name: src.get(n)
    return out


def convert(src, hf_config: dict, dtype) -> dict:
    tensors = logical_tensors(src)
    if "conv_post.bias" in tensors and "use_bias_at_final" not in hf_config:
        hf_config = dict(hf_config, use_bias_at_final=True)
    tgt = target(hf_config)
    tree = ParamTree(expected_shapes(tgt), where=src.directory, what="vocoder", dtype=dtype)
    for name in sorted(tensors):
        path = our_path(name)
        if path is None:
            _check_filter(src, name)
            continue
        x = tensors[name]()
        if path[-1] == "kernel":
            if x.ndim != 3:
                raise ConvertError(f"{src.directory}: tensor {name!r} has shape {x.shape}; expected a conv weight")
            # Conv1d [out, in, k] -> [k, in, out]; ConvTranspose1d [in, out, k] -> [k, in, out]
            x = x.transpose(2, 0, 1) if path[0].startswith("ups_") else x.transpose(2, 1, 0)
            x = np.ascontiguousarray(x)
        tree.put(name, path, x)
    no_bias = tree.missing()[:1] == [("conv_post", "bias")]
    return tree.finish(
        "config.json use_bias_at_final is true but there is no conv_post.bias" if no_bias else "the checkpoint is incomplete"
    )


def _check_filter(src, name: str) -> None:
    from mmdit.codecs.mmaudio_vocoder import AA_RATIO, AA_TAPS, kaiser_sinc_lowpass

    ours = kaiser_sinc_lowpass(0.5 / AA_RATIO, 0.6 / AA_RATIO, AA_TAPS)
    theirs = src.get(name).reshape(-1)
    if theirs.shape != ours.shape or float(np.max(np.abs(theirs - ours))) > FILTER_TOL:
        raise ConvertError(
            f"{src.directory}: anti-aliasing filter {name!r} ({theirs.shape}) differs from the fixed {AA_TAPS}-tap "
            f"Kaiser-sinc low-pass of ratio {AA_RATIO}; this is not an MMAudio BigVGAN"
        )
