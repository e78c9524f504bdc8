"""Loading experiment configs and the helpers config files share.

A config is a Python file with ``get_config(arg=None) -> ml_collections.ConfigDict`` (big_vision
style). ``load("configs/demo.py:tiny")`` calls ``get_config("tiny")``. A bare name (``demo``)
resolves to the configs shipped with the package (``mmdit_configs``), so installed users can run
the presets without a checkout. Nothing here mutates global jax/flax state.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import types

import ml_collections as mlc

from mmdit.model.streams import wan_latent_frames


def _configs_dir() -> str:
    try:
        import mmdit_configs

        return os.path.dirname(mmdit_configs.__file__)
    except ImportError:  # running from a checkout without install
        return os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")


def _presets() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(_configs_dir()) if f.endswith(".py") and not f.startswith("_"))


def resolve_path(spec: str) -> tuple[str, str | None]:
    """``path/to/config.py[:arg]`` or a bare preset name (``demo``, ``demo.py``) -> (file, arg).

    Only a bare name (no directory part) falls back to the presets shipped with the package; a path
    that does not exist is an error, never a silent substitute. The file must be a ``.py`` file."""
    path, _, arg = spec.partition(":")
    if not path:
        raise ValueError(f"config {spec!r}: empty path; pass configs/X.py[:variant] or a preset name ({_presets()})")
    if not os.path.exists(path):
        bare = os.sep not in path and "/" not in path
        name = path if path.endswith(".py") else path + ".py"
        candidate = os.path.join(_configs_dir(), name)
        if bare and os.path.exists(candidate):
            path = candidate
        elif bare:
            raise FileNotFoundError(
                f"config {spec!r}: no file {path!r} and no shipped preset of that name (presets: {_presets()})"
            )
        else:
            raise FileNotFoundError(
                f"config {spec!r}: no file {path!r}; check the path (or pass a bare preset name; presets: {_presets()})"
            )
    if os.path.isdir(path):
        raise ValueError(f"config {spec!r}: {path!r} is a directory; pass a config file, e.g. configs/demo.py")
    if not path.endswith(".py"):
        raise ValueError(
            f"config {spec!r}: {path!r} is not a Python config (a .py file with get_config(arg=None)); "
            "a run's config.json is not a config file: pass the .py it was made from"
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
    try:
        cfg = module.get_config(arg)
    except UnknownVariantError as e:
        if e.config is not None:  # raised by a sibling config that get_config loaded: already names its file
            raise
        raise UnknownVariantError(e.unknown, e.known, spec.partition(":")[0]) from None  # the file as the user named it
    if not isinstance(cfg, mlc.ConfigDict):
        cfg = mlc.ConfigDict(cfg)
    return cfg


class UnknownVariantError(ValueError):
    """A config variant name its ``get_config`` does not know (:func:`parse_arg`). ``unknown``: the
    names given that are not variants; ``known``: the valid variant names; ``config``: the config file
    (set by :func:`load`, which knows it), for the example in the message."""

    def __init__(self, unknown: list[str], known: list[str], config: str | None = None):
        self.unknown, self.known, self.config = list(unknown), sorted(known), config
        where = config or "CONFIG.py"
        if not self.known:
            fix = f"this config has no variants: pass {where} alone"
        else:
            example = "tiny" if "tiny" in self.known else self.known[0]
            fix = f"valid variants: {', '.join(self.known)} (one, or several joined by commas), e.g. {where}:{example}"
        super().__init__(f"config {where}: unknown variant(s) {', '.join(map(repr, self.unknown))}; {fix}")


def parse_arg(arg: str | None, **variants: bool):
    """A config's variants (big_vision style): ``arg`` is a comma-separated list of variant names
    (``"tiny"``, ``"tiny,ovi"``), each one of ``variants`` (name -> default). Returns a frozen
    namespace ``v`` with ``v.<name>`` True for each given one. An unknown name is an
    :class:`UnknownVariantError` listing the valid names with an example (so ``demo.py:tinyy`` never
    silently becomes the full-size config)."""
    given = [a.strip() for a in (arg or "").split(",") if a.strip()]
    unknown = [a for a in given if a not in variants]
    if unknown:
        raise UnknownVariantError(unknown, list(variants))
    values = {k: bool(d) or k in given for k, d in variants.items()}
    return types.SimpleNamespace(**values)


def sibling(file: str, name: str, arg: str | None = None) -> mlc.ConfigDict:
    """Loads ``name.py`` from the directory of ``file`` (a config building on ``base.py``)."""
    path = os.path.join(os.path.dirname(os.path.abspath(file)), name + ".py")
    return load(path + (f":{arg}" if arg else ""))


# Mappings whose keys are names (tasks, streams, conditions...): ``--set`` may add new keys there.
OPEN_SECTIONS = (
    "tasks",
    "flow.stream_weights",
    "flow.condition_dropout",
    "sample.guidance",
    "sample.stream_shift",
    "model.streams",
    "model.conditions",
    "codecs",
    "world",
    "distill.guidance",
    "distill.tasks",
)
# Sections whose sub-dicts carry kind-specific options (validated by their registries, not here): ``--set``
# may add a new option inside one, e.g. ``encoders.text.max_length=256`` or ``codecs.video.luma_coeffs=2``.
OPEN_SUBSECTIONS = ("codecs", "encoders")


def _leaf_keys(node, prefix: str = "") -> list[str]:
    out = []
    for k in node.keys():
        v = node[k]
        out.append(prefix + k)
        if isinstance(v, mlc.ConfigDict):
            out += _leaf_keys(v, prefix + k + ".")
    return out


class UnknownFieldError(KeyError):
    """``--set`` named a field the config does not declare (a KeyError whose message prints plainly)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _unknown_key(cfg, item: str, key: str) -> KeyError:
    known = _leaf_keys(cfg)
    near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(map(repr, near))}?" if near else ""
    return UnknownFieldError(
        f"override {item!r}: the config has no field {key!r}{hint} (every field is declared in configs/base.py or the preset)"
    )


