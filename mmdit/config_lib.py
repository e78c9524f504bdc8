"""Loading experiment configs and the helpers config files share.

A config is a Python file with ``get_config(arg=None) -> ml_collections.ConfigDict`` (big_vision
style). ``load("configs/demo.py:tiny")`` calls ``get_config("tiny")``. A bare name (``demo``)
resolves to the configs shipped with the package (``mmdit_configs``), so installed users can run
the presets without a checkout. Nothing here mutates global jax/flax state.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

import ml_collections as mlc

from mmdit.model.streams import wan_latent_frames


def _configs_dir() -> str:
    try:
        import mmdit_configs

        return os.path.dirname(mmdit_configs.__file__)
    except ImportError:  # running from a checkout without install
        return os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")


def resolve_path(spec: str) -> tuple[str, str | None]:
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        name = os.path.basename(path)
        candidate = os.path.join(_configs_dir(), name if name.endswith(".py") else name + ".py")
        if os.path.exists(candidate):
            path = candidate
        else:
            raise FileNotFoundError(
                f"config {spec!r}: no file {path!r} and no shipped preset named {os.path.basename(path)!r} "
                f"(presets: {sorted(f[:-3] for f in os.listdir(_configs_dir()) if f.endswith('.py') and not f.startswith('_'))})"
            )
    return path, (arg or None)


def load(spec: str) -> mlc.ConfigDict:
    """``path/to/config.py[:arg]`` or a preset name -> ConfigDict (unlocked copies are up to callers)."""
    path, arg = resolve_path(spec)
    module_name = "_mmdit_config_" + os.path.basename(path)[:-3]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} has no get_config(arg=None) function")
    cfg = module.get_config(arg)
    if not isinstance(cfg, mlc.ConfigDict):
        cfg = mlc.ConfigDict(cfg)
    return cfg


def sibling(file: str, name: str, arg: str | None = None) -> mlc.ConfigDict:
    """Loads ``name.py`` from the directory of ``file`` (a config building on ``base.py``)."""
    path = os.path.join(os.path.dirname(os.path.abspath(file)), name + ".py")
    return load(path + (f":{arg}" if arg else ""))


def override(cfg: mlc.ConfigDict, assignments: list[str]) -> mlc.ConfigDict:
    """Applies ``a.b.c=value`` strings (values parsed as Python literals when possible)."""
    import ast

    for item in assignments or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected key=value, e.g. train.steps=100")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node:
                raise KeyError(f"override {item!r}: config has no field {key!r} (no {p!r})")
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"override {item!r}: config has no field {key!r}")
        with node.unlocked():
            node[parts[-1]] = value
    return cfg


def to_json(cfg: mlc.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o))


def write_resolved(cfg: mlc.ConfigDict, workdir: str) -> str:
    """Writes ``workdir/config.json`` atomically."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(to_json(cfg))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Stream builders shared by config files.


def video_stream(*, seconds, fps, height, width, temporal=4, spatial=16, channels=48, patch=(1, 2, 2), dim, ffn, cross=()):
    """A grid stream for a Wan-style causal video VAE (``1 + 4k`` frames -> ``1 + k`` latents)."""
    frames = 1 + int(round(seconds * fps - 1 + 1e-6)) // temporal * temporal
    if height % spatial or width % spatial:
        raise ValueError(f"video {height}x{width} is not a multiple of the VAE's spatial compression {spatial}")
    return dict(
        kind="grid",
        channels=channels,
        shape=(wan_latent_frames(frames, temporal), height // spatial, width // spatial),
        patch=tuple(patch),
        rate=fps / temporal,
        dim=dim,
        ffn=ffn,
        cross=tuple(cross),
        frames=frames,
        fps=fps,
    )


def sequence_stream(*, seconds, rate, channels, patch=1, dim, ffn, cross=(), condition=False, time_factor=None):
    """A sequence stream (audio latents, motion, audio features) at ``rate`` latents per second."""
    length = int(math.ceil(seconds * rate - 1e-6))
    length -= length % patch
    out = dict(kind="sequence", channels=channels, shape=(length,), patch=(patch,), rate=rate, dim=dim, ffn=ffn, cross=tuple(cross), condition=condition)
    if time_factor is not None:
        out["time_factor"] = time_factor
    return out
