"""Every option of the two stages, declared once: a dataclass field per option holding its default, help,
allowed values and range. cli.py derives the `taid-cache` commands from these fields, `make reproduce` builds
the same dataclasses, `check_fields` validates every declared range, and a config travels between processes
(torchrun) as JSON through `to_json` / `from_json`.

Light on purpose (no torch): `taid-cache --help` imports it."""

from __future__ import annotations

import math
import os
import re
import reprlib
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from rich.console import Console

from .engines import DISTRIBUTED_BACKENDS, ENGINES
from .errors import UserError, first_line
from .inputs import KINDS
from .onpolicy.sampler import ON_POLICY, REPLAY_RATIOS
from .losses.registry import LOSSES, PARAMS, LossConfig
from .shards.codec import PRECISIONS as STORAGE_PRECISIONS

TAILS = ("student", "uniform", "renorm")
COMPUTE_PRECISIONS = ("fp32", "bf16")
# transformers' schedulers that run on the optimizer, the warm-up and the step count alone (training/optim.py says
# why the others are left out). Our `constant` is transformers' constant_with_warmup, as it always was here.
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt")
REPORT_BACKENDS = ("tensorboard", "wandb")
REPORT_TO = ("none", *REPORT_BACKENDS, "all")  # none and all as transformers reads them (all: every backend installed)
ONE_OR_MORE = {"report_to"}  # list options a file (or JSON) may also give as one string, as transformers' report_to
OVERLONG = ("truncate", "drop")
MAX_TAIL_SAMPLES = 4096
SEEDS = "[0, 2^64)"  # what numpy and torch.manual_seed both take


