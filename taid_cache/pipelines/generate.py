"""On-policy data: a student checkpoint answers a prompt set, and its answers become `tokens` rows (prompt + answer,
the answer as the loss mask) that `dump-teacher --data GEN/` turns into a cache whose lineage is the student.

One obvious path, as dump-teacher's: check every input (the rows, the chat template, every prompt rendered) and the
folder's recorded settings before anything is written; write `generation.json` first, then the parts, each whole
or absent (`Store.write_text`) and named by its first prompt's row index, then mark the record `done`. A rerun
skips the parts that exist; every part's answers are drawn from seeds of its own (greedy, or seeded per batch by
`evaluation/generation.py`), so a run killed between parts and rerun writes the same files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..config import GenerateConfig, check_fields
from ..errors import Interrupted, UserError, first_line, write_errors
from ..fingerprints import model_hash, resolve_model, tokenizer_hash
from ..inputs import check_rows, dataset_fingerprint, detect_kind, load_rows, resolve_data, source_tag
from ..inputs.generated import GENERATION_VERSION, SETTINGS_FILE, part_name
from ..progress import step_bar
from ..settings import describe_differences
from ..storage import Store, open_store, remote_errors

RERUN = "rerun the same command to resume"
LEASE = "generate.lease"
SEED_SPACE = 2**63  # each part's seed, its first row's index past --seed, kept where torch.manual_seed takes it


def check_options(cfg: GenerateConfig) -> str:
    """The declared ranges, then the engine: the one this command can run now."""
    check_fields(cfg)
    if cfg.engine == "vllm":
        raise UserError("--engine vllm is not supported by generate yet: use --engine hf (transformers)")
    return "hf"  # auto: vLLM's generation path is not written yet, so transformers


def prompt_of(messages: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
    """The turns the student answers: every turn before the last assistant turn (evaluation's `prompts_of`), or the
    whole conversation when it does not end with an assistant turn (a prompt set without answers)."""
    from ..evaluation.generation import prompts_of

    if messages and messages[-1]["role"] != "assistant":
        return [dict(m) for m in messages]
    found = prompts_of([{"messages": messages}], None)
    if not found:
        raise UserError(f"row {index}: the conversation has no turn before its assistant turn to answer")
    return found[0].messages


def encode_prompt(tokenizer, messages: list[dict[str, Any]], index: int) -> list[int]:
    """The prompt's token ids exactly as `evaluation/generation.generate_answers` renders and encodes them (the chat
    template with the generation prompt, no special tokens added): the ids the answer follows."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template's own checks raise many types
        raise UserError(f"row {index}: the chat template cannot render this conversation: {first_line(exc)}") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class RowPrompt:
    id: str  # the row's id, or its source's tag and row index (as dump-teacher names a row without one)
    messages: list[dict[str, Any]]
    ids: list[int]  # the prompt's token ids, as the student is given them

    @classmethod
    def of(cls, row: dict[str, Any], index: int, tag: str, tokenizer) -> RowPrompt:
        messages = prompt_of(row["messages"], index)
        sample_id = str(row["id"]) if row.get("id") is not None else f"{tag}-{index:09d}"
        return cls(sample_id, messages, encode_prompt(tokenizer, messages, index))


def load_tokenizer(folder):
    from transformers import AutoConfig, AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder), AutoConfig.from_pretrained(folder).get_text_config()
    except Exception as exc:
        raise UserError(f"cannot load student {folder}: {first_line(exc)}") from None


def read_record(store: Store) -> dict[str, Any] | None:
    if not store.is_file(SETTINGS_FILE):
        return None
    try:
        record = json.loads(store.read_text(SETTINGS_FILE))
    except ValueError:
        raise UserError(f"{store.where(SETTINGS_FILE)} is not JSON: not a generation folder; use another --output") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise UserError(f"{store.where(SETTINGS_FILE)} is not a generation record; use another --output")
    return record


