"""Students judged by what they generate: answers to held-out chat prompts through the student's chat template,
batched (left-padded, sorted by length), greedy or seeded sampling, stopping at the end of the assistant turn (the
tokenizer's eos); then the answers scored against the references and, by the teacher, as its mean per-token
negative log-likelihood of them (the teacher as a cheap offline judge: the teacher the cache came from)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from .scores import exact_match, rouge_l


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    batch_size: int = 16
    sample: bool = False  # seeded sampling instead of greedy decoding
    temperature: float = 1.0  # of the sampling
    seed: int = 0
    top_p: float = 1.0  # nucleus sampling: the fewest tokens whose mass reaches it (1: the whole distribution)


@dataclass
class Prompt:
    messages: list[dict[str, str]]  # the conversation up to the answer to give
    reference: str  # the held-out answer


def prompts_of(rows: list[dict[str, Any]], limit: int | None) -> list[Prompt]:
    """Chat rows -> (every turn before the last assistant turn, that turn's content)."""
    out = []
    for row in rows:
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            continue
        out.append(Prompt([dict(m) for m in messages[:last]], messages[last]["content"]))
        if limit is not None and len(out) >= limit:
            break
    return out


def end_tokens(model, tokenizer) -> list[int]:
    """What ends an answer: the tokenizer's eos (the end of a turn for a chat tokenizer) and the model's own."""
    ids = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    ids.discard(None)
    if not ids:
        raise UserError("the student's tokenizer has no eos token: nothing would end an answer")
    return sorted(ids)


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[Prompt], settings: GenerationSettings) -> list[list[int]]:
    """The answer's token ids for each prompt (its end token kept when it was reached), in prompt order."""
    device = next(model.parameters()).device
    rendered = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in prompts]
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = end_tokens(model, tokenizer)
    answers: list[list[int]] = [[] for _ in prompts]
    model.eval()
    for start in range(0, len(order), settings.batch_size):
        batch = order[start : start + settings.batch_size]
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        if settings.sample:
            torch.manual_seed(settings.seed + start)  # each batch its own seed: the same answers in any run
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_k": 0, "top_p": settings.top_p} if settings.sample else {"do_sample": False}
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=settings.max_new_tokens,
                             eos_token_id=stop, pad_token_id=pad, **sampling)
        for row, i in enumerate(batch):
            tokens = out[row, width:].tolist()
            cut = next((j + 1 for j, token in enumerate(tokens) if token in stop), len(tokens))
            answers[i] = tokens[:cut]
    return answers


@torch.no_grad()
def teacher_nll(teacher, tokenizer, prompts: list[Prompt], answers: list[list[int]]) -> float:
    """The teacher's mean negative log-likelihood per answer token (end token included), over every answer."""
    device = next(teacher.parameters()).device
    total, count = 0.0, 0
    for prompt, answer in zip(prompts, answers):
        if not answer:
            continue
        text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        context = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(context + answer, device=device)[None]
        logprobs = F.log_softmax(teacher(ids).logits[0, len(context) - 1 : -1].float(), -1)
        total -= logprobs.gather(1, ids[0, len(context):, None]).sum().item()
        count += len(answer)
    return total / max(count, 1)


def generation_scores(model, tokenizer, prompts: list[Prompt], settings: GenerationSettings, teacher=None) -> dict[str, float]:
    """ROUGE-L and exact match of the answers against the references (percent), their mean length in tokens, the
    share that reached their end token, the share that is blank (whitespace only: the collapse a small student's
    greedy decoding falls into, which the teacher's NLL alone would reward), and with a teacher its per-token NLL
    of them."""
    answers = generate_answers(model, tokenizer, prompts, settings)
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    references = [p.reference for p in prompts]
    stop = set(end_tokens(model, tokenizer))
    scores = {"rouge_l": rouge_l(texts, references), "exact_match": exact_match(texts, references),
              "answer_tokens": sum(len(a) for a in answers) / max(len(answers), 1),
              "answers_ended": sum(bool(a) and a[-1] in stop for a in answers) / max(len(answers), 1),
              "blank_answers": sum(not text.strip() for text in texts) / max(len(texts), 1)}
    if teacher is not None:
        scores["teacher_nll"] = teacher_nll(teacher, tokenizer, prompts, answers)
    return scores
