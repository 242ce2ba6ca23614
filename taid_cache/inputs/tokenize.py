"""Dataset rows -> token sequences with a loss mask: chat rows through the tokenizer's chat template (the mask
covers the assistant turns), text rows (mask = every token), token rows as given."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError, first_line


@dataclass
class Sequence:
    sample_id: str
    input_ids: np.ndarray  # [T] int64
    loss_mask: np.ndarray  # [T] bool: True where token j is a training target


def render_chat(messages: list[dict[str, Any]], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The conversation through the chat template, and the character span of each assistant turn (after its
    header, up to and including its end-of-turn marker)."""

    def render(msgs: list[dict[str, Any]], prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
        if not text.startswith(render(messages[: i + 1], False)):
            raise UserError("the tokenizer's chat template does not render a conversation's prefix as a prefix of it")
        spans.append((start, end))
    return text, spans


def chat_sequence(text: str, spans: list[tuple[int, int]], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a rendered conversation, and the mask of the tokens that start inside an assistant span
    (through the offset mapping)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    starts = np.asarray([s for s, _ in encoded["offset_mapping"]], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        mask |= (starts >= start) & (starts < end)
    return ids, mask


class RowTokenizer:
    """Turns one dataset row into a Sequence (or None when it is dropped), saying what it changed."""

    def __init__(self, tokenizer, kind: str, max_length: int, overlong: str, tag: str) -> None:
        if kind == "chat" and not getattr(tokenizer, "chat_template", None):
            raise UserError("the data has chat rows but the model's tokenizer has no chat template")
        if kind == "chat" and not tokenizer.is_fast:
            raise UserError("chat rows need a fast tokenizer (offset mapping) to build the assistant mask")
        self.tokenizer, self.kind, self.max_length, self.overlong, self.tag = tokenizer, kind, max_length, overlong, tag

    def render(self, messages: list[dict[str, Any]], index: int) -> tuple[str, list[tuple[int, int]]]:
        try:
            return render_chat(messages, self.tokenizer)
        except UserError:
            raise
        except Exception as exc:  # the template's own checks (role order, unknown roles) raise many types
            raise UserError(f"row {index}: the chat template cannot render this conversation: {first_line(exc)}") from None

    def check_renders(self, rows, start: int, end: int) -> None:
        """Render every conversation of rows [start, end) once before anything is written: one the template
        rejects, met halfway through a dump, would leave committed shards whose settings refuse the corrected
        data. (Text and token-id rows cannot fail past `check_rows`.)"""
        if self.kind == "chat":
            for index, row in enumerate(rows.select(range(start, end)).select_columns(["messages"]), start=start):
                self.render(row["messages"], index)

    def __call__(self, row: dict[str, Any], index: int) -> tuple[Sequence | None, str | None]:
        """The row's sequence, and "truncated" or "dropped" (the dump cursor's counters) when it was changed."""
        if self.kind == "chat":
            ids, mask = chat_sequence(*self.render(row["messages"], index), self.tokenizer)
        elif self.kind == "text":
            ids = np.asarray(self.tokenizer(row["text"])["input_ids"], dtype=np.int64)
            mask = np.ones(len(ids), dtype=bool)
        else:
            ids = np.asarray(row["input_ids"], dtype=np.int64)
            given = row.get("loss_mask")
            mask = np.ones(len(ids), dtype=bool) if given is None else np.asarray(given, dtype=bool)
        if len(ids) > self.max_length:
            if self.overlong == "drop":
                return None, "dropped"
            ids, mask, change = ids[: self.max_length], mask[: self.max_length], "truncated"
        else:
            change = None
        if len(ids) < 2:  # nothing to predict
            return None, "dropped"
        sample_id = str(row["id"]) if row.get("id") is not None else f"{self.tag}-{index:09d}"
        return Sequence(sample_id, ids, mask), change
