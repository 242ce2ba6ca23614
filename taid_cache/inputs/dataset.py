"""Dataset rows: local files or a hub dataset loaded with `datasets`, their kind detected from the columns and
every row checked on Arrow before anything is written; the dataset's fingerprint; a worker's slice of rows.

Three row kinds: `chat` (a `messages` list of role/content turns), `text`, and `tokens` (`input_ids`, optional
`loss_mask`)."""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path


from ..errors import UserError, first_line

KINDS = ("auto", "chat", "text", "tokens")
KIND_COLUMNS = {"chat": "messages", "text": "text", "tokens": "input_ids"}
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def resolve_data(data: list[str]) -> list[str]:
    """--data with its patterns expanded: a value that names an existing path is that path, even when its name
    holds *, ? or [ ]; only one that names nothing may be a glob pattern, standing for its files, sorted. A
    finished generation folder (`taid-cache generate`'s) stands for its parts, in order."""
    from .generated import is_generation_folder, part_files

    out = []
    for value in data:
        if is_generation_folder(value):
            out += part_files(Path(value))
            continue
        if Path(value).exists() or not any(c in value for c in "*?["):
            out.append(value)
            continue
        matches = sorted(m for m in glob.glob(value) if Path(m).is_file())
        if not matches:
            raise UserError(f"--data {value}: no such file, and no file matches it as a pattern")
        out += matches
    return out


def kind_of(columns: list[str]) -> str | None:
    return next((kind for kind, column in KIND_COLUMNS.items() if column in columns), None)


def load_rows(data: list[str], split: str):
    """Local files (by extension; `resolve_data`'s list) or a dataset name on the hub, read with `datasets`."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own log line about a bad file would double ours
    paths = [Path(d) for d in data]
    try:
        if all(p.is_file() for p in paths):
            builders = {FILE_BUILDERS.get(p.suffix.lower()) for p in paths}
            if None in builders or len(builders) != 1:
                raise UserError(f"--data files must all be one of {', '.join(FILE_BUILDERS)}: got {', '.join(map(str, paths))}")
            if all(p.stat().st_size == 0 or not p.open("rb").read(4096).strip() for p in paths):
                raise UserError(f"the dataset {', '.join(data)} has no rows")
            builder = builders.pop()
            # One file at a time, each name escaped: `datasets` reads data_files as patterns, and a literal
            # `data[1].jsonl` must not stand for `data1.jsonl`.
            parts = [datasets.load_dataset(builder, data_files=[glob.escape(str(p))], split="train") for p in paths]
            return concatenate(parts, paths)
        missing = [str(p) for p in paths if (p.suffix.lower() in FILE_BUILDERS or len(data) > 1) and not p.exists()]
        if missing:
            raise UserError(f"data file not found: {missing[0]}")
        if len(data) != 1:
            raise UserError("several --data values must all be local files")
        return datasets.load_dataset(data[0], split=split)
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable or unknown data
        cause = exc
        while cause.__cause__ is not None or cause.__context__ is not None:  # the parser's own words are the useful ones
            cause = cause.__cause__ or cause.__context__
        raise UserError(f"cannot load dataset {', '.join(data)} (split {split}): {first_line(cause)}") from None


def concatenate(parts: list, paths: list[Path]):
    """Several files' rows in order, when they are rows of one kind with the same columns."""
    import datasets

    first = parts[0]
    for part, path in zip(parts[1:], paths[1:]):
        kinds = kind_of(first.column_names), kind_of(part.column_names)
        if kinds[0] != kinds[1]:
            raise UserError(f"--data files hold different row kinds: {paths[0]} has {kinds[0] or 'unusable'} rows, "
                            f"{path} {kinds[1] or 'unusable'} rows; give files of one kind")
        if set(part.column_names) != set(first.column_names):
            raise UserError(f"--data files have different columns: {paths[0]} ({', '.join(first.column_names)}), "
                            f"{path} ({', '.join(part.column_names)})")
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else first


