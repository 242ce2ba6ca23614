"""Hashes that tie a cache to the model, tokenizer and data it was made from (checked on resume and by stage two)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import UserError, first_line

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def resolve_model(model: str, what: str = "model") -> Path:
    """A local model folder, downloading a hub id once (both engines then read the same files)."""
    from .gguf import is_gguf_source

    if is_gguf_source(model):
        raise UserError(f"{what} {model} is a GGUF file: convert it once with `taid-cache convert-gguf {model} FOLDER` "
                        "and pass FOLDER")
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"cannot load {what} {model}: the folder has no config.json")
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1 or "" in model.split("/"):
        raise UserError(f"cannot load {what} {model}: no such model folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model))
    except Exception as exc:
        raise UserError(f"cannot load {what} {model}: not a local folder, and the hub gave: {first_line(exc)}") from None


def file_xxh3(path: Path) -> str:
    """xxh3-128 of a file's whole content (xxhash releases the GIL, so files hash in parallel threads)."""
    import xxhash

    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, xxhash.xxh3_128).hexdigest()


def model_hash(folder: Path) -> str:
    """A hash of config.json and of every weight file's full content, so two checkpoints that differ in one
    weight differ here. xxh3-128 runs at several GB/s per core and files hash in parallel, so the cost is the
    time to read the weights once (a 60 GB teacher: about 20 s from a 3 GB/s disk)."""
    from concurrent.futures import ThreadPoolExecutor

    files = [folder / "config.json"] + [f for f in sorted(folder.iterdir())
                                        if f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json")]
    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
        digests = list(pool.map(file_xxh3, files))
    return hashlib.sha256("".join(f"{f.name}:{d}\n" for f, d in zip(files, digests)).encode()).hexdigest()


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
