"""On-policy data: a student checkpoint answers a prompt set, and its answers become `tokens` rows (prompt + answer,
the answer as the loss mask) that `dump-teacher --data GEN/` turns into a cache whose lineage is the student.

One obvious path, as dump-teacher's: check every input (the rows, the chat template, every prompt rendered) and the
folder's recorded settings before anything is written; write `generation.json` first, then the parts, each whole
or absent (`Store.write_text`) and named by its first prompt's row index, then mark the record `done`. A rerun
skips the parts that exist; every part's answers are drawn from seeds of its own (greedy; or seeded per batch by
`evaluation/generation.py` in transformers, per prompt from its row in vLLM), so a run killed between parts and rerun
writes the same files. Both engines are given the prompt ids `encode_prompt` makes, and a row is those ids then the
answer's: nothing is tokenised twice. The engine is opened once per run, when a part is missing, and closed at its
end."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, ClassVar, Protocol

from ..config import GenerateConfig, check_fields
from ..engines.base import choose_engine, parse_engine_args
from ..errors import Interrupted, UserError, first_line, interrupts_at_safe_points, write_errors
from ..fingerprints import model_hash, resolve_model, tokenizer_hash
from ..inputs import check_rows, dataset_fingerprint, detect_kind, load_rows, resolve_data, source_tag
from ..inputs.generated import GENERATION_VERSION, SETTINGS_FILE, part_name
from ..progress import step_bar
from ..settings import describe_differences
from ..storage import Store, open_store, remote_errors

RERUN = "rerun the same command to resume"
LEASE = "generate.lease"
SEED_SPACE = 2**63  # a part's seed (hf) or a prompt's (vllm), a row index past --seed, kept where torch's generators take it
# vllm.LLM arguments generate sets itself (--vllm-args may set any other), the parallel sizes among them: generate
# runs the student on one rank.
VLLM_OWN_ARGS = frozenset({"model", "dtype", "max_model_len", "seed", "enable_prefix_caching", "tensor_parallel_size",
                           "pipeline_parallel_size"})


def check_options(cfg: GenerateConfig) -> tuple[str, dict[str, Any], str]:
    """The declared ranges, then the engine this command runs, its --vllm-args, and why auto picked it."""
    check_fields(cfg)
    engine, why = choose_engine(cfg.engine)
    engine_args = parse_engine_args(cfg.vllm_args, "--vllm-args")
    if engine == "vllm":
        from ..engines.vllm_engine import check_engine_args, check_installed

        check_installed()
        check_engine_args(engine_args, VLLM_OWN_ARGS)
    elif engine_args:
        raise UserError(f"--vllm-args: the engine is hf{' (--engine auto: ' + why + ')' if why else ''}; give --engine vllm "
                        "or drop --vllm-args")
    return engine, engine_args, why


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


@dataclass(frozen=True)
class AnswererConfig:
    """What an answerer was opened with: an open one serves any sampling settings (they come with each part)."""

    engine: str
    student: str  # the model folder
    max_length: int  # longest prompt + answer
    engine_args: dict[str, Any] = field(default_factory=dict)  # --vllm-args


class Answerer(Protocol):
    """The student answering a part's prompts, given as their row index and token ids; the answers' ids in order,
    each with its end token when it was reached."""

    name: ClassVar[str]
    config: AnswererConfig

    def answers(self, prompts: list[tuple[int, list[int]]], part: int, cfg: GenerateConfig) -> list[list[int]]: ...

    def close(self) -> None: ...


class HfAnswerer:
    """transformers' `generate` in this process (`evaluation/generation.answer_ids`: batches of --batch-size sorted
    by length, left-padded, each batch seeded from the part's first row past --seed)."""

    name: ClassVar[str] = "hf"

    def __init__(self, config: AnswererConfig, tokenizer) -> None:
        import torch

        from ..evaluation.run import load_model

        self.config, self.tokenizer = config, tokenizer
        model, _ = load_model(Path(config.student), "student")
        self.model: Any = model.cuda() if torch.cuda.is_available() else model

    def answers(self, prompts: list[tuple[int, list[int]]], part: int, cfg: GenerateConfig) -> list[list[int]]:
        from ..evaluation.generation import GenerationSettings, answer_ids

        sample = cfg.temperature > 0
        settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, sample=sample,
                                      temperature=cfg.temperature if sample else 1.0, seed=(cfg.seed + part) % SEED_SPACE,
                                      top_p=cfg.top_p)
        return answer_ids(self.model, self.tokenizer, [ids for _, ids in prompts], settings)

    def close(self) -> None:
        """Release the model now (a caller may load another next)."""
        self.model = None


