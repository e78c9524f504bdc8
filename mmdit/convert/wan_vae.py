"""Converter family ``wan_vae``: diffusers ``AutoencoderKLWan`` (Wan2.1 z16 and Wan2.2 z48 video VAEs) ->
:class:`mmdit.codecs.wan_vae.WanVAE` params.

Our module mirrors diffusers' module tree, so the name map is mechanical: a torch name
``decoder.up_blocks.0.upsamplers.0.resample.1.weight`` is our path
``decoder/up_blocks_0/upsamplers_0/resample_1/kernel`` (an index joins the name before it with ``_``;
``weight`` -> ``kernel``; ``bias`` and RMS-norm ``gamma`` keep their names). Layouts: Conv3d ``weight
[out, in, kt, kh, kw]`` -> ``kernel [kt, kh, kw, in, out]``; Conv2d ``[out, in, kh, kw]`` -> ``[kh, kw,
in, out]``; ``gamma [C, 1, 1(, 1)]`` -> ``[C]``. Every param of our module (built abstractly from the
config) is looked up by its torch name and shape-checked; the runner rejects source tensors left over.

The target is ``{"kind": "wan_vae", "config": WanVAEConfig.to_dict()}`` (architecture + latent
statistics); ``WanVAECodec(checkpoint=DIR)`` rebuilds the codec from it.
"""

from __future__ import annotations

import re

import jax
import numpy as np

from mmdit.convert.source import ConvertError, cast

NAME = "wan_vae"
DESCRIPTION = "Wan video VAE (diffusers AutoencoderKLWan: Wan2.1 z16 8x8x4, Wan2.2 z48 16x16x4; the vae/ folder)"

# config.json keys that carry no architecture (training-time settings) and are ignored, besides "_"-prefixed
# bookkeeping keys (_class_name, _diffusers_version, _name_or_path, _use_default_values, ...).
IGNORED_KEYS = {"dropout"}


def matches(hf_config: dict) -> bool:
    return hf_config.get("_class_name") == "AutoencoderKLWan"


def _config(hf_config: dict):
    from mmdit.codecs.wan_vae import WanVAEConfig

    import dataclasses

    known = {f.name for f in dataclasses.fields(WanVAEConfig)} | IGNORED_KEYS
    unknown = sorted(k for k in hf_config if k not in known and not k.startswith("_"))
    if unknown:
        raise ConvertError(
            f"config.json has field(s) {unknown} this Wan VAE converter does not know (a newer AutoencoderKLWan variant?); "
            "update mmdit.convert.wan_vae / mmdit.codecs.wan_vae to support them"
        )
    try:
        return WanVAEConfig.from_dict(hf_config)
    except (ValueError, TypeError) as e:
        raise ConvertError(f"config.json: {e}") from None


def check(hf_config: dict) -> None:
    _config(hf_config)


def target(hf_config: dict) -> dict:
    return {"kind": NAME, "config": _config(hf_config).to_dict()}


def build(target: dict):
    from mmdit.codecs.wan_vae import WanVAE, WanVAEConfig

    return WanVAE(WanVAEConfig.from_dict(target["config"]))


def torch_name(path: tuple[str, ...]) -> str:
    """Our param path (without the leading ``params``) -> diffusers' state-dict name."""
    parts = [re.sub(r"^(.*)_(\d+)$", r"\1.\2", p) for p in path[:-1]]
    leaf = {"kernel": "weight"}.get(path[-1], path[-1])
    return ".".join([*parts, leaf])


def _layout(x: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "gamma":
        return x.reshape(-1)
    if leaf == "kernel":
        if x.ndim == 5:
            return x.transpose(2, 3, 4, 1, 0)
        if x.ndim == 4:
            return x.transpose(2, 3, 1, 0)
    return x


def convert(src, hf_config: dict, dtype) -> dict:
    from mmdit.codecs.wan_vae import abstract_params

    want = abstract_params(_config(hf_config))["params"]
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(want)[0]:
        keys = tuple(str(k.key) for k in path)
        name = torch_name(keys)
        if name not in src:
            raise ConvertError(
                f"{getattr(src, 'directory', '<source>')}: no tensor {name!r} (needed for {'/'.join(keys)}); "
                "the checkpoint does not match its config.json (dim_mult / num_res_blocks / is_residual?)"
            )
        x = _layout(src.get(name), keys[-1])
        if tuple(x.shape) != tuple(leaf.shape):
            raise ConvertError(
                f"{getattr(src, 'directory', '<source>')}: tensor {name!r} has shape {src.shape(name)}, which gives {x.shape}; "
                f"the config.json architecture needs {tuple(leaf.shape)}"
            )
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = cast(x, dtype)
    return {"params": out}