def check_folder(store: Store, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The folder's record when it is this generation's (resumed); None for a new, empty folder; else one line."""
    record = read_record(store)
    if record is None:
        others = [n for n in store.list() if n != LEASE and not n.startswith(".")]
        if others:
            raise UserError(f"--output {store.url} holds other files ({others[0]}, ...) and no {SETTINGS_FILE}: use a new folder")
        return None
    diff = describe_differences(record["settings"], settings, "there", "now")
    if diff:
        raise UserError(f"--output {store.url} was generated with other settings ({diff}): rerun with those, or use "
                        "another --output")
    return record


def generate(cfg: GenerateConfig) -> dict[str, Any]:
    """Write (or finish) the generation folder; returns what it holds."""
    engine = check_options(cfg)
    data = resolve_data(cfg.data)
    rows = load_rows(data, cfg.split)
    if len(rows) == 0:
        raise UserError(f"the dataset {', '.join(cfg.data)} (split {cfg.split}) has no rows")
    kind = detect_kind(rows.column_names, "auto")
    if kind != "chat":
        raise UserError(f"on-policy generation needs prompts: chat rows (a 'messages' column); {', '.join(cfg.data)} "
                        f"holds {kind} rows")
    folder = resolve_model(cfg.student, "student")
    tokenizer, text_config = load_tokenizer(folder)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the student {cfg.student} has no chat template: on-policy generation answers prompts through it")
    context = getattr(text_config, "max_position_embeddings", None)
    if context is not None and cfg.max_length is not None and cfg.max_length > context:
        raise UserError(f"--max-length {cfg.max_length} is beyond the student's context of {context} positions")
    max_length = cfg.max_length or context or 2048
    if cfg.max_new_tokens >= max_length:
        raise UserError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt within the longest sequence, "
                        f"{max_length} tokens (--max-length)")
    check_rows(rows, "chat", len(tokenizer))
    tag = source_tag(data)
    prompts = [RowPrompt.of(row, index, tag, tokenizer) for index, row in enumerate(rows)]
    settings = {
        "format_version": GENERATION_VERSION, "student": cfg.student, "student_hash": model_hash(folder),
        "tokenizer_hash": tokenizer_hash(tokenizer), "data": list(cfg.data), "split": cfg.split,
        "data_fingerprint": dataset_fingerprint(data, rows), "data_rows": len(rows), "engine": engine, "dtype": "float32",
        "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed,
        "batch_size": cfg.batch_size, "max_length": max_length, "rows_per_part": cfg.rows_per_part}
    store = open_store(cfg.output)
    with remote_errors(store.url, "--output"):
        store.check_writable("--output")
        check_folder(store, settings)
    with store.lease(LEASE, f"taid-cache generate into {store.url}"), write_errors(store.url, lambda: RERUN):
        record = check_folder(store, settings)  # again, under the lease
        if record is not None and record.get("done"):
            cfg.console.print(f"{store.url} is already complete: nothing to do")
            return {**record["summary"], "nothing_to_do": True}
        if record is None:
            store.write_text(SETTINGS_FILE, json.dumps({"settings": settings, "done": False}, indent=2) + "\n")
        try:
            written = write_parts(cfg, store, folder, tokenizer, prompts, max_length)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: the written parts are kept; {RERUN}") from None
        summary = {**summarize(store, len(prompts), cfg.rows_per_part), "resumed": record is not None, "written_parts": written}
        store.write_text(SETTINGS_FILE, json.dumps({"settings": settings, "done": True, "summary": summary}, indent=2) + "\n")
    cfg.console.print(f"generated {summary['rows']} rows ({summary['dropped']} prompts dropped as longer than --max-length "
                      f"less --max-new-tokens; {summary['answer_tokens']:,} answer tokens) in {store.url}")
    return {**summary, "nothing_to_do": False}


def write_parts(cfg: GenerateConfig, store: Store, folder, tokenizer, prompts: list[RowPrompt], max_length: int) -> int:
    """Every missing part, in order: its prompts answered by the student, written whole. Returns how many."""
    import torch

    from ..evaluation.generation import GenerationSettings, Prompt, generate_answers
    from ..evaluation.run import load_model

    starts = range(0, len(prompts), cfg.rows_per_part)
    missing = [s for s in starts if not store.exists(part_name(s))]
    if not missing:
        return 0
    model, _ = load_model(folder, "student")
    if torch.cuda.is_available():
        model = model.cuda()
    sample = cfg.temperature > 0
    with step_bar("generate", cfg.console, cfg.progress) as progress:
        left = sum(len(prompts[s : s + cfg.rows_per_part]) for s in missing)
        task = progress.add_task("generate", total=len(prompts), completed=len(prompts) - left, info="prompts")
        for start in missing:
            part = prompts[start : start + cfg.rows_per_part]
            kept = [p for p in part if len(p.ids) + cfg.max_new_tokens <= max_length]
            # Seeds of this part alone (its first row's index past --seed): a resumed run draws what the first would have.
            settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, sample=sample,
                                          temperature=cfg.temperature if sample else 1.0, seed=(cfg.seed + start) % SEED_SPACE,
                                          top_p=cfg.top_p)
            answers = generate_answers(model, tokenizer, [Prompt(p.messages, "") for p in kept], settings) if kept else []
            lines = [json.dumps({"id": p.id, "input_ids": p.ids + answer, "loss_mask": [False] * len(p.ids) + [True] * len(answer)})
                     + "\n" for p, answer in zip(kept, answers)]
            store.write_text(part_name(start), "".join(lines))
            progress.update(task, advance=len(part))
    return len(missing)


def summarize(store: Store, prompts: int, rows_per_part: int) -> dict[str, int]:
    """What the finished parts hold, read back from them."""
    rows = tokens = 0
    for start in range(0, prompts, rows_per_part):
        for line in store.read_text(part_name(start)).splitlines():
            row = json.loads(line)
            rows += 1
            tokens += sum(row["loss_mask"])
    return {"prompts": prompts, "rows": rows, "dropped": prompts - rows, "answer_tokens": tokens}
