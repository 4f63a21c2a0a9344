"""Training data: JSONL rows in, token ids with assistant-only labels out.

Two row formats, one per line:

- chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``, ending with an
  assistant message;
- alpaca: ``{"instruction": "...", "input": "...", "output": "..."}`` (``input`` optional), read as one user
  turn (instruction, a blank line, input) and one assistant turn (output).

Rows are formatted with the base model's chat template, exactly as the server formats a chat request, and
only assistant tokens (their text and the end-of-turn token) carry a loss. A bad row fails with its file
and line number.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfigError

ROLES = ("system", "user", "assistant")
MAX_LINE_BYTES = 1 << 20  # one row; a longer line is refused rather than read into memory whole
IGNORE = -100  # label of tokens without a loss (PyTorch's cross-entropy ignore_index)


class DataError(TrainConfigError):
    """A dataset file or row that cannot be used."""


@dataclass(frozen=True, slots=True)
class Row:
    source: str  # "file.jsonl:12"
    messages: tuple[dict, ...]  # chat messages, the last one from the assistant


@dataclass(frozen=True, slots=True)
class DataFile:
    path: str
    sha256: str
    rows: int


@dataclass(frozen=True, slots=True)
class Example:
    source: str
    input_ids: list[int]  # [T] the formatted conversation
    labels: list[int]  # [T] input_ids on assistant tokens, IGNORE elsewhere


def _messages(obj: object, where: str) -> tuple[dict, ...]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a row must be a JSON object")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: messages must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise DataError(f"{where}: messages[{i}].role must be one of {', '.join(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}].content must be a string")
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer")
        if not out[-1]["content"].strip():
            raise DataError(f"{where}: the assistant's answer is empty")
        if not any(m["role"] == "user" for m in out):
            raise DataError(f"{where}: a conversation needs a user message")
        return tuple(out)
    if "instruction" in obj or "output" in obj:
        ins, inp, outp = obj.get("instruction"), obj.get("input", ""), obj.get("output")
        if not isinstance(ins, str) or not ins.strip():
            raise DataError(f"{where}: instruction must be a non-empty string")
        if not isinstance(inp, str):
            raise DataError(f"{where}: input must be a string")
        if not isinstance(outp, str) or not outp.strip():
            raise DataError(f"{where}: output must be a non-empty string")
        user = f"{ins}\n\n{inp}" if inp.strip() else ins
        return ({"role": "user", "content": user}, {"role": "assistant", "content": outp})
    raise DataError(f"{where}: a row needs messages (chat) or instruction and output (alpaca)")


def read_rows(path: Path) -> tuple[list[Row], DataFile]:
    """Parse one JSONL file; blank lines are skipped, anything else malformed is an error naming the line."""
    digest = hashlib.sha256()
    rows: list[Row] = []
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    with fh:
        for n, raw in enumerate(iter(lambda: fh.readline(MAX_LINE_BYTES + 1), b""), start=1):
            digest.update(raw)
            where = f"{path}:{n}"
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{where}: line longer than {MAX_LINE_BYTES} bytes")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
            rows.append(Row(where, _messages(obj, where)))
    return rows, DataFile(str(path), digest.hexdigest(), len(rows))


def read_files(paths: list[Path]) -> tuple[list[Row], list[DataFile]]:
    rows: list[Row] = []
    files: list[DataFile] = []
    for p in paths:
        r, f = read_rows(p)
        rows += r
        files.append(f)
    return rows, files


def split(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """A seeded shuffle, then the first ``fraction`` (at least one row when fraction > 0) held out."""
    if fraction <= 0:
        return list(rows), []
    order = list(rows)
    random.Random(seed).shuffle(order)
    n = max(1, round(len(order) * fraction))
    return order[n:], order[:n]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode(row: Row, tokenizer, max_seq_len: int) -> Example | None:
    """Token ids of the formatted conversation and labels on the assistant turns; None when truncation leaves
    no assistant token."""
    msgs = list(row.messages)
    try:
        full = _ids(tokenizer, tokenizer.apply_chat_template(msgs, tokenize=False))
    except Exception as exc:  # a template that rejects the conversation (e.g. roles out of order)
        raise DataError(f"{row.source}: the chat template rejects this conversation ({exc})") from None
    labels = [IGNORE] * len(full)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)))
        upto = _ids(tokenizer, tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False))
        if full[: len(upto)] != upto or start > len(upto):
            raise DataError(f"{row.source}: the chat template does not format this conversation turn by turn")
        labels[start: len(upto)] = upto[start:]
    input_ids, labels = full[:max_seq_len], labels[:max_seq_len]
    if all(t == IGNORE for t in labels):
        return None
    return Example(row.source, input_ids, labels)


def encode_all(rows: list[Row], tokenizer, max_seq_len: int) -> tuple[list[Example], int]:
    """Encode every row; returns the examples and how many rows were dropped (no assistant token left)."""
    out = [e for r in rows if (e := encode(r, tokenizer, max_seq_len)) is not None]
    return out, len(rows) - len(out)
