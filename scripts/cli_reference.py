"""docs/CLI.md's option tables, generated from the command line itself (so they cannot drift from --help).

    python scripts/cli_reference.py          # rewrite the tables in docs/CLI.md
    python scripts/cli_reference.py --check  # exit 1 if they differ from the CLI (the test suite runs this)

Each command's table sits between `<!-- options: NAME -->` and `<!-- end options -->` in docs/CLI.md."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import typer

from taid_cache.cli import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "CLI.md"
BLOCK = re.compile(r"(<!-- options: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end options -->)", re.S)


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def default_of(param) -> str:
    if param.required:
        return "required"
    if isinstance(param.default, bool) and param.secondary_opts:
        return f"`{param.opts[0] if param.default else param.secondary_opts[0]}`"
    if param.default is None or param.default == () or param.default == []:
        return ""
    return f"`{param.default}`"


def table(command) -> str:
    """One row per argument and option: its name(s), default, and help text (ranges and choices included)."""
    rows = ["| argument / option | default | meaning |", "|---|---|---|"]
    for param in command.params:
        if param.param_type_name == "argument":
            rows.append(f"| `{param.name.upper()}` | {'required' if param.required else ''} | {cell(getattr(param, 'help', '') or '')} |")
        elif param.name != "help":
            names = " / ".join(param.opts + param.secondary_opts)
            rows.append(f"| `{names}` | {default_of(param)} | {cell(param.help or '')} |")
    return "\n".join(rows) + "\n"


def tables() -> dict[str, str]:
    return {name: table(command) for name, command in typer.main.get_command(app).commands.items()}


def render(text: str) -> str:
    generated = tables()
    return BLOCK.sub(lambda m: m.group(1) + generated[m.group("name")] + m.group(4), text)


def main() -> int:
    text = DOC.read_text()
    missing = sorted(set(tables()) - {m.group("name") for m in BLOCK.finditer(text)})
    if missing:
        print(f"docs/CLI.md has no option table for {', '.join(missing)}", file=sys.stderr)
        return 1
    new = render(text)
    if "--check" in sys.argv[1:]:
        if new != text:
            print("docs/CLI.md's option tables differ from the CLI: run python scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
