"""Heads that are not `hidden @ Wᵀ`, on tiny random models of six families transformers ships: the engine's
cached top-k and the trainer's loss and gradients must equal what `model(...).logits` gives, and a head the
project cannot reproduce is refused in one line naming the model type."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig, PhiConfig, Qwen2Config,
)

from conftest import assert_top_k_of, write_jsonl
from taid_cache import heads
from taid_cache.errors import UserError
from taid_cache.engines.checkpoint_head import checkpoint_head
from taid_cache.heads import PLAIN, check_architecture_head, check_head, head_logits
from taid_cache.config import DumpConfig
from taid_cache.pipelines.dump_teacher import dump_teacher
from taid_cache.losses import ChunkLoss, TopKTeacher, fkl, rebuild_teacher, taid, taid_sparse
from taid_cache.shards import read_cache
from taid_cache.training.student import LossModel

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
FAMILIES = {
    "llama": lambda v: LlamaConfig(vocab_size=v, **SMALL),
    "qwen2-padded": lambda v: Qwen2Config(vocab_size=v + 64, **SMALL),  # LM head padded past the tokenizer
    "gemma2-softcap": lambda v: Gemma2Config(vocab_size=v, head_dim=32, final_logit_softcapping=3.0, **SMALL),
    "phi-head-bias": lambda v: PhiConfig(vocab_size=v, **SMALL),
    "cohere-scale": lambda v: CohereConfig(vocab_size=v, logit_scale=0.25, **SMALL),
    "granite-divisor": lambda v: GraniteConfig(vocab_size=v, logits_scaling=4.0, eos_token_id=None, bos_token_id=None,
                                               pad_token_id=None, **SMALL),
}
# Families whose head does more than a matrix product: dropping the extra step must change the logits.
NOT_PLAIN = {"gemma2-softcap", "phi-head-bias", "cohere-scale", "granite-divisor"}


@pytest.fixture(scope="module")
def family_dirs(teacher_dir, tmp_path_factory) -> dict[str, Path]:
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, make in FAMILIES.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make(len(tokenizer)))
        with torch.no_grad():  # peaked distributions, like a trained model's, so top-k and tails are meaningful
            model.get_output_embeddings().weight.mul_(8.0)
            if model.get_output_embeddings().bias is not None:
                model.get_output_embeddings().bias.normal_(0, 2.0)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


def probe_ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 99, 3, 250, 41, 7, 300, 12, 64]])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_head_reproduces_model_logits(family_dirs, family: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family]).eval()
    mapping = check_head(model, "teacher")
    with torch.no_grad():
        reference = model(input_ids=probe_ids()).logits[0]
        hidden = model.get_decoder()(input_ids=probe_ids()).last_hidden_state[0]
        head = model.get_output_embeddings()
        torch.testing.assert_close(head_logits(hidden, head.weight, head.bias, mapping), reference, atol=1e-4, rtol=1e-4)
        if family in NOT_PLAIN:  # the check is not vacuous: a plain product is wrong for this family
            assert (F.linear(hidden, head.weight) - reference).abs().max() > 0.1


def test_a_head_that_cannot_be_reproduced_is_refused_naming_the_model_type(family_dirs, monkeypatch) -> None:
    monkeypatch.setattr(heads, "logit_map", lambda config: PLAIN)  # as if the project did not know softcapping
    model = AutoModelForCausalLM.from_pretrained(family_dirs["gemma2-softcap"])
    with pytest.raises(UserError, match="gemma2"):
        check_head(model, "teacher")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_checkpoint_head_reproduces_model_logits(family_dirs, family: str) -> None:
    """The vLLM engine's head: read from the weight files (tied or not, with its bias), its map proved on a
    one-layer probe of the architecture; on the decoder's hidden states it gives model(...).logits."""
    head = checkpoint_head(family_dirs[family], torch.float32)
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family]).eval()
    assert head.weight.shape == model.get_output_embeddings().weight.shape
    if family in ("gemma2-softcap", "cohere-scale"):
        assert model.config.tie_word_embeddings  # so the tied case (the input embedding's name) is covered
    with torch.no_grad():
        reference = model(input_ids=probe_ids()).logits[0]
        hidden = model.get_decoder()(input_ids=probe_ids()).last_hidden_state[0]
    torch.testing.assert_close(head.logits(hidden), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(NOT_PLAIN - {"phi-head-bias"}))
def test_the_architecture_probe_refuses_a_head_it_cannot_reproduce(family_dirs, family: str, monkeypatch) -> None:
    """The probe's logits are large enough that a missed soft-cap, scale or divisor shows."""
    config = AutoModelForCausalLM.from_pretrained(family_dirs[family]).config
    assert check_architecture_head(config, "teacher") == heads.logit_map(config)
    monkeypatch.setattr(heads, "logit_map", lambda config: PLAIN)
    with pytest.raises(UserError, match=config.model_type):
        check_architecture_head(config, "teacher")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_engine_caches_the_models_own_top_k(family_dirs, tmp_path, family: str) -> None:
    rows = [{"input_ids": list(range(3 + i, 40 + 5 * i))} for i in range(4)]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    dump_teacher(DumpConfig(model=str(family_dirs[family]), data=[str(tmp_path / "rows.jsonl")], output=tmp_path / "cache",
                            engine="hf", top_k=8, precision="fp32", progress=False))
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family]).eval()
    for record in read_cache(tmp_path / "cache"):
        with torch.no_grad():
            reference = torch.log_softmax(model(input_ids=torch.tensor(record.input_ids)[None]).logits[0, :-1].float(), -1)
        assert_top_k_of(record.topk_ids, record.topk_logprobs, reference.numpy(), 1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trainer_loss_and_gradients_equal_autograd_through_model_logits(family_dirs, family: str) -> None:
    """LossModel (decoder, then head chunk by chunk, closed-form TAID and autograd FKL) against the loss computed
    from model(...).logits with plain autograd."""
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float64)
    ids = probe_ids()
    targets = torch.ones(1, ids.shape[1] - 1, dtype=torch.bool)
    vocab = 512
    teacher = torch.log_softmax(torch.randn(ids.shape[1] - 1, vocab, dtype=torch.float64) * 3, -1)
    top_lps, top_ids = teacher.topk(8, -1)
    for kind in ("fkl", "taid-closed-form"):
        model.zero_grad()
        loss_model = LossModel(model, chunk=4, mapping=check_head(model, "student"))

        def fn(logits: torch.Tensor, sl: slice):
            if kind == "fkl":
                value = fkl(logits, rebuild_teacher(logits, top_ids[sl], top_lps[sl], "uniform", vocab)).sum()
                return ChunkLoss(value, value)
            value, grad = taid_sparse(logits, TopKTeacher(top_ids[sl], top_lps[sl], None, vocab), 0.5)
            return ChunkLoss(value.sum(), value.sum(), grad)

        ours, _ = loss_model({"input_ids": ids, "use_cache": False}, targets, fn)
        ours.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        logits = model(input_ids=ids).logits[0, :-1].float()
        if kind == "fkl":
            reference = fkl(logits, rebuild_teacher(logits, top_ids, top_lps, "uniform", vocab)).sum()
        else:
            reference = taid(logits, rebuild_teacher(logits, top_ids, top_lps, "student", vocab), 0.5).sum()
        reference.backward()
        assert ours.item() == pytest.approx(reference.item(), rel=1e-4)
        for name, p in model.named_parameters():
            if p.grad is not None and p.grad.abs().max() > 0:
                assert (grads[name].float() - p.grad.float()).norm() <= 1e-3 * p.grad.float().norm() + 1e-6, (kind, name)
