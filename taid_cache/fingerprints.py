"""Hashes that tie a cache to the model, tokenizer and data it was made from (checked on resume and by stage two)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import UserError, first_line

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def resolve_model(model: str) -> Path:
    """A local model folder, downloading a hub id once (both engines then read the same files)."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"cannot load model {model}: the folder has no config.json")
        return path
    if path.exists() or model.startswith((".", "/")) or model.count("/") > 1:
        raise UserError(f"cannot load model {model}: no such model folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model))
    except Exception as exc:
        raise UserError(f"cannot load model {model}: not a local folder, and the hub gave: {first_line(exc)}") from None


def model_hash(folder: Path) -> str:
    """sha256 of config.json and the list of weight files with their sizes."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.iterdir()):
        if f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json"):
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return digest.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what decides token ids: the tokenizer's serialised model, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps(
        {"special": tokenizer.special_tokens_map, "chat_template": getattr(tokenizer, "chat_template", None)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256((body + extra).encode()).hexdigest()
