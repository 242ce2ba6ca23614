"""Output heads that are not a plain `hidden @ Wᵀ`: an LM-head bias (Phi, GPT-J), a logit multiplier (Cohere's
`logit_scale`), a divisor (Granite's `logits_scaling`) and tanh soft-capping (Gemma 2's
`final_logit_softcapping`). The engines, the trainer and the online teacher apply the head themselves, chunk by
chunk, so each must reproduce `model(...).logits`; `check_head` proves it on a probe at start-up and refuses,
in one line naming the model type, a model whose logits come out otherwise. An engine whose decoder runs in
another process (vLLM) proves it on a one-layer copy of the architecture instead (`check_architecture_head`)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError, first_line


@dataclass(frozen=True)
class LogitMap:
    """logits = softcap · tanh(scale · raw / softcap) (or scale · raw without a cap), raw = hidden @ Wᵀ + b."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        z = raw.float() * self.scale if self.scale != 1.0 else raw.float()
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap else z

    def grad_raw(self, raw: torch.Tensor, grad_logits: torch.Tensor) -> torch.Tensor:
        """d(loss)/d(raw) from d(loss)/d(logits): the closed-form losses give the latter."""
        if self.softcap:
            grad_logits = grad_logits * (1 - torch.tanh(raw.float() * self.scale / self.softcap) ** 2)
        return grad_logits * self.scale if self.scale != 1.0 else grad_logits


PLAIN = LogitMap()


def logit_map(config) -> LogitMap:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = float(getattr(text, "logit_scale", None) or 1.0)
    if getattr(text, "logits_scaling", None):
        scale /= float(text.logits_scaling)
    return LogitMap(scale, getattr(text, "final_logit_softcapping", None) or None)


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mapping: LogitMap) -> torch.Tensor:
    """float32 logits: the product (and bias) in the parameters' dtype, the map in float32."""
    return mapping(F.linear(hidden, weight, bias))


@dataclass
class LmHead:
    """An LM head as taid-cache applies it: weight [V, H], optional bias [V], and the map to logits."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    mapping: LogitMap

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits of hidden states in any float dtype (cast to the weight's, as the model itself computes).
        `out`: a float32 buffer the product of a float32 head is written into (no allocation, and on the CPU no
        page faults of a fresh [chunk, vocab] block; a plain map then returns it as the logits)."""
        hidden = hidden.to(self.weight.dtype)
        if out is None or out.dtype != self.weight.dtype:
            return head_logits(hidden, self.weight, self.bias, self.mapping)
        if self.bias is None:
            return self.mapping(torch.mm(hidden, self.weight.t(), out=out))
        return self.mapping(torch.addmm(self.bias, hidden, self.weight.t(), out=out))


def model_head(model, what: str) -> LmHead:
    """The head of a loaded transformers model, its map checked on a probe."""
    mapping = check_head(model, what)
    head = model.get_output_embeddings()
    return LmHead(head.weight, head.bias, mapping)


@torch.no_grad()
def check_head(model, what: str) -> LogitMap:
    """The map that makes decoder output + LM head equal `model(...).logits`, checked on a probe."""
    mapping = logit_map(model.config)
    head = model.get_output_embeddings()
    device = head.weight.device
    vocab = min(head.weight.shape[0], int(getattr(model.config.get_text_config(), "vocab_size", head.weight.shape[0])))
    ids = torch.arange(3, 3 + 12, device=device)[None] % vocab
    was_training = model.training
    model.eval()
    reference = model(input_ids=ids, use_cache=False).logits.float()
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    ours = head_logits(hidden, head.weight, head.bias, mapping)
    model.train(was_training)
    if not torch.isfinite(reference).all():
        raise UserError(f"the {what}'s logits are not finite (NaN or inf) on a probe: its weights hold NaN or inf, "
                        "or overflow in its dtype")
    # float32: rounding only. bf16 / fp16 models scale or cap in their own dtype and we in float32: a few of
    # their mantissa steps (2^-7 of the logit size for bf16) apart. A missed scale or cap is far larger.
    relative = 1e-4 if head.weight.dtype == torch.float32 else 2.0 ** -5
    tolerance = relative * max(1.0, reference.abs().max().item())
    gap = (ours - reference).abs().max().item()
    if not gap <= tolerance:
        kind = model.config.model_type
        raise UserError(f"the {what} ({kind}) computes its logits in a way taid-cache cannot reproduce from its decoder "
                        f"and LM head (largest gap {gap:.3g} on a probe): {kind} is not supported yet")
    return mapping


PROBE_VOCAB = 64


@torch.no_grad()
def check_architecture_head(config, what: str) -> LogitMap:
    """`check_head` for a model whose decoder runs elsewhere: the map from decoder output to logits belongs to the
    model type and its config, not to the weights, so it is proved on a randomly initialised copy of the
    architecture with one layer, a 64-token vocabulary and a narrow MLP (cheap for any teacher size). Its head is
    drawn large (logits of tens of nats, a random bias) so that a missed soft-cap, scale or bias shows."""
    from transformers import AutoModelForCausalLM

    probe = copy.deepcopy(config)
    text = probe.get_text_config()
    layers = getattr(text, "num_hidden_layers", 1)
    for key, value in list(vars(text).items()):  # per-layer lists (layer types, windows) follow the layer count
        if isinstance(value, list) and len(value) == layers > 1:
            setattr(text, key, value[:1])
    text.num_hidden_layers = 1
    text.vocab_size = PROBE_VOCAB
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(text, key, None), int) and getattr(text, key) >= PROBE_VOCAB:
            setattr(text, key, None)
    if isinstance(getattr(text, "intermediate_size", None), int):
        text.intermediate_size = min(text.intermediate_size, 256)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(probe, dtype=torch.float32)
    except Exception as exc:
        raise UserError(f"cannot build a probe of the {what}'s architecture ({config.model_type}) to check its LM head: "
                        f"{first_line(exc)}") from None
    head = model.get_output_embeddings()
    head.weight.normal_(0.0, 30.0 / math.sqrt(head.weight.shape[1]))
    if head.bias is not None:
        head.bias.normal_(0.0, 3.0)
    return check_head(model, what)