class VllmAnswerer:
    """vLLM's `LLM.generate` on the prompt ids (`TokensPrompt`): a part's prompts in one call, scheduled by vLLM, each
    sampled from a seed of its own (its row past --seed), so its answer depends on nothing else in the batch; greedy
    at temperature 0. It stops at the end tokens the hf path stops at, and keeps the one reached, as that path does."""

    name: ClassVar[str] = "vllm"

    def __init__(self, config: AnswererConfig, tokenizer) -> None:
        from transformers import AutoConfig, GenerationConfig

        from ..engines.vllm_engine import start_llm
        from ..evaluation.generation import end_tokens

        self.config = config
        try:  # what `from_pretrained` gives a loaded model: its generation_config.json, else one from its config
            generation = GenerationConfig.from_pretrained(config.student)
        except OSError:
            generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(config.student))
        self.stop = end_tokens(SimpleNamespace(generation_config=generation), tokenizer)
        # float32 as the hf path loads the student; prefix caching off: each prompt computed whole, whatever ran before.
        self.llm = start_llm(config.student, 1, dtype="float32", max_model_len=config.max_length, seed=0,
                             enable_prefix_caching=False, **config.engine_args)

    def answers(self, prompts: list[tuple[int, list[int]]], part: int, cfg: GenerateConfig) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sample = cfg.temperature > 0
        params = [SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p if sample else 1.0,
                                 seed=(cfg.seed + row) % SEED_SPACE if sample else None, stop_token_ids=self.stop,
                                 detokenize=False) for row, _ in prompts]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for _, ids in prompts], params, use_tqdm=False)
        return [[int(t) for t in out.outputs[0].token_ids] for out in outputs]  # in prompt order

    def close(self) -> None:
        from ..engines.vllm_engine import stop_llm

        stop_llm(self.llm)


ANSWERERS: dict[str, Callable[[AnswererConfig, Any], Answerer]] = {"hf": HfAnswerer, "vllm": VllmAnswerer}


def open_answerer(config: AnswererConfig, tokenizer) -> Answerer:
    return ANSWERERS[config.engine](config, tokenizer)


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
    # A folder of the release before --vllm-args ran without engine arguments. The student and the prompts are
    # compared by what they hold (student_hash, data_fingerprint), not where: a moved run folder resumes.
    where = ("student", "data")
    diff = describe_differences({"engine_args": {}, **{k: v for k, v in record["settings"].items() if k not in where}},
                                {k: v for k, v in settings.items() if k not in where}, "there", "now")
    if diff:
        raise UserError(f"--output {store.url} was generated with other settings ({diff}): rerun with those, or use "
                        "another --output")
    return record


def generate(cfg: GenerateConfig, answerer: Answerer | None = None) -> dict[str, Any]:
    """Write (or finish) the generation folder; returns what it holds. `answerer`: one already open on this student
    with this run's engine settings (`AnswererConfig`), to generate several folders on one engine start (it stays
    open); without it the engine is opened here when a part is missing and closed at the end."""
    engine, engine_args, why = check_options(cfg)
    if why:
        cfg.console.print(f"engine: {engine} (--engine auto: {why})")
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
    wanted = AnswererConfig(engine, str(folder), max_length, engine_args)
    if answerer is not None and answerer.config != wanted:
        raise UserError(f"the open {answerer.name} answerer runs {answerer.config}; this generation needs {wanted}")
    settings = {
        "format_version": GENERATION_VERSION, "student": cfg.student, "student_hash": model_hash(folder),
        "tokenizer_hash": tokenizer_hash(tokenizer), "data": list(cfg.data), "split": cfg.split,
        "data_fingerprint": dataset_fingerprint(data, rows), "data_rows": len(rows), "engine": engine,
        "engine_args": engine_args, "dtype": "float32", "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
        "top_p": cfg.top_p, "seed": cfg.seed, "batch_size": cfg.batch_size, "max_length": max_length, "rows_per_part": cfg.rows_per_part}
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
            written = write_parts(cfg, store, wanted, tokenizer, prompts, answerer)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: the written parts are kept; {RERUN}") from None
        summary = {**summarize(store, len(prompts), cfg.rows_per_part), "resumed": record is not None, "written_parts": written}
        store.write_text(SETTINGS_FILE, json.dumps({"settings": settings, "done": True, "summary": summary}, indent=2) + "\n")
    cfg.console.print(f"generated {summary['rows']} rows ({summary['dropped']} prompts dropped as longer than --max-length "
                      f"less --max-new-tokens; {summary['answer_tokens']:,} answer tokens) in {store.url}")
    return {**summary, "nothing_to_do": False}


def write_parts(cfg: GenerateConfig, store: Store, wanted: AnswererConfig, tokenizer, prompts: list[RowPrompt],
                answerer: Answerer | None) -> int:
    """Every missing part, in order: its prompts answered by the student (the engine opened once, here, unless
    given), written whole. Returns how many."""
    starts = range(0, len(prompts), cfg.rows_per_part)
    missing = [s for s in starts if not store.exists(part_name(s))]
    if not missing:
        return 0
    owned = answerer is None
    answerer = open_answerer(wanted, tokenizer) if answerer is None else answerer
    try:
        with step_bar("generate", cfg.console, cfg.progress) as progress:
            left = sum(len(prompts[s : s + cfg.rows_per_part]) for s in missing)
            task = progress.add_task("generate", total=len(prompts), completed=len(prompts) - left, info="prompts")
            with interrupts_at_safe_points() as stop_if_interrupted:  # the first signal stops before the next part; a second at once
                for start in missing:
                    stop_if_interrupted()
                    part = prompts[start : start + cfg.rows_per_part]
                    kept = [(start + j, p) for j, p in enumerate(part) if len(p.ids) + cfg.max_new_tokens <= wanted.max_length]
                    # Seeds of this part alone (its rows past --seed): a resumed run draws what the first would have.
                    answers = answerer.answers([(row, p.ids) for row, p in kept], start, cfg) if kept else []
                    lines = [json.dumps({"id": p.id, "input_ids": p.ids + answer, "loss_mask": [False] * len(p.ids) + [True] * len(answer)})
                             + "\n" for (_, p), answer in zip(kept, answers)]
                    store.write_text(part_name(start), "".join(lines))
                    progress.update(task, advance=len(part))
    finally:
        if owned:
            answerer.close()
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
