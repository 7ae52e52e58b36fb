"""Read examples from .txt / .jsonl files, failing loudly with file and line on anything malformed.

- `.txt`: one example per non-blank line (surrounding whitespace stripped).
- `.jsonl`: one JSON object per non-blank line, in one of three formats (`data_format`):
  - "text": a non-empty string "text";
  - "alpaca": "instruction", optional "input", "output" (chat.py; read as a `Chat`);
  - "chat": "messages", a list of {"role", "content"} (chat.py; read as a `Chat`);
  each with, optionally, a string "source". "auto" picks the format per file from the keys of its first
  record ("messages": chat, "instruction": alpaca, else text); every record of a file must then have it.
- A directory: its .txt and .jsonl files, in sorted name order, not recursing into subdirectories;
  other files are ignored.

Every example carries a `source` tag for non-IID partitioning: the JSON "source" if given, else the
name of its file without the extension (for the built-in corpus: the play).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .chat import Chat, parse_alpaca, parse_chat
from .errors import DataError

SUFFIXES = (".jsonl", ".txt")
FORMATS = ("auto", "text", "alpaca", "chat")


@dataclass(frozen=True)
class Example:
    text: str
    source: str


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each line, decoded as UTF-8 line by line to locate bad bytes."""
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid UTF-8 (byte {e.start + 1} of the line)") from None
        if lineno == 1:
            line = line.removeprefix("\ufeff")  # byte-order mark
        yield lineno, line


def _read_txt(path: Path) -> Iterator[Example]:
    for _, line in _lines(path):
        if line.strip():
            yield Example(line.strip(), path.stem)


def _text_record(record: dict, where: str, source: str) -> Example:
    if "text" not in record:
        raise DataError(f'{where}: missing "text" key (the object has {len(record)} other key(s))')
    text = record["text"]
    if not isinstance(text, str):
        raise DataError(f'{where}: "text" must be a string, got {type(text).__name__}')
    if not text.strip():
        raise DataError(f'{where}: "text" is empty')
    return Example(text, source)


_PARSERS = {"text": _text_record, "alpaca": parse_alpaca, "chat": parse_chat}


def detect_format(record: dict) -> str:
    """The format a record's keys say: "messages" -> chat, "instruction" -> alpaca, else text."""
    return "chat" if "messages" in record else "alpaca" if "instruction" in record else "text"


def _read_jsonl(path: Path, data_format: str) -> Iterator[Example | Chat]:
    detected_at = 0
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(record, dict):
            kind = type(record).__name__
            expected = 'a "text" string' if data_format == "text" else f"a {data_format} record"
            raise DataError(f"{where}: expected a JSON object with {expected}, got {kind}")
        if data_format == "auto":
            data_format, detected_at = detect_format(record), lineno
        elif detected_at and detect_format(record) != data_format:
            raise DataError(f"{where}: a record in the {detect_format(record)} format, but line {detected_at} "
                            f"made this a {data_format} file (data-format auto: one format per file)")
        source = record.get("source", path.stem)
        if not isinstance(source, str) or not source:
            got = "an empty string" if source == "" else type(source).__name__
            raise DataError(f'{where}: "source" must be a non-empty string, got {got}')
        yield _PARSERS[data_format](record, where, source)


def _read_file(path: Path, data_format: str) -> list[Example | Chat]:
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'!r}, expected .txt or .jsonl")
    if path.suffix == ".txt" and data_format not in ("auto", "text"):
        raise DataError(f"{path}: a .txt file holds text, but data-format is {data_format!r} (use .jsonl records)")
    try:
        examples = list(_read_jsonl(path, data_format) if path.suffix == ".jsonl" else _read_txt(path))
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if not examples:
        raise DataError(f"{path}: file has no examples (it is empty or only blank lines)")
    return examples


def data_files(path: str | Path) -> list[Path]:
    """The files `load_examples(path)` reads, in order."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise DataError(f"{path}: directory has no .txt or .jsonl files (subdirectories are not searched)")
    return files


def load_examples(path: str | Path, data_format: str = "text") -> list[Example | Chat]:
    """All examples of a .txt / .jsonl file or of a directory of them, in file then line order: `Example`
    for text, `Chat` for alpaca and chat records (see the module docstring for `data_format`)."""
    if data_format not in FORMATS:
        raise ValueError(f"unknown data format {data_format!r}, expected one of {', '.join(FORMATS)}")
    return [example for file in data_files(path) for example in _read_file(file, data_format)]
