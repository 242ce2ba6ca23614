"""The student (and the online teacher) as modules: loading, vocabulary and packing checks, the loss forward,
FSDP2 sharding and saving. The process group and its collectives are in distributed.py."""

from __future__ import annotations


import torch
from torch import nn

from ..errors import UserError, first_line
from ..fingerprints import resolve_model, tokenizer_hash
from ..heads import LogitMap
from ..losses import ChunkFn, chunked_lm_loss
from ..packing import keeps_sequences_apart
from ..shards.contract import CacheSettings
from ..storage import Store
from .distributed import Dist
from .run_folder import staged_student


def load_causal_lm(model: str, what: str, dtype: torch.dtype, attention: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(model, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention)
    except Exception as exc:
        raise UserError(f"cannot load {what} {path}: {first_line(exc)}") from None
    return model, tokenizer


def check_vocabulary(model, tokenizer, settings: CacheSettings, what: str) -> None:
    """Same tokenizer as the cache, and an LM head covering every token of it (padding rows are fine)."""
    if tokenizer_hash(tokenizer) != settings.tokenizer_hash:
        raise UserError(f"the {what}'s tokenizer differs from the one the cache was made with (teacher {settings.teacher})")
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < settings.tokenizer_size:
        raise UserError(f"the {what} has {rows} vocabulary rows, fewer than the tokenizer's {settings.tokenizer_size} tokens")


def check_packing(model, pack: bool, what: str) -> None:
    if pack and not keeps_sequences_apart(model.get_decoder(), torch.device("cpu")):
        raise UserError(f"--pack: the {what}'s attention does not keep packed sequences apart in this transformers version; train without --pack")


def attention_implementation() -> str:
    """flash-attn when installed on a GPU, else PyTorch SDPA."""
    import importlib.util

    return "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else "sdpa"


class LossModel(nn.Module):
    """Wraps a causal LM so one forward gives the summed loss of the selected positions: the decoder, then the
    LM head and loss applied chunk by chunk (`chunked_lm_loss`). Being the FSDP root, its forward holds the
    unsharded head weight."""

    def __init__(self, lm: nn.Module, chunk: int, mapping: LogitMap, temperature: nn.Module | None = None) -> None:
        super().__init__()
        self.lm, self.chunk, self.mapping = lm, chunk, mapping
        self.temperature = temperature  # ctkd's learned temperature (CurriculumTemperature), trained with the student

    def forward(self, inputs: dict[str, torch.Tensor], targets: torch.Tensor | None, fn: ChunkFn | None,
                lam: float | None = None, generate: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`inputs`: the decoder's keyword arguments (`MicroBatch.model_inputs`); `targets`: [B, T-1] bool; `lam`:
        the learned temperature's gradient-reversal weight this step (`fn` then also takes the temperature).
        `generate`: instead, `lm.generate(**inputs, **generate)` — inside the root's forward, where FSDP holds the
        root's own parameters (embeddings, LM head) whole; each block gathers its own in its forward."""
        if generate is not None:
            return self.lm.generate(**inputs, **generate)
        h = self.lm.get_decoder()(**inputs).last_hidden_state[:, :-1][targets]
        head = self.lm.get_output_embeddings()
        extra = () if self.temperature is None or lam is None else (self.temperature(lam),)
        return chunked_lm_loss(h, head.weight, fn, self.chunk, head.bias, self.mapping, extra)


def shard_model(model: LossModel, env: Dist, precision: str, checkpointing: bool) -> LossModel:
    """FSDP2 on any number of ranks: each transformer block, then the root. `bf16`: bf16 compute, float32 master
    weights and optimizer state (the parameters stay float32) and float32 gradient reduction."""
    if checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    model.to(env.device)
    for block in model.lm.get_decoder().layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def save_student(model: LossModel, tokenizer, out: Store, env: Dist) -> None:
    """The final student as safetensors via save_pretrained, gathered to rank 0 and written whole into the run
    folder's staging place (`run_folder.install_staged` then moves it in)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.rank == 0:
        with staged_student(out) as folder:
            model.lm.save_pretrained(folder, state_dict=state)
            tokenizer.save_pretrained(folder)