@dataclass(frozen=True)
class Range:
    """An interval such as (0, inf), [1, 22] or [0, 2^64); infinite ends are open."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool
    text: str  # as written, for messages

    @classmethod
    def parse(cls, text: str) -> Range:
        match = re.fullmatch(r"([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])", text)
        if match is None:
            raise ValueError(f"not an interval: {text!r}")

        def number(token: str) -> float:  # 2^N exactly (an int: a 64-bit seed compares exactly against it)
            return 2 ** int(token[2:]) if token.startswith("2^") else float(token)

        return cls(number(match[2]), number(match[3]), match[1] == "[", match[4] == "]", text)

    def __contains__(self, value: float) -> bool:
        # Written as 'inside', never 'not outside': NaN fails every comparison and so is refused.
        above = self.low <= value if self.low_closed else self.low < value
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf and self.low_closed:
            return f"at least {self.low:g}"
        return f"in {self.text}"


def option(default: Any = MISSING, help: str = "", *, factory: Any = None, choices: tuple[str, ...] = (),
           within: str | None = None, resumable: bool = False) -> Any:
    """A config field that is also a command-line option (--name-with-dashes). `factory`: a default computed when
    the config is built (the CLI's default is then None, meaning 'computed'); `resumable`: may change when a run
    resumes (it does not change what is computed)."""
    meta = {"help": help, "choices": choices, "within": Range.parse(within) if within else None, "resumable": resumable}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def loss_option(name: str) -> Any:
    """An option for a loss parameter, its default, help and range declared once, in its loss class (losses/)."""
    param = PARAMS[name]
    return option(param.default, param.help, within=param.within)


# The loss parameters registered by now (every built-in loss's): each an option of TrainConfig. A loss registered
# later (`register_loss`) gets none; LossConfig still takes its parameters from Python.
LOSS_PARAMETERS = tuple(PARAMS)


def loss_options(namespace: dict[str, Any]) -> None:
    """Write a field for every loss parameter (`loss_option`, in the order the losses declare them) into a config
    class's body: `loss_options(locals())`."""
    annotations = namespace.setdefault("__annotations__", {})
    for name in LOSS_PARAMETERS:
        annotations[name] = PARAMS[name].type
        namespace[name] = loss_option(name)


def stderr_console() -> Console:
    return Console(stderr=True, soft_wrap=True)


def default_compute_precision() -> str:
    """bf16 where it is fast (CUDA), fp32 elsewhere."""
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


ECHO = 80  # characters of a value (a key, a list's item) a message shows; past them, an ellipsis
_ECHO_REPR = reprlib.Repr()  # a repr cut while it is built: a value of any size costs a few hundred characters
_ECHO_REPR.maxlevel, _ECHO_REPR.maxstring, _ECHO_REPR.maxother, _ECHO_REPR.maxlong = 3, ECHO, ECHO, ECHO
for _name in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
    setattr(_ECHO_REPR, _name, 8)


def clip(text: str, limit: int = ECHO) -> str:
    """Text as a message shows it: at most `limit` characters, an ellipsis where it was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def shown(value: Any) -> str:
    """A value as a message shows it: its repr, at most ECHO characters, whatever the value holds."""
    try:
        return clip(_ECHO_REPR.repr(value))
    except ValueError:  # an integer past Python's limit on the digits it writes out
        return f"an integer of about {int(value.bit_length() * math.log10(2))} digits"


def listed(names: list[str], most: int = 5) -> str:
    """Names as a message lists them: the first `most`, each clipped, and how many more."""
    shown_names = ", ".join(clip(str(n)) for n in names[:most])
    return shown_names + (f" and {len(names) - most} more" if len(names) > most else "")


def options_of(config: Any) -> list[Field]:
    """The fields of a config class or instance that are options (not the console)."""
    return [f for f in fields(config) if "help" in f.metadata]


def option_defaults(config: type) -> dict[str, Any]:
    """The default of each option of a config class that has one (required options have none)."""
    out = {}
    for f in options_of(config):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def check_fields(cfg: Any) -> None:
    """Each option's declared choices and range, before anything is loaded or written."""
    for f in options_of(cfg):
        value, choices, within = getattr(cfg, f.name), f.metadata["choices"], f.metadata["within"]
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:  # a list option: each of its values
            if choices and item not in choices:
                raise UserError(f"{flag(f.name)} must be one of {', '.join(choices)}, not {shown(item)}")
        if within is not None and value not in within:
            raise UserError(f"{flag(f.name)} must be {within}, not {shown(value)}")


def to_json(cfg: Any) -> dict[str, Any]:
    """The options as JSON values (a location given from Python as a `Path` is its string)."""
    return {f.name: os.fspath(v) if isinstance(v := getattr(cfg, f.name), os.PathLike) else v for f in options_of(cfg)}


def json_value(name: str, value: Any, hint: Any) -> Any:
    """A JSON value as the option's type (a float from an integer); else a UserError. Locations (folders, files,
    object-store URIs) are strings: `pathlib.Path` would turn s3://b/x into the local s3:/b/x."""
    args = typing.get_args(hint)
    if type(None) in args:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (hint is float and number) or (hint is int and number and isinstance(value, int)):
        return hint(value)
    if hint in (str, bool) and isinstance(value, hint):
        return value
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        kinds = (int, float) if item is float else item  # a float list takes integers, as a float option does
        if isinstance(value, list) and all(isinstance(v, kinds) and not isinstance(v, bool) for v in value):
            return [item(v) for v in value]
        words = {str: "strings", int: "integers", float: "numbers"}
        raise UserError(f"{name} must be a list of {words.get(item, item.__name__)}, not {shown(value)}")
    raise UserError(f"{name} must be {getattr(hint, '__name__', hint)}, not {shown(value)}")


# A train-student config file may name an option as transformers.TrainingArguments does, so a Trainer user's file
# reads as it is: the TrainingArguments name -> our field (a name both use is listed too: this is the whole map).
HF_NAMES = {
    "learning_rate": "lr",
    "lr_scheduler_type": "lr_scheduler",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "warmup_ratio": "warmup_ratio",  # transformers 4's; transformers 5 reads a warmup_steps below 1 as this ratio
    "warmup_steps": "warmup_steps",
    "weight_decay": "weight_decay",
    "max_grad_norm": "grad_clip",
    "seed": "seed",
    "report_to": "report_to",
    "num_train_epochs": "epochs",
    "max_steps": "max_steps",
    "output_dir": "output",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "dataloader_num_workers": "num_workers",
    "gradient_checkpointing": "activation_checkpointing",
    "bf16": "precision",  # true: bf16, false: fp32 (what a Trainer computes in without bf16 or fp16)
}
# TrainingArguments names (of transformers 4 or 5) taid-cache has no option for: refused by name, never ignored.
HF_REFUSED = {
    "fp16": "--precision is fp32 or bf16", "tf32": "--precision is fp32 or bf16",
    "bf16_full_eval": "", "fp16_full_eval": "",
    "logging_steps": "every optimizer step is logged to metrics.jsonl",
    "logging_strategy": "every optimizer step is logged to metrics.jsonl",
    "logging_first_step": "every optimizer step is logged to metrics.jsonl",
    "logging_dir": "--report-to tensorboard writes OUTPUT/tensorboard",
    "save_strategy": "save_steps alone sets the checkpoints", "save_total_limit": "every checkpoint is kept",
    "save_safetensors": "", "overwrite_output_dir": "",
    "eval_strategy": "eval_steps with --eval-cache", "evaluation_strategy": "eval_steps with --eval-cache",
    "per_device_eval_batch_size": "", "load_best_model_at_end": "", "metric_for_best_model": "",
    "optim": "taid-cache trains with torch's AdamW", "optim_args": "taid-cache trains with torch's AdamW",
    "adam_beta1": "AdamW's betas and epsilon are torch's defaults", "adam_beta2": "AdamW's betas and epsilon are torch's defaults",
    "adam_epsilon": "AdamW's betas and epsilon are torch's defaults",
    "lr_scheduler_kwargs": "--lr-scheduler takes transformers' schedulers that need no arguments",
    "resume_from_checkpoint": "resume: true continues from the newest checkpoint in the output folder",
    "deepspeed": "taid-cache shards with FSDP2 under torchrun", "fsdp": "taid-cache shards with FSDP2 under torchrun",
    "fsdp_config": "taid-cache shards with FSDP2 under torchrun", "ddp_backend": "NCCL on GPU, gloo on CPU",
    "use_cpu": "", "torch_compile": "", "gradient_checkpointing_kwargs": "", "data_seed": "seed orders the data too",
    "full_determinism": "", "label_smoothing_factor": "", "neftune_noise_alpha": "", "group_by_length": "",
    "remove_unused_columns": "", "dataloader_pin_memory": "", "dataloader_drop_last": "",
    "do_train": "", "do_eval": "", "do_predict": "", "push_to_hub": "", "hub_model_id": "", "hub_token": "", "run_name": "",
}


def hf_value(key: str, value: Any) -> tuple[str, Any]:
    """A TrainingArguments name and value as our field and value (bf16's flag as a precision; transformers 5's
    warmup_steps below 1 as the warm-up ratio it means)."""
    if key == "bf16":
        if not isinstance(value, bool):
            raise UserError(f"bf16 must be true or false, not {shown(value)}")
        return "precision", "bf16" if value else "fp32"
    if key == "warmup_steps" and isinstance(value, float) and 0 <= value < 1:
        return "warmup_ratio", value
    if key == "warmup_steps" and isinstance(value, float) and value.is_integer():
        return "warmup_steps", int(value)
    return HF_NAMES[key], value


def named_options(values: dict, where: str, hf: bool) -> dict[str, Any]:
    """The keys as field names (dashes to underscores; with `hf`, TrainingArguments names to ours). Two keys for one
    option, or a TrainingArguments name taid-cache does not take: one line."""
    named: dict[str, Any] = {}
    keys: dict[str, str] = {}
    refused = [str(k) for k in values if hf and str(k).replace("-", "_") in HF_REFUSED]
    if refused:
        hints = "; ".join(sorted({HF_REFUSED[k.replace("-", "_")] for k in refused[:5]} - {""}))
        what = "is a transformers TrainingArguments option" if len(refused) == 1 else "are transformers TrainingArguments options"
        raise UserError(f"{where}: {listed(refused)} {what} taid-cache does not take" + (f" ({hints})" if hints else ""))
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if hf and name in HF_NAMES:
            name, value = hf_value(name, value)
        if name in keys:
            raise UserError(f"{where}: {clip(keys[name])} and {clip(str(key))} both give {clip(flag(name))}; keep one")
        named[name], keys[name] = value, str(key)
    return named


def checked_options(cls: type, values: Any, where: str, hf: bool = False) -> dict[str, Any]:
    """A mapping of option names (underscores or dashes; with `hf`, also transformers' TrainingArguments names) to
    JSON-like values, each checked against its option's type: the values of a config file or of `to_json`."""
    if not isinstance(values, dict):
        raise UserError(f"{where} must be a mapping of options, not {type(values).__name__}")
    values = named_options(values, where, hf)
    values.update({k: [values[k]] for k in ONE_OR_MORE if isinstance(values.get(k), str)})
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - {f.name for f in options_of(cls)})
    if unknown:
        raise UserError(f"{where}: unknown options {listed(unknown)}")
    return {k: json_value(k, v, hints[k]) for k, v in values.items()}


