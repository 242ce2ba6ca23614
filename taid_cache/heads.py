"""Output heads that are not a plain `hidden @ Wᵀ`: an LM-head bias (Phi, GPT-J), a logit multiplier (Cohere's
`logit_scale`), a divisor (Granite's `logits_scaling`) and tanh soft-capping (Gemma 2's
`final_logit_softcapping`). The engine, the trainer and the online teacher apply the head themselves, chunk by
chunk, so each must reproduce `model(...).logits`; `check_head` proves it on a probe at start-up and refuses,
in one line naming the model type, a model whose logits come out otherwise."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError


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
