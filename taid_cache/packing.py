"""Laying token sequences into rows of a batch: one per row, right-padded, or several per row, packed.

Packed rows carry position ids that restart at 0 for each sequence (and for the padding tail) and no attention
mask; from that, transformers builds a block-diagonal causal mask (SDPA, eager) or uses variable-length flash
attention, so each position sees only its own sequence. `keeps_sequences_apart` checks a model does so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of the sequences in each row of at most `capacity` tokens (stable on ties)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


@dataclass
class RowLayout:
    """Where each sequence sits: `starts[i]` is the flat index (row · width + offset) of sequence i's first token."""

    lengths: list[int]
    starts: list[int]
    rows: int
    width: int
    packed: bool

    def flat_positions(self, drop_last: bool = False) -> torch.Tensor:
        """Flat indices of every token (or every token but each sequence's last), in sequence order."""
        cut = 1 if drop_last else 0
        return torch.cat([torch.arange(s, s + n - cut) for s, n in zip(self.starts, self.lengths)])

    def grid(self, per_sequence: list[np.ndarray], fill: float | int, drop_last: bool = False) -> torch.Tensor:
        """[rows, width, ...] from one array per sequence (its tokens, or its positions but the last), `fill` elsewhere."""
        values = torch.from_numpy(np.concatenate(per_sequence))
        out = torch.full((self.rows * self.width, *values.shape[1:]), fill, dtype=values.dtype)
        out[self.flat_positions(drop_last)] = values
        return out.view(self.rows, self.width, *values.shape[1:])

    def model_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The decoder's keyword arguments: position ids when packed, an attention mask when padded."""
        real = self.grid([np.ones(n, np.int64) for n in self.lengths], 0)
        if not self.packed:
            return {"input_ids": input_ids, "attention_mask": real}
        # Each row's sequences fill it from column 0; the padding tail after them counts as a sequence of its own.
        positions = self.grid([np.arange(n) for n in self.lengths], 0)
        tail = torch.arange(self.width) - real.sum(1, keepdim=True)
        return {"input_ids": input_ids, "position_ids": torch.where(real.bool(), positions, tail)}


def lay_out(lengths: list[int], capacity: int, pack: bool) -> RowLayout:
    """Rows for sequences of these lengths: packed into rows of at most `capacity` tokens, or one per row."""
    rows = pack_rows(lengths, capacity) if pack else [[i] for i in range(len(lengths))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    starts = [0] * len(lengths)
    for r, members in enumerate(rows):
        at = r * width
        for i in members:
            starts[i] = at
            at += lengths[i]
    return RowLayout(lengths, starts, len(rows), width, pack)


def keeps_sequences_apart(decoder: Callable[..., object], device: torch.device) -> bool:
    """Whether `decoder` (a transformers base model) gives two short sequences packed into one row the hidden
    states it gives them alone, i.e. honours restarting position ids instead of attending across the row."""
    a, b = torch.arange(1, 6) % 7, torch.arange(3, 0, -1)  # small token ids exist in every vocabulary
    layout = lay_out([5, 3], 8, pack=True)
    inputs = layout.model_inputs(layout.grid([a.numpy(), b.numpy()], 0))
    with torch.no_grad():
        alone = torch.cat([decoder(input_ids=x[None].to(device), use_cache=False).last_hidden_state[0] for x in (a, b)])
        packed = decoder(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False).last_hidden_state[0]
    alone, packed = alone.float(), packed.float()
    return bool((packed - alone).abs().max() <= 0.02 * alone.abs().max())
