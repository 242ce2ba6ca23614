"""Students judged by what they generate: answers to held-out chat prompts through the student's chat template,
batched (left-padded, sorted by length), greedy or seeded sampling, stopping at the end of the assistant turn (the
tokenizer's eos); then the answers scored against the references and, by the teacher, as its mean per-token
negative log-likelihood of them (the teacher as a cheap offline judge: the teacher the cache came from). With a
context (the models' positions), a prompt that fills it is not answered and no answer runs past it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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
    # Positions a prompt and its answer may take together (the models' max_position_embeddings): each batch
    # generates at most this less its longest prompt, so `--max-new-tokens 100000000` ends. None: unbounded.
    context: int | None = None


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


def encode_prompts(tokenizer, prompts: list[Prompt]) -> list[list[int]]:
    """Each prompt's token ids, through the chat template with the assistant turn opened."""
    rendered = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in prompts]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[Prompt], settings: GenerationSettings,
                     on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """The answer's token ids for each prompt (its end token kept when it was reached), in prompt order."""
    return answer_ids(model, tokenizer, encode_prompts(tokenizer, prompts), settings, on_batch=on_batch)


@torch.no_grad()
def answer_ids(model, tokenizer, encoded: list[list[int]], settings: GenerationSettings, synced: bool = False,
               on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """The answers to prompts given as token ids, batched by length (left-padded), each cut after its end token.
    `synced`: every rank of a sharded model runs as many forwards as the slowest (transformers' synced_gpus).
    With `settings.context`, a batch generates at most the context less its longest prompt (a prompt that fills
    the context is the caller's to leave out: `generation_scores` does). `on_batch(n)`: n more prompts answered."""
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = end_tokens(model, tokenizer)
    answers: list[list[int]] = [[] for _ in encoded]
    model.eval()
    for start in range(0, len(order), settings.batch_size):
        batch = order[start : start + settings.batch_size]
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
            ids[row, width - len(encoded[i]):] = torch.as_tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        if settings.sample:
            torch.manual_seed(settings.seed + start)  # each batch its own seed: the same answers in any run
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_k": 0, "top_p": settings.top_p} if settings.sample else {"do_sample": False}
        new_tokens = settings.max_new_tokens if settings.context is None else min(settings.max_new_tokens, settings.context - width)
        if new_tokens < 1:
            raise UserError(f"a prompt of {width} tokens leaves no room to answer within the context of {settings.context} positions")
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                             eos_token_id=stop, pad_token_id=pad, synced_gpus=synced, **sampling)
        for row, i in enumerate(batch):
            tokens = out[row, width:].tolist()
            cut = next((j + 1 for j, token in enumerate(tokens) if token in stop), len(tokens))
            answers[i] = tokens[:cut]
        if on_batch is not None:
            on_batch(len(batch))
    return answers


@torch.no_grad()
def teacher_nll(teacher, tokenizer, prompts: list[Prompt], answers: list[list[int]]) -> float | None:
    """The teacher's mean negative log-likelihood per answer token (end token included), over every answer; None
    when there is no answer token to judge (a mean over nothing is not 0)."""
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
    return total / count if count else None


def generation_scores(model, tokenizer, prompts: list[Prompt], settings: GenerationSettings, teacher=None,
                      on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
    """ROUGE-L and exact match of the answers against the references (percent), their mean length in tokens, the
    share that reached their end token, the share that is blank (whitespace only: the collapse a small student's
    greedy decoding falls into, which the teacher's NLL alone would reward), and with a teacher its per-token NLL
    of them; over the prompts answered (`prompts_answered`: those shorter than `settings.context`). With none
    answered, only that count: a score over no answer is absent, not 0."""
    encoded = encode_prompts(tokenizer, prompts)
    fits = [i for i, ids in enumerate(encoded) if settings.context is None or len(ids) < settings.context]
    scores: dict[str, float] = {"prompts_answered": len(fits)}
    if not fits:
        return scores
    prompts = [prompts[i] for i in fits]
    answers = answer_ids(model, tokenizer, [encoded[i] for i in fits], settings, on_batch=on_batch)
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    references = [p.reference for p in prompts]
    stop = set(end_tokens(model, tokenizer))
    scores.update({"rouge_l": rouge_l(texts, references), "exact_match": exact_match(texts, references),
                   "answer_tokens": sum(len(a) for a in answers) / len(answers),
                   "answers_ended": sum(bool(a) and a[-1] in stop for a in answers) / len(answers),
                   "blank_answers": sum(not text.strip() for text in texts) / len(texts)})
    if teacher is not None and (nll := teacher_nll(teacher, tokenizer, prompts, answers)) is not None:
        scores["teacher_nll"] = nll
    return scores
