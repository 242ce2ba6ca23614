"""The LM head of a checkpoint, read from its weight files without loading the model: what an engine whose
decoder runs in another process (vLLM) needs in this one. The tensor names come from the architecture itself
(built on the meta device, so it costs nothing), which also covers tied heads (the input embedding's name)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError, first_line
from ..heads import LmHead, check_architecture_head


def head_parameter_names(config) -> tuple[list[str], list[str]]:
    """Every name the architecture gives its output embedding's weight and bias (several when tied)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    head = skeleton.get_output_embeddings()
    named = list(skeleton.named_parameters(remove_duplicate=False))
    weight = [n for n, p in named if p is head.weight]
    bias = [n for n, p in named if head.bias is not None and p is head.bias]
    return weight, bias


def read_tensors(folder: Path, wanted: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors present in the checkpoint's safetensors files (or, failing those, its torch files)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {folder / weight_map[n] for n in wanted if n in weight_map}
    else:
        files = set(folder.glob("*.safetensors"))
    found: dict[str, torch.Tensor] = {}
    for path in sorted(files):
        with safe_open(str(path), framework="pt") as f:
            found.update({n: f.get_tensor(n) for n in wanted if n in f.keys()})
    if not found and not files:
        for path in sorted(folder.glob("*.bin")):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            found.update({n: state[n] for n in wanted if n in state})
    return found


def checkpoint_head(folder: Path, dtype: torch.dtype) -> LmHead:
    """The head (on the CPU, in `dtype`) and its map, checked on a probe of the architecture."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
        weight_names, bias_names = head_parameter_names(config)
        tensors = read_tensors(folder, weight_names + bias_names)
    except Exception as exc:
        raise UserError(f"cannot read the LM head of {folder}: {first_line(exc)}") from None
    weight = next((tensors[n] for n in weight_names if n in tensors), None)
    if weight is None:
        raise UserError(f"cannot find the LM head of {folder} in its weight files (looked for {', '.join(weight_names)}); "
                        "use --engine hf")
    bias = next((tensors[n] for n in bias_names if n in tensors), None)
    if bias_names and bias is None:
        raise UserError(f"cannot find the LM head's bias of {folder} in its weight files ({', '.join(bias_names)}); use --engine hf")
    if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
        raise UserError(f"the LM head of {folder} holds NaN or inf: check the teacher's weights")
    text = config.get_text_config()
    if weight.ndim != 2 or weight.shape[1] != text.hidden_size:
        raise UserError(f"the LM head of {folder} has shape {tuple(weight.shape)}, not [rows, hidden {text.hidden_size}]")
    mapping = check_architecture_head(config, "teacher")
    return LmHead(weight.to(dtype), None if bias is None else bias.to(dtype), mapping)
