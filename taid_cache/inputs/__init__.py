"""Stage one's input: dataset rows (dataset.py) -> token sequences with a loss mask (tokenize.py)."""

from .dataset import KINDS, check_rows, dataset_fingerprint, detect_kind, load_rows, resolve_data, source_tag, worker_slice
from .tokenize import RowTokenizer, Sequence

__all__ = ["KINDS", "check_rows", "resolve_data", "dataset_fingerprint", "detect_kind", "load_rows", "source_tag", "worker_slice", "RowTokenizer", "Sequence"]
