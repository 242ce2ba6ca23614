"""The cache format: its typed contract, schema, codec, writer, reader. See docs/FORMAT.md."""

from .contract import CacheRecord, CacheSettings, Manifest, ShardEntry
from .manifest import load_manifest
from .reader import read_cache

__all__ = ["CacheRecord", "CacheSettings", "Manifest", "ShardEntry", "load_manifest", "read_cache"]
