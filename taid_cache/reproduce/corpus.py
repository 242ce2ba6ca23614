"""Text that ships with every Python install: the standard library's own source, split by file."""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from pathlib import Path


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo", "ensurepip")
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))


def split_of(path: Path, held_out_percent: int = 5) -> str:
    """A stable train / held-out split by file name hash."""
    bucket = int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 100
    return "heldout" if bucket < held_out_percent else "train"


def chat_pairs(source: str) -> list[list[dict[str, str]]]:
    """One conversation per documented function: user gives the signature and docstring, assistant the body."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        doc = node.body[0]
        if len(node.body) < 2:
            continue
        head = "\n".join(lines[node.lineno - 1 : doc.end_lineno])
        body = "\n".join(lines[doc.end_lineno : node.end_lineno])
        if body.strip():
            pairs.append([{"role": "user", "content": head}, {"role": "assistant", "content": body}])
    return pairs