def check_rows(rows, kind: str, vocab_size: int) -> None:
    """Every row of the chosen kind is well formed, checked on the Arrow table before anything is written:
    a bad row found halfway through a dump would leave a part that blocks the corrected command."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = rows.data.table if hasattr(rows.data, "table") else rows.data
    column = table.column(KIND_COLUMNS[kind]).combine_chunks()

    def bad(what: str) -> UserError:
        return UserError(f"the {KIND_COLUMNS[kind]!r} column {what}")

    def first_null(array: pa.Array) -> int:
        return int(pc.index(array.is_null(), True).as_py())

    if column.null_count:
        return_row = first_null(column)
        raise bad(f"is empty (null) at row {return_row}")
    if kind == "text":
        if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
            raise bad(f"must hold strings, not {column.type}")
    elif kind == "chat":
        if not pa.types.is_list(column.type) or not pa.types.is_struct(column.type.value_type):
            raise bad(f"must hold lists of {{role, content}} turns, not {column.type}")
        turns = column.type.value_type
        for name in ("role", "content"):
            if turns.get_field_index(name) < 0:
                raise bad(f"has turns without a {name!r} field")
            values = pc.struct_field(column.flatten(), name)
            if not pa.types.is_string(values.type):
                raise bad(f"has {name!r} values of type {values.type}, not strings")
            if values.null_count:
                row = int(pc.list_parent_indices(column)[first_null(values)].as_py())
                raise bad(f"has a turn without a {name!r} at row {row}")
        empty = pc.equal(pc.list_value_length(column), 0)
        if pc.any(empty).as_py():
            raise bad(f"has an empty conversation at row {int(pc.index(empty, True).as_py())}")
    else:
        if not pa.types.is_list(column.type) or not pa.types.is_integer(column.type.value_type):
            raise bad(f"must hold lists of integer token ids, not {column.type}")
        ids = column.flatten()
        if ids.null_count:
            raise bad("holds null token ids")
        if len(ids) and (pc.min(ids).as_py() < 0 or pc.max(ids).as_py() >= vocab_size):
            raise bad(f"holds token ids outside the teacher's vocabulary [0, {vocab_size}): "
                      f"min {pc.min(ids).as_py()}, max {pc.max(ids).as_py()}")
        if "loss_mask" in table.column_names:
            mask = table.column("loss_mask").combine_chunks()
            if not pa.types.is_list(mask.type) or not (pa.types.is_boolean(mask.type.value_type) or pa.types.is_integer(mask.type.value_type)):
                raise UserError(f"the 'loss_mask' column must hold lists of booleans, not {mask.type}")
            differ = pc.not_equal(pc.list_value_length(mask), pc.list_value_length(column))  # null rows: no mask
            if pc.any(differ).as_py():
                row = int(pc.index(differ, True).as_py())
                raise UserError(f"row {row}: loss_mask has {len(mask[row])} entries for {len(column[row])} input_ids")


def dataset_fingerprint(data: list[str], rows) -> str:
    """Content hash of local files; the `datasets` fingerprint of a hub dataset."""
    paths = [Path(d) for d in data]
    if not all(p.is_file() for p in paths):
        return rows._fingerprint
    digest = hashlib.sha256()
    for p in paths:  # one running hash over (name, content) of each file in turn
        digest.update(p.name.encode())
        with open(p, "rb") as fh:
            hashlib.file_digest(fh, lambda: digest)
    return digest.hexdigest()


def detect_kind(columns: list[str], forced: str) -> str:
    if forced != "auto":
        if KIND_COLUMNS[forced] not in columns:
            raise UserError(f"--input-kind {forced} needs a '{KIND_COLUMNS[forced]}' column; the data has {', '.join(columns)}")
        return forced
    for kind, column in KIND_COLUMNS.items():
        if column in columns:
            return kind
    raise UserError(f"no usable column: expected one of messages, text or input_ids; the data has {', '.join(columns)}")


def source_tag(data: list[str]) -> str:
    first = Path(data[0])
    return first.stem if first.is_file() else data[0].replace("/", "__")


def worker_slice(num_rows: int, num_workers: int, worker_index: int) -> tuple[int, int]:
    """Contiguous, disjoint slices covering every row; their concatenation is the dataset's order."""
    return num_rows * worker_index // num_workers, num_rows * (worker_index + 1) // num_workers