def from_json(cls: type, values: Any) -> Any:
    """`to_json`'s inverse, each value checked against its option's type."""
    return cls(**checked_options(cls, values, f"a {cls.__name__}"))


CONFIG_BYTES = 1 << 20  # the largest config file read (a config is a few lines; /dev/zero is not one)
CONFIG_DEPTH = 32  # the deepest nesting of lists and mappings a config file may have (it needs 3)


def unique_keys_loader() -> type:
    """yaml's safe loader, except that a mapping naming one key twice is a UserError (safe_load keeps the last),
    and so are an alias (`*name`: a config file needs none, and nested ones expand exponentially, a 380-byte file
    to 387 million strings), nesting past CONFIG_DEPTH (instead of a RecursionError) and an integer past Python's
    limit on digits (instead of its ValueError), each naming its line."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            line = self.peek_event().start_mark.line + 1
            if self.check_event(yaml.AliasEvent):
                raise UserError(f"line {line}: *{clip(self.peek_event().anchor)} is a YAML alias, which a config file "
                                "may not use (write the value out)")
            if self.depth >= CONFIG_DEPTH:
                raise UserError(f"line {line}: lists or mappings nested deeper than {CONFIG_DEPTH} levels")
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_yaml_int(self, node):
            try:
                return super().construct_yaml_int(node)
            except ValueError:  # past sys.get_int_max_str_digits()
                raise UserError(f"line {node.start_mark.line + 1}: an integer of {len(node.value)} digits is more "
                                "than Python reads") from None

        def construct_object(self, node, deep=False):
            try:
                return super().construct_object(node, deep)
            except ValueError as exc:  # a constructor's own: a date such as 2024-13-01
                raise UserError(f"line {node.start_mark.line + 1}: {clip(first_line(exc), 160)}") from None

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                lines: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden
                        continue
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in lines:
                            raise UserError(f"{clip(str(key))} is given twice (lines {lines[key]} and {line})")
                    except TypeError:  # an unhashable key: the safe loader's own error follows
                        continue
                    lines[key] = line
            return super().construct_mapping(node, deep)

    # YAML 1.1 reads 2e-5 (no dot), as transformers' users write learning rates, as a string; YAML 1.2 and JSON a float.
    UniqueKeys.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                     list("-+0123456789"))
    UniqueKeys.add_constructor("tag:yaml.org,2002:int", UniqueKeys.construct_yaml_int)
    return UniqueKeys


def read_yaml(path: Path) -> Any:
    """A config file's YAML (or JSON) as values (`unique_keys_loader`'s rules), read by every `--config` (and the
    reproduction's); whatever the file holds, a failure is one short line naming the file."""
    import yaml

    try:
        with open(path, "rb") as file:
            data = file.read(CONFIG_BYTES + 1)
    except OSError as exc:
        raise UserError(f"cannot read the config {path}: {clip(' '.join(str(exc).split()), 240)}") from None
    if len(data) > CONFIG_BYTES:
        raise UserError(f"config {path} is larger than {CONFIG_BYTES >> 20} MiB: not a config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"config {path}: line {line}: byte {data[exc.start]:#04x} is not UTF-8 text") from None
    try:
        return yaml.load(text, Loader=unique_keys_loader())
    except yaml.YAMLError as exc:
        raise UserError(f"cannot read the config {path}: {clip(' '.join(str(exc).split()), 240)}") from None
    except UserError as exc:
        raise UserError(f"config {path}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # should a constructor or the stack fail past the loader's own checks
        raise UserError(f"cannot read the config {path}: {clip(first_line(exc), 240)}") from None


def read_options(cls: type, path: Path) -> dict[str, Any]:
    """A YAML (or JSON) file of options, checked (`checked_options`; train-student's may use transformers'
    TrainingArguments names); a one-line error naming the file, also for a key given twice."""
    values = read_yaml(path)
    try:
        return checked_options(cls, {} if values is None else values, f"config {path}", hf=cls is TrainConfig)
    except UserError as exc:
        raise UserError(str(exc) if str(exc).startswith(f"config {path}") else f"config {path}: {exc}") from None


def read_config(cls: type, path: Path) -> Any:
    """A whole config from a file (every required option in it)."""
    options = read_options(cls, path)
    missing = [flag(f.name) for f in options_of(cls) if f.default is MISSING and f.default_factory is MISSING and f.name not in options]
    if missing:
        raise UserError(f"config {path}: missing {', '.join(missing)}")
    return cls(**options)


@dataclass
class DumpConfig:
    """`taid-cache dump-teacher`: run the teacher over a dataset once and store its top-k next-token log-probs."""

    model: str = option(help="Teacher: a local model folder or a hub id.")
    data: list[str] = option(help="Local jsonl/json/parquet/csv files (repeatable; a path that does not exist may be a glob "
                             "pattern, 'dir/*.jsonl') or a hub dataset name.")
    output: str = option(help="Cache folder, or an object-store URI such as s3://bucket/cache (created; shared by all "
                         "workers).")
    split: str = option("train", "Dataset split (hub datasets).")
    input_kind: str = option("auto", "Row kind: chat (messages), text, tokens (input_ids), or auto.", choices=KINDS)
    engine: str = option("auto", "Teacher engine: vllm, hf (transformers), or auto: vLLM when it imports and a GPU is present "
                         "or a parallel size above 1 is asked for, else hf (on CPU vLLM's start-up of about a minute "
                         "outweighs its speed, at most 17% above hf's); the choice and why are printed.", choices=ENGINES)
    top_k: int = option(16, "Top-k next-token log-probs stored per position (0 only with --tail-samples). The default, "
                        "top-16 + 32 draws, is the cache docs/RESULTS.md found best per byte; --tail-samples 0 writes a "
                        "top-k cache, which every loss reads (--top-k 64 --tail-samples 0 stores about as many bytes).")
    top_p: Optional[float] = option(None, "Keep only the fewest entries (1..k) whose mass reaches p.", within="(0, 1]")
    tail_samples: int = option(32, "Also draw N tokens per position from the teacher off the top-k (stored as distinct ids, "
                               "counts and log-probs): an unbiased sampled tail; 0 for none.", within=f"[0, {MAX_TAIL_SAMPLES}]")
    seed: int = option(0, "Seed of the --tail-samples draws.", within=SEEDS)
    target_logprobs: bool = option(False, "Also store, per position, the teacher's exact float32 log-prob of the actual next "
                                   "token, in the head or not (a target_logprob column: what an on-policy loss needs).")
    precision: str = option("compact", "Log-prob storage: compact (1/64-nat grid, error <= 0.0078) or fp32 (exact).",
                            choices=STORAGE_PRECISIONS)
    tensor_parallel_size: int = option(1, "vLLM: devices each layer is split over.", within="[1, inf)")
    pipeline_parallel_size: int = option(1, "vLLM: stages the layers are split over (across nodes with --distributed-backend "
                                         "ray).", within="[1, inf)")
    distributed_backend: str = option("mp", "vLLM's executor for several devices: mp (one node) or ray (a Ray cluster, "
                                      "several nodes).", choices=DISTRIBUTED_BACKENDS)
    vllm_args: Optional[str] = option(None, "vLLM: more keyword arguments of vllm.LLM, as a JSON object (e.g. "
                                      "'{\"enforce_eager\": true, \"quantization\": \"fp8\"}').")
    max_length: Optional[int] = option(None, "Longest sequence in tokens [default: the teacher's context].", within="[2, inf)")
    overlong: str = option("truncate", "Longer rows: truncate or drop.", choices=OVERLONG)
    dtype: str = option("auto", "Teacher dtype: auto (as saved), float32, bfloat16, float16.")
    num_workers: int = option(1, "Independent processes sharing the dataset.", within="[1, inf)")
    worker_index: int = option(0, "This process's slice, 0..num_workers-1.", within="[0, inf)")
    launcher: str = option("local", "How the --num-workers workers run: local (this process is worker --worker-index; start "
                           "the others yourself, e.g. a SLURM job array) or ray (all of them as Ray tasks on the cluster at "
                           "RAY_ADDRESS, or a local one).", choices=("local", "ray"))
    batch_tokens: int = option(16384, "Tokens per engine call.", within="[1, inf)")
    shard_size_mb: float = option(256.0, "Roll to a new shard past this size.", within="(0, inf)")
    zstd_level: int = option(3, "zstd level of the Arrow IPC buffers.", within="[-131072, 22]")
    lm_head_chunk: Optional[int] = option(None, "Positions per LM-head chunk, bounding the float32 [chunk, vocab] buffers "
                                          "[default: as many as keep each within 128 MiB].", within="[1, inf)")
    progress: bool = option(True, "Show a progress bar.")
    console: Console = field(default_factory=stderr_console)

    @property
    def sampled(self) -> bool:
        """It writes a head + sampled tail cache (as the cache's `CacheSettings.sampled` will say)."""
        return self.tail_samples > 0


@dataclass
class GenerateConfig:
    """`taid-cache generate`: a student answers a prompt set (on-policy data): token rows of prompt + answer, the
    answer as the loss mask, for dump-teacher to score (its cache then records the student as its lineage)."""

    student: str = option(help="Student: a local model folder or a hub id (it needs a chat template).")
    data: list[str] = option(help="Prompts: chat rows (a 'messages' column; the prompt is every turn before the last "
                             "assistant turn, or the whole conversation when it ends with another turn); local files "
                             "(repeatable, or a glob pattern) or a hub dataset name.")
    output: str = option(help="Generation folder, or an object-store URI (created; a rerun of the same command resumes "
                         "it). dump-teacher --data takes it.")
    split: str = option("train", "Dataset split (hub datasets).")
    engine: str = option("auto", "Generation engine: vllm (LLM.generate, batched by vLLM, seeded per prompt), hf "
                         "(transformers), or auto: vLLM when it imports and a GPU is present, else hf (on CPU vLLM's "
                         "start-up of about a minute outweighs generating a few hundred short answers).",
                         choices=("auto", "hf", "vllm"))
    vllm_args: Optional[str] = option(None, "vLLM: more keyword arguments of vllm.LLM, as a JSON object (e.g. "
                                      "'{\"enforce_eager\": true}'); recorded with the settings.")
    max_new_tokens: int = option(512, "Longest answer in tokens.", within="[1, inf)")
    temperature: float = option(0.0, "Sampling temperature (0: greedy).", within="[0, inf)")
    top_p: float = option(1.0, "Nucleus sampling's p, with --temperature > 0: draw from the fewest tokens whose mass reaches it.", within="(0, 1]")
    seed: int = option(0, "Seed of the sampling (hf: each batch's seed derived from it and the batch's place; vllm: each "
                       "prompt's, from it and the prompt's row).", within=SEEDS)
    batch_size: int = option(16, "Prompts generated together (hf; vLLM schedules each part's prompts itself).", within="[1, inf)")
    max_length: Optional[int] = option(None, "Longest prompt + answer in tokens; a prompt longer than this less "
                                       "--max-new-tokens is dropped (counted) [default: the student's context, or 2048].",
                                       within="[2, inf)")
    rows_per_part: int = option(256, "Prompts per rows-NNNNNNNNN.jsonl part (each written whole: what a rerun "
                                "resumes from).", within="[1, inf)")
    progress: bool = option(True, "Show a progress bar.")
    console: Console = field(default_factory=stderr_console)


@dataclass
class TrainConfig:
    """`taid-cache train-student`: train a student from a cache with TAID or a baseline loss (one process, or
    torchrun for FSDP2)."""

    student: str = option(help="Student model folder (its initialisation).", resumable=True)
    cache: str = option(help="Cache from dump-teacher: a folder or a URI (s3://bucket/cache).", resumable=True)
    output: str = option(help="Run folder (or a URI): checkpoints, metrics.jsonl, the final student.", resumable=True)
    mix: list[str] = option(help="More caches trained on with --cache as one stream, each sequence drawn from a cache by "
                            "the caches' weights (repeatable): of --cache's teacher and tokenizer, --top-k, --top-p, "
                            "--tail-samples and --target-logprobs [default: none].", factory=list, resumable=True)
    mix_weights: list[float] = option(help="Each cache's share of the sequences, --cache's first, then each --mix's in "
                                      "order (repeatable; any positive scale) [default: their sequences, as if the caches "
                                      "were one].", factory=list)
    loss: str = option("taid", "Distillation loss (docs/LOSSES.md; sft: cross-entropy on the data only).", choices=LOSSES)
    max_steps: Optional[int] = option(None, "Optimizer steps (or give --epochs).", within="[1, inf)")
    epochs: Optional[float] = option(None, "Passes over the cache (or give --max-steps).", within="(0, inf)")
    stop_at_step: Optional[int] = option(None, "Stop after this step, with a checkpoint there, while the learning-rate and "
                                         "TAID schedules still run over --max-steps; --resume continues (how "
                                         "distil-on-policy trains between its rounds) [default: --max-steps].",
                                         within="[1, inf)", resumable=True)
    batch_size: int = option(8, "Sequences per micro-batch per rank.", within="[1, inf)")
    grad_accum: int = option(1, "Micro-batches per optimizer step.", within="[1, 4096]")
    lr: float = option(1e-4, "Peak learning rate (AdamW).", within="(0, inf)")
    lr_scheduler: str = option("cosine", "How the learning rate falls after the warm-up: transformers' scheduler of that "
                               "name (get_scheduler), except constant, which is warm-up then constant (transformers' "
                               "constant_with_warmup; its own constant is that with no warm-up).", choices=LR_SCHEDULERS)
    warmup_steps: int = option(0, "Linear warm-up steps (wins over --warmup-ratio).", within="[0, inf)")
    warmup_ratio: float = option(0.0, "Linear warm-up over this share of the steps.", within="[0, 1)")
    weight_decay: float = option(0.0, "AdamW weight decay.", within="[0, inf)")
    grad_clip: float = option(1.0, "Clip the gradient's global norm to this.", within="(0, inf)")
    seed: int = option(0, "Seed of the data order and initial RNG.", within=SEEDS)
    max_length: int = option(2048, "Longest sequence; longer ones are cut.", within="[2, inf)")
    pack: bool = option(False, "Pack each micro-batch's sequences into rows of --max-length tokens (attention stays "
                        "within each sequence) instead of padding each to the longest.")
    tail: str = option("student", "Where the teacher mass off the top-k goes: spread like the student's, uniformly, "
                       "or nowhere (renorm). A top-k cache only: a --tail-samples cache's tail is its draws.", choices=TAILS)
    distil_ratio: float = option(1.0, "r: train on r * distillation + (1 - r) * CE.", within="[0, 1]")
    # The loss parameters, declared once in the loss classes (losses/): one field each, read by the losses that declare it.
    loss_options(locals())
    beta: Optional[float] = option(None, "Replaced by --skew-beta (skew-fkl, skew-rkl) and --js-beta (js); refused.")
    mu: Optional[float] = option(None, "Replaced by --adaptive-mu (adaptive-kl); refused.")
    taid_t_start: float = option(0.4, "TAID's first t.", within="[0, 1)")
    taid_t_end: float = option(1.0, "TAID's last t.", within="(0, 1]")
    taid_alpha: float = option(5e-4, "TAID's adaptive step size α.", within="[0, 1]")
    taid_beta: float = option(0.99, "TAID's momentum β.", within="[0, 1)")
    taid_disable_adaptive: bool = option(False, "Linear t schedule only.")
    save_every: int = option(0, "Checkpoint every N optimizer steps (0: none).", within="[0, inf)", resumable=True)
    resume: bool = option(False, "Continue from the newest checkpoint in --output.", resumable=True)
    teacher_model: Optional[str] = option(None, "Online mode: run this teacher in-process instead of the cached log-probs.",
                                          resumable=True)
    on_policy: Optional[str] = option(None, "Online on-policy training (needs --teacher-model): mixed (GKD: with probability "
                                      "--mixed-alpha a micro-batch is replaced by a replay-buffer draw that includes the "
                                      "student's answers to its prompts), adaptive (DistiLLM: student answers or replayed "
                                      "ones with a probability that rises when the held-out loss does not fall; needs "
                                      "--eval-cache), or fresh (every micro-batch the student's answers: --loss opd's recipe).",
                                      choices=ON_POLICY)
    mixed_alpha: float = option(0.5, "--on-policy mixed: the probability that a micro-batch is replaced.", within="[0, 1]")
    adaptive_threshold: float = option(0.0, "--on-policy adaptive: the first probability of an on-policy micro-batch; it "
                                       "rises by 0.1 (up to 1) at each evaluation whose loss is not below the last that "
                                       "raised it.", within="[0, 1]")
    adaptive_eps: float = option(0.0, "--on-policy adaptive: how much lower a held-out loss must be to count as falling.",
                                 within="[0, inf)")
    replay_ratio: str = option("decreasing", "--on-policy adaptive: the part of the threshold under which answers are "
                               "generated afresh rather than replayed: constant (half), increasing or decreasing with "
                               "the step.", choices=REPLAY_RATIOS)
    replay_capacity: int = option(1000, "--on-policy mixed / adaptive: answers the replay buffer keeps.", within="[1, 1000000]")
    max_new_tokens: int = option(512, "--on-policy: the longest answer, in tokens (and at most what --max-length leaves).",
                                 within="[1, 1000000]")
    generation_temperature: Optional[float] = option(None, "--on-policy: the student's sampling temperature (0: greedy) "
                                                     "[default: 1 for --loss opd, else greedy as the original].",
                                                     within="[0, 20]")
    generation_top_p: float = option(1.0, "--on-policy: nucleus sampling's mass (1: the whole distribution).", within="(0, 1]")
    eval_cache: Optional[str] = option(None, "Held-out cache for CE / KL / top-1 (a folder or a URI).", resumable=True)
    eval_every: int = option(0, "Evaluate every N steps (and at the end).", within="[0, inf)", resumable=True)
    shuffle_buffer: int = option(1024, "Sequences in the shuffle buffer.", within="[1, inf)")
    read_ahead: int = option(2, "A cache on an object store: shards fetched ahead of need, while the current ones train "
                             "(0: each when first needed).", within="[0, 64]", resumable=True)
    local_cache: Optional[str] = option(None, "A cache on an object store: a local folder that keeps its fetched shards "
                                        "(checked by sha256, reused by later runs).", resumable=True)
    num_workers: int = option(0, "DataLoader worker processes per rank.", within="[0, inf)", resumable=True)
    loss_chunk: int = option(1024, "Positions per LM-head/loss chunk.", within="[1, inf)")
    precision: str = option(help="fp32, or bf16 (bf16 compute, fp32 master weights, optimizer state and gradient "
                            "reduction) [default: bf16 on CUDA, fp32 on CPU].", factory=default_compute_precision,
                            choices=COMPUTE_PRECISIONS)
    activation_checkpointing: bool = option(False, "Recompute activations in the backward pass.")
    report_to: list[str] = option(help="Also log the metrics to tensorboard (OUTPUT/tensorboard) and/or wandb (OUTPUT/wandb; "
                                  "WANDB_MODE=offline works without an account); repeatable; all: every one installed "
                                  "[default: none].", factory=list, choices=REPORT_TO, resumable=True)
    progress: bool = option(True, "Show a progress bar.", resumable=True)
    console: Console = field(default_factory=stderr_console)

    def loss_config(self) -> LossConfig:
        """The loss and every loss parameter, by keyword (sft trains on the data alone)."""
        return LossConfig(name=self.loss, distil_ratio=0.0 if self.loss == "sft" else self.distil_ratio,
                          **{name: getattr(self, name) for name in LOSS_PARAMETERS})

    def settings(self) -> dict[str, Any]:
        """What a resumed run must share with the run it continues. Paths are not settings: the run records what
        they held (the cache's identity, the models' hashes), so a moved folder resumes and a rebuilt cache at the
        same path does not."""
        resumable = {f.name for f in options_of(self) if f.metadata["resumable"]}
        return {k: v for k, v in to_json(self).items() if k not in resumable}
