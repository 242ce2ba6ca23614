"""Comparing recorded settings with a new command's: what a resumed or extended run may not change."""

from __future__ import annotations

from typing import Any


def describe_differences(old: dict[str, Any], new: dict[str, Any], old_label: str, new_label: str, shown: int = 3) -> str:
    """'' when equal, else the first few differing keys with both values, for a one-line error."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(f"{k} ({old.get(k)!r} {old_label}, {new.get(k)!r} {new_label})" for k in keys[:shown])
