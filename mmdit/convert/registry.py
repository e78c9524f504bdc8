"""The converter families: ``--family`` name -> module ``mmdit.convert.<name>``, imported lazily.

Each family module defines ``NAME``, ``DESCRIPTION`` (one line for ``mmdit convert --help``),
``matches(hf_config)`` (auto-detection from ``config.json``), ``check(hf_config)`` (raise
:class:`~mmdit.convert.source.ConvertError` naming the unsupported field), ``target(hf_config)``
(JSON-able ``{"kind": ..., **kwargs}`` that rebuilds our module), ``convert(src, hf_config, dtype)``
(nested numpy ``{"params": {...}}`` in ``dtype``) and ``build(target)`` (our module from ``target``).
Modules are imported only when a family is used, so one family's import cost (or absence) never
touches another's.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mmdit.convert.source import ConvertError

# Order matters only for detection messages; detection itself requires exactly one match.
FAMILIES: dict[str, str] = {
    "wan_dit": "mmdit.convert.wan_dit",
    "wan_vae": "mmdit.convert.wan_vae",
    "mmaudio_vae": "mmdit.convert.mmaudio_vae",
    "mmaudio_vocoder": "mmdit.convert.mmaudio_vocoder",
    "umt5": "mmdit.convert.umt5",
    "wav2vec2": "mmdit.convert.wav2vec2",
    "clip_vision": "mmdit.convert.clip_vision",
}
REQUIRED = ("NAME", "DESCRIPTION", "matches", "check", "target", "convert", "build")


def _import(name: str) -> ModuleType | None:
    """The family module, or None when its file does not exist (a family not shipped yet)."""
    module = FAMILIES[name]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return None
        raise


def validate(mod) -> None:
    """Raises ConvertError when ``mod`` lacks part of the family contract."""
    missing = [a for a in REQUIRED if not hasattr(mod, a)]
    if missing:
        raise ConvertError(f"converter family module {getattr(mod, '__name__', mod)!r} lacks {', '.join(missing)}")


def get(name) -> ModuleType:
    """The family module for ``--family name`` (a module object passes through after validation)."""
    if not isinstance(name, str):
        validate(name)
        return name
    if name not in FAMILIES:
        raise ConvertError(f"--family {name!r}: unknown; choose one of {', '.join(FAMILIES)}")
    mod = _import(name)
    if mod is None:
        raise ConvertError(f"--family {name!r}: its converter ({FAMILIES[name]}) is not installed in this mmdit build")
    validate(mod)
    return mod


def available() -> dict[str, ModuleType]:
    """``{name: module}`` of the families whose modules exist."""
    out = {}
    for name in FAMILIES:
        mod = _import(name)
        if mod is not None:
            out[name] = mod
    return out


def describe() -> list[tuple[str, str]]:
    """``[(name, one-line description)]`` for ``--help`` (``"(not available)"`` for a missing module)."""
    out = []
    for name in FAMILIES:
        try:
            mod = _import(name)
        except Exception as e:  # a broken family must not break --help
            out.append((name, f"(fails to import: {type(e).__name__}: {e})"))
            continue
        out.append((name, mod.DESCRIPTION if mod is not None else "(not available in this build)"))
    return out


def config_summary(hf_config: dict) -> str:
    """The identifying fields of a Hugging Face config, for messages."""
    keys = ("_class_name", "architectures", "model_type")
    found = {k: hf_config[k] for k in keys if k in hf_config}
    return ", ".join(f"{k}={v!r}" for k, v in found.items()) or "no _class_name/architectures/model_type"


def detect(hf_config: dict, where: str = "config.json") -> str:
    """The one family whose ``matches`` accepts ``hf_config``; ConvertError when none or several."""
    hits = [name for name, mod in available().items() if mod.matches(hf_config)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ConvertError(
            f"{where}: no converter family recognises this model ({config_summary(hf_config)}); known families: "
            f"{', '.join(FAMILIES)} -- pass --family NAME if it is one of them, else it is not supported"
        )
    raise ConvertError(f"{where}: several families match ({', '.join(hits)}); pass --family NAME")
