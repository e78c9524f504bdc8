"""Config values as plain Python (the one ConfigDict → dict conversion every module uses)."""

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
