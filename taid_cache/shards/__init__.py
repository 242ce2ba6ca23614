"""The cache format: schema, codec, writer, reader. See docs/FORMAT.md."""

from .reader import read_cache

__all__ = ["read_cache"]