def override(cfg: mlc.ConfigDict, assignments: list[str]) -> mlc.ConfigDict:
    """Returns a copy of ``cfg`` with ``a.b.c=value`` strings applied (values parsed as Python literals
    when possible; ``cfg`` itself is not changed). A key the config does not declare is an error naming
    the nearest declared one, except a new name inside one of :data:`OPEN_SECTIONS` (e.g.
    ``tasks.tv2a=0.2``) or inside a sub-dict of :data:`OPEN_SUBSECTIONS`."""
    import ast

    cfg = cfg.copy_and_resolve_references()
    for item in assignments or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value, e.g. train.steps=100")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = cfg
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            if p not in node or not isinstance(node[p], mlc.ConfigDict):
                raise _unknown_key(cfg, item, ".".join(parts[: i + 1]) if p not in node else key)
            node = node[p]
        parent = ".".join(parts[:-1])
        open_section = parent in OPEN_SECTIONS or (len(parts) == 3 and parts[0] in OPEN_SUBSECTIONS)
        if parts[-1] not in node and not open_section:
            raise _unknown_key(cfg, item, key)
        with node.unlocked():
            try:
                node[parts[-1]] = value
            except TypeError as e:  # ml_collections' type check (e.g. a str for an int field)
                raise ValueError(f"override {item!r}: {e}") from None
    return cfg


def to_json(cfg: mlc.ConfigDict) -> str:
    return json.dumps(
        cfg.to_dict(), indent=2, sort_keys=True, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)
    )


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
    out = dict(
        kind="sequence",
        channels=channels,
        shape=(length,),
        patch=(patch,),
        rate=rate,
        dim=dim,
        ffn=ffn,
        cross=tuple(cross),
        condition=condition,
    )
    if time_factor is not None:
        out["time_factor"] = time_factor
    return out


def use_joint_guidance(c, dropout: float = 0.1, scale: float = 2.0) -> mlc.ConfigDict:
    """Joint guidance: per-modality CFG on the partner stream (Mirage; MMAudio's CFG on the video).
    ``model.joint_guidance`` makes cross-stream attention a keep-name ``joint``; training drops it for a
    ``dropout`` fraction of samples (their streams attend only within themselves), and sampling guides
    ``v = v_nojoint + scale * (v_joint - v_nojoint)`` after the text term (nested order text, then joint: the
    joint term is taken with the text present, ``v_text,joint - v_text``): the joint term comes last in
    ``sample.guidance_order``, after the guidance ``c`` already has, at ``scale`` for every generated stream."""
    streams = [n for n, s in c.model.streams.items() if not s.get("condition", False)]
    order = tuple(c.sample.get("guidance_order", ()) or sorted(c.sample.guidance.keys()))
    c.model.joint_guidance = True
    c.flow.condition_dropout.joint = dropout
    c.sample.guidance.joint = {n: scale for n in streams}
    c.sample.guidance_order = tuple(k for k in order if k != "joint") + ("joint",)
    return c


def tiny_audio_driven_cpu_setup(c: mlc.ConfigDict, *, side: int, seconds: float, feature_dim: int) -> None:
    """The ``:tiny`` CPU setup the audio-driven video-only presets share (Mirage, TalkingMachines): the
    synthetic world at ``side`` px and ``seconds`` per clip, the weight-free ``pixels`` codec in Wan's
    8x/4x layout, a ``feature_dim``-band 50 Hz log-mel standing in for wav2vec2 as ``audio_features``,
    and small data / sampling / checkpoint settings for tests."""
    c.world = dict(video_size=side, fps=25, sample_rate=16000, min_seconds=seconds, max_seconds=seconds, num_identities=4)
    c.codecs = dict(
        video=dict(kind="pixels", spatial=8, temporal=4, fps=25.0, luma_coeffs=2, chroma_coeffs=1),
        audio_features=dict(kind="mel", sample_rate=16000, hop_length=320, n_mels=feature_dim, stack=1),
    )
    c.sample.steps, c.sample.num_per_task = 2, 1
    c.data.num_train, c.data.num_eval, c.data.examples_per_shard = 8, 2, 8
    c.train.update(dict(global_batch_size=2, warmup_steps=1, ema_decay=0.5, log_every=1, checkpoint_every=1))
    c.train.update(dict(keep_checkpoints=1, async_checkpoint=False))
