"""One storage layer for caches, run folders, checkpoints and exports: a local path (`LocalStore`, today's
atomic files and flock leases) or any fsspec URL (`FsspecStore`; S3 with `pip install 'taid-cache[s3]'`)."""

from .attempts import attempt_name
from .base import Store, is_remote, join, open_store, register_store, remote_errors
from .local import LocalStore
from .remote import FsspecStore

register_store("file", LocalStore.from_url)
register_store("local", LocalStore.from_url)

__all__ = ["FsspecStore", "LocalStore", "Store", "attempt_name", "is_remote", "join", "open_store",
           "register_store", "remote_errors"]
