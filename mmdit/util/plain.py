"""Config values as plain Python (the one ConfigDict → dict conversion every module uses) and back from JSON."""

from __future__ import annotations

from typing import Any, Mapping


def plain(value: Any) -> Any:
    """ConfigDicts (anything with ``to_dict``) and mappings -> plain dicts, recursively, keeping key
    order; ``None`` stays ``None``; other values unchanged."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def config_from_json(value: Mapping):
    """A config (or a section of one) read back from JSON -> ``ml_collections.ConfigDict``, lists turned back
    into the tuples the config wrote (JSON has no tuples)."""
    import ml_collections as mlc

    def fix(v):
        if isinstance(v, Mapping):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return tuple(fix(x) for x in v)
        return v

    return mlc.ConfigDict(fix(value))
