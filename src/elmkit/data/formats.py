"""Readers for the data formats elmkit trains and evaluates on.

All instruction-style formats become one record type, :class:`Example` (the ELM/Alpaca shape:
``instruction``, ``input``, ``output``) plus the gold final ``answer`` when one is known:

=============  ================================================  ===========================
format         file shape                                        fields
=============  ================================================  ===========================
``alpaca``     JSON list (or JSONL) of objects                   instruction, input?, output
``gsm8k``      JSONL                                             question, answer (``#### N``)
``metamath``   JSONL                                             query, response
``math``       JSONL (MATH answers)                              question, answer
``text``       JSONL                                             text
=============  ================================================  ===========================

A malformed file fails with the file, the line (JSONL) or record (JSON) number, and what was
expected there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# The instruction the ELM/MetaMath data put before every math question.
MATH_INSTRUCTION = (
    "Please solve the following problem step by step. When you reach the answer, please output "
    "the answer after 'The answer is: ' at the end of the response.\n\n"
)

FORMATS = ("alpaca", "gsm8k", "metamath", "math", "text")


class DataFormatError(ValueError):
    """A data file does not have the expected shape."""


@dataclass(frozen=True)
class Example:
    """One instruction-following example (the ELM/Alpaca record)."""

    instruction: str
    """The user's request."""
    input: str = ""
    """Optional extra context appended to the instruction."""
    output: str = ""
    """The reference response (may be empty for evaluation-only data)."""
    answer: str | None = None
    """Gold final answer, when the format states one (GSM8K ``#### N``, MATH answer field)."""


