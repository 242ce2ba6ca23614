"""Hostile `--config` files: YAML alias bombs, values that would be echoed at length, integers past Python's
digit limit, bytes that are not UTF-8, nesting deeper than the stack. Each is one short line on stderr naming the
file, exit 2, nothing written, for train-student, dump-teacher and the reproduction alike.

Every case runs the real command as `python -m` runs it, in the suite's command server (one start
for every case), under an address-space limit: a loader that expanded a bomb fails here by a MemoryError instead
of taking the machine's memory."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import CommandServer

COMMANDS = ("train-student", "dump-teacher", "reproduce")
# A known key of each command that takes a list (where a bomb is most at home) and one that takes an integer.
LIST_KEY = {"train-student": "report_to", "dump-teacher": "data", "reproduce": "methods"}
INT_KEY = {"train-student": "max_steps", "dump-teacher": "top_k", "reproduce": "seeds"}
SHORT = 400  # characters a message may take besides the file's name


def bomb(depth: int) -> str:
    """[&a [lol x9], &b [*a x9], ...]: `depth` levels of nine, 9**depth strings once expanded (9: 387 million)."""
    names = "abcdefghi"[:depth]
    levels = [f"&a [{', '.join(['lol'] * 9)}]"]
    levels += [f"&{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip(names, names[1:])]
    return f"[{', '.join(levels)}]"



def run(commands: CommandServer, command: str, config: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    if command == "reproduce":
        module, args = "taid_cache.reproduce", ["--config", str(config), "--out", str(out)]
    elif command == "train-student":
        module, args = "taid_cache.cli", ["train-student", "--config", str(config), "--student", str(tmp_path / "student"),
                                          "--cache", str(tmp_path / "cache"), "--output", str(out)]
    else:
        module, args = "taid_cache.cli", ["dump-teacher", "--config", str(config), "--model", str(tmp_path / "model"),
                                          "--data", str(tmp_path / "data.jsonl"), "--output", str(out)]
    return commands.run(module, *args, cwd=tmp_path), out


def refused(commands: CommandServer, command: str, tmp_path: Path, content: str | bytes, *words: str, names_file: bool = True) -> str:
    """Run `command` on a config holding `content`: exit 2, one short line naming the file (and `words`), no output.
    A stage's choices and ranges are checked once the config is built, and name the option, not the file."""
    config = tmp_path / "bad.yaml"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    proc, out = run(commands, command, config, tmp_path)
    message = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, message[-2000:])
    assert len(message.splitlines()) == 1 and message.startswith("error:"), message[:2000]
    assert str(config) in message or not names_file, message[:2000]
    # What the message echoes is short; the list of known methods the reproduction adds is the code's, not the input's.
    echoed = message.replace(str(config), "").split("; known: ")[0]
    assert len(echoed) < SHORT, f"{len(message)} characters: {message[:300]}..."
    for word in words:
        assert word in message, message
    assert not out.exists()
    return message


@pytest.mark.parametrize("command", COMMANDS)
def test_an_alias_bomb_is_refused_in_one_line(commands: CommandServer, command: str, tmp_path: Path) -> None:
    text = f"{LIST_KEY[command]}: {bomb(9)}\n"
    assert len(text) < 400
    message = refused(commands, command, tmp_path, text, "alias", "line 1")
    assert "*a" in message  # the alias it met first


@pytest.mark.parametrize("command", COMMANDS)
def test_every_alias_is_refused_not_only_a_large_one(commands: CommandServer, command: str, tmp_path: Path) -> None:
    refused(commands, command, tmp_path, f"# the integer once, then by alias\nseed: &n 3\n{INT_KEY[command]}: *n\n", "alias", "line 3")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_small_bomb_is_not_echoed_whole(commands: CommandServer, command: str, tmp_path: Path) -> None:
    # 215 bytes of depth 6: the old type error printed its 531,441 strings (4.3 MB).
    refused(commands, command, tmp_path, f"{INT_KEY[command]}: {bomb(6)}\n")


@pytest.mark.parametrize("command", COMMANDS)
def test_an_integer_past_the_digit_limit_is_one_line(commands: CommandServer, command: str, tmp_path: Path) -> None:
    value = "1" + "0" * 5000
    refused(commands, command, tmp_path, f"{INT_KEY[command]}: {value if command != 'reproduce' else f'[{value}]'}\n", "line 1")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_byte_that_is_not_utf8_is_one_line(commands: CommandServer, command: str, tmp_path: Path) -> None:
    refused(commands, command, tmp_path, f"{INT_KEY[command]}: 3\n# caf".encode() + b"\xe9\n", "UTF-8")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("brackets", ["[]", "{}"])
