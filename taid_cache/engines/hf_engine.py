"""The transformers engine: the teacher's decoder in this process, on one device. A batch's sequences are packed
into rows no wider than its longest one (when the model keeps packed sequences apart), so uneven lengths cost
little padding; the head path (`head_path.py`) takes the decoder's hidden states from there."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from ..errors import UserError, first_line
from ..heads import model_head
from ..inputs import Sequence
from ..packing import RowLayout, keeps_sequences_apart, lay_out
from .base import Capabilities, EngineConfig, pick_device, torch_dtype


class HfEngine:
    name: ClassVar[str] = "hf"
    capabilities: ClassVar[Capabilities] = Capabilities(tensor_parallel=False, pipeline_parallel=False)

    @classmethod
    def check_available(cls) -> None:
        """transformers is one of taid-cache's own dependencies."""

    @classmethod
    def check_config(cls, config: EngineConfig) -> None:
        if config.engine_args:
            raise UserError("--vllm-args: the hf engine takes no engine arguments; use --engine vllm")

    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoModelForCausalLM

        self.check_config(config)
        self.config = config
        self.device = pick_device()
        try:
            self.model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch_dtype(config.dtype))
        except Exception as exc:
            raise UserError(f"cannot load model {config.model}: {first_line(exc)}") from None
        self.model.to(self.device).eval()
        self.decoder = self.model.get_decoder()
        self.head = model_head(self.model, "teacher")
        self.pack = keeps_sequences_apart(self.decoder, self.device)

    def layout(self, sequences: list[Sequence]) -> tuple[RowLayout, dict[str, torch.Tensor]]:
        """Rows no wider than the longest sequence: packed when the model keeps packed sequences apart (less
        padding on uneven lengths), else one per row, right-padded."""
        lengths = [len(s.input_ids) for s in sequences]
        layout = lay_out(lengths, max(lengths), self.pack)
        inputs = layout.model_inputs(layout.grid([s.input_ids.astype(np.int64) for s in sequences], 0))
        return layout, {**{k: v.to(self.device) for k, v in inputs.items()}, "use_cache": False}

    @torch.inference_mode()
    def hidden_states(self, sequences: list[Sequence]) -> torch.Tensor:
        layout, inputs = self.layout(sequences)
        hidden = self.decoder(**inputs).last_hidden_state
        # Positions that predict a token of their own sequence: all but each sequence's last, in sequence order.
        return hidden.flatten(0, 1)[layout.flat_positions(drop_last=True).to(self.device)]

    def close(self) -> None:
        del self.model, self.decoder, self.head
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