def decode_utf8(raw: bytes, path) -> str:
    """``raw`` as UTF-8 text, or one error naming the file, line and byte that is not."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataFormatError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                              f"column {col}); save the file as UTF-8") from None


def _records(path: Path) -> Iterator[tuple[str, object]]:
    """Yield (location, record) from a JSON list or a JSONL file."""
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    text = decode_utf8(path.read_bytes(), path)
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(
                f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
            ) from e
        if not isinstance(data, list):
            raise DataFormatError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        for i, rec in enumerate(data):
            yield f"{path}, record {i}", rec
        return
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}, line {n}: malformed JSON ({e.msg})") from e
        yield f"{path}, line {n}", rec


def _fields(where: str, rec: object, required: tuple[str, ...], fmt: str) -> dict:
    if not isinstance(rec, dict):
        raise DataFormatError(f"{where}: expected a JSON object with {', '.join(required)}")
    for key in required:
        if key not in rec:
            raise DataFormatError(
                f"{where}: missing field '{key}' (the {fmt} format needs {', '.join(required)}; "
                f"found {', '.join(sorted(rec)) or 'no fields'})"
            )
        if not isinstance(rec[key], str):
            raise DataFormatError(f"{where}: field '{key}' must be a string, got {type(rec[key]).__name__}")
    return rec


_HASHES = re.compile(r"####\s*(.+?)\s*$", re.S)
_CALC = re.compile(r"<<[^>]*>>")


def gsm8k_to_cot(answer: str) -> str:
    """GSM8K solution -> MetaMath style: drop ``<<calc>>`` notes, end in ``The answer is: N``."""
    body, _, final = answer.rpartition("####")
    body = _CALC.sub("", body).rstrip()
    return f"{body}\nThe answer is: {final.strip()}" if body else f"The answer is: {final.strip()}"


def read_alpaca(path: str | Path) -> list[Example]:
    """ELM/Alpaca: a list of ``{instruction, input, output}`` (``input`` may be absent)."""
    out = []
    for where, rec in _records(Path(path)):
        rec = _fields(where, rec, ("instruction", "output"), "alpaca")
        inp = rec.get("input", "")
        if not isinstance(inp, str):
            raise DataFormatError(f"{where}: field 'input' must be a string")
        out.append(Example(rec["instruction"], inp, rec["output"], _final_answer(rec["output"])))
    return out


def read_gsm8k(path: str | Path, instruction: str = MATH_INSTRUCTION, cot: bool = True) -> list[Example]:
    """GSM8K JSONL (``question``, ``answer`` ending ``#### N``).

    ``cot=True`` rewrites the solution in MetaMath style (see :func:`gsm8k_to_cot`), the style the
    ELM data and the math scorer use.
    """
    out = []
    for where, rec in _records(Path(path)):
        rec = _fields(where, rec, ("question", "answer"), "gsm8k")
        m = _HASHES.search(rec["answer"])
        if m is None:
            raise DataFormatError(f"{where}: field 'answer' does not end with '#### <number>'")
        output = gsm8k_to_cot(rec["answer"]) if cot else rec["answer"]
        out.append(Example(instruction + rec["question"], "", output, m.group(1).strip()))
    return out


def read_metamath(path: str | Path, instruction: str = MATH_INSTRUCTION) -> list[Example]:
    """MetaMath JSONL (``query``, ``response`` ending ``The answer is: X``)."""
    out = []
    for where, rec in _records(Path(path)):
        rec = _fields(where, rec, ("query", "response"), "metamath")
        out.append(Example(instruction + rec["query"], "", rec["response"], _final_answer(rec["response"])))
    return out


def read_math(path: str | Path, instruction: str = MATH_INSTRUCTION) -> list[Example]:
    """MATH answers JSONL (``question``, ``answer``: the final answer only)."""
    out = []
    for where, rec in _records(Path(path)):
        rec = _fields(where, rec, ("question", "answer"), "math")
        out.append(Example(instruction + rec["question"], "", "", rec["answer"]))
    return out


def read_text(path: str | Path) -> list[str]:
    """Plain-text JSONL: one ``{"text": ...}`` per line."""
    return [_fields(w, r, ("text",), "text")["text"] for w, r in _records(Path(path))]


_READERS = {"alpaca": read_alpaca, "gsm8k": read_gsm8k, "metamath": read_metamath, "math": read_math}


def detect_format(path: str | Path) -> str:
    """Guess the format from the first record's fields."""
    path = Path(path)
    for where, rec in _records(path):
        if not isinstance(rec, dict):
            raise DataFormatError(f"{where}: expected a JSON object")
        keys = set(rec)
        # decide on the leading field, so that a missing second field is reported by the reader
        if "instruction" in keys:
            return "alpaca"
        if "query" in keys:
            return "metamath"
        if "question" in keys:
            return "gsm8k" if "####" in str(rec.get("answer", "####")) else "math"
        if "text" in keys:
            return "text"
        raise DataFormatError(
            f"{where}: cannot tell the format from fields {sorted(keys)}; expected one of "
            "instruction/output (alpaca), question/answer (gsm8k, math), query/response "
            "(metamath), text"
        )
    raise DataFormatError(f"{path} holds no records")


def read_examples(path: str | Path, format: str = "auto") -> list[Example]:
    """Read any instruction format into :class:`Example` records (``format='auto'`` detects it)."""
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "text":
        raise DataFormatError(f"{path} holds plain text records; this needs instruction data "
                              "(alpaca, gsm8k, metamath or math)")
    if fmt not in _READERS:
        raise ValueError(f"unknown data format {fmt!r}; choose auto or one of {', '.join(_READERS)}")
    examples = _READERS[fmt](path)
    if not examples:
        raise DataFormatError(f"{path} holds no records")
    return examples


def read_training(path: str | Path, format: str = "auto") -> list[Example] | list[str]:
    """Training data: instruction examples, or the texts of a plain-text JSONL (``{"text": ...}``),
    which the trainers cut into windows where every token is a target."""
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "text":
        texts = [t for t in read_text(path) if t.strip()]
        if not texts:
            raise DataFormatError(f"{path} holds no text")
        return texts
    return read_examples(path, fmt)


def _final_answer(text: str) -> str | None:
    """The gold answer stated by a reference solution, if it states one."""
    if "The answer is:" in text:
        return text.rsplit("The answer is:", 1)[1].strip()
    m = _HASHES.search(text)
    return m.group(1).strip() if m else None