def test_deep_nesting_is_one_line(commands: CommandServer, command: str, brackets: str, tmp_path: Path) -> None:
    opening, closing = brackets
    depth = 100_000
    refused(commands, command, tmp_path, f"{LIST_KEY[command]}: {opening * depth}{closing * depth}\n", "line 1")


@pytest.mark.parametrize("command", COMMANDS)
def test_deep_json_nesting_is_one_line(commands: CommandServer, command: str, tmp_path: Path) -> None:
    refused(commands, command, tmp_path, f'{{"{LIST_KEY[command]}": {"[" * 100_000}{"]" * 100_000}}}\n')


LONG = "x" * 5000
KEY = f"? {LONG}\n:"  # an explicit key: YAML takes a plain `key:` of at most 1024 characters
BIG = "-1" + "0" * 4000  # an integer Python still converts, 4001 characters written out
# One case for each message that echoes what the file holds: type errors, unknown options, a key given twice,
# choices, ranges, transformers' bf16, the YAML parser's own. CHECKED: those of the stages' check_fields, once the
# config is built (they name the option, not the file).
CHECKED = "choices or range"
ECHOES = [
    ("train-student", f"max_steps: {LONG}\n"),  # type error
    ("train-student", f"lr: [{', '.join(['1'] * 2000)}]\n"),  # type error, a list
    ("train-student", f"loss: {LONG}\n", CHECKED),  # choices
    ("train-student", f"report_to: [tensorboard, {LONG}]\n", CHECKED),  # choices, an item of a list
    ("train-student", f"bf16: {LONG}\n"),  # transformers' name
    ("train-student", f"grad_accum: {BIG}\n", CHECKED),  # range
    ("train-student", f"{KEY} 1\n"),  # unknown option
    ("train-student", "".join(f"option_{i}_{'y' * 40}: 1\n" for i in range(300))),  # many unknown options
    ("train-student", f"{KEY} 1\n{KEY} 2\n"),  # a key given twice
    ("train-student", f"? a-b{LONG}\n: 1\n? a_b{LONG}\n: 2\n"),  # two spellings of one
    ("dump-teacher", f"data: [{', '.join(['1'] * 2000)}]\n"),  # list of strings
    ("dump-teacher", f"input_kind: {LONG}\n", CHECKED),  # choices
    ("dump-teacher", f"zstd_level: {BIG}\n", CHECKED),  # range
    ("dump-teacher", f"top_k: !<tag:{LONG}> 3\n"),  # the YAML loader's own error
    ("dump-teacher", f"top_k: '{LONG}\n"),  # the YAML scanner's own error
    ("reproduce", f"methods: [{LONG}]\n"),  # unknown method
    ("reproduce", f"methods: [{', '.join(f'm{i}' for i in range(2000))}]\n"),  # many unknown methods
    ("reproduce", f"cache: {LONG}\n"),  # choices
    ("reproduce", f"seeds: [{', '.join(['-1'] * 2000)}]\n"),  # seeds' rule
    ("reproduce", f"heldout_rows: {BIG}\n"),  # range
    ("reproduce", f"max_steps: {LONG}\n"),  # type error
    ("reproduce", f"{KEY} 1\n"),  # unknown key
    ("reproduce", f"teacher_size:\n  ? {LONG}\n  : 1\n"),  # unknown key of a size
    ("reproduce", f"teacher_size: {{hidden: {LONG}}}\n"),  # type error of a size
]


@pytest.mark.parametrize("case", ECHOES, ids=[f"{case[0]}-{i}" for i, case in enumerate(ECHOES)])
def test_no_message_echoes_a_value_at_length(commands: CommandServer, case: tuple, tmp_path: Path) -> None:
    command, text, *checked = case
    message = refused(commands, command, tmp_path, text, names_file=not checked)
    assert any(cut in message for cut in ("…", "...", " more")), message  # what it shows of the value, cut


def test_the_reproduction_reads_yaml_as_the_stages_do(commands: CommandServer, tmp_path: Path) -> None:
    # One loader for every config file: a key given twice is refused there too (safe_load kept the last).
    refused(commands, "reproduce", tmp_path, "max_steps: 3\nlr: 0.1\nmax_steps: 4\n", "max_steps is given twice (lines 1 and 3)")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_file_past_a_config_files_size_is_refused_unread(commands: CommandServer, command: str, tmp_path: Path) -> None:
    refused(commands, command, tmp_path, f"{INT_KEY[command]}: 3\n" + "# a comment\n" * 200_000, "larger than")
