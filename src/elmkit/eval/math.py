"""Answer extraction and comparison for GSM8K-style and MATH-style outputs.

GSM8K (numbers): the answer is the first number after the last ``The answer is`` (MetaMath/ELM
style), else after the last ``####`` (GSM8K style), else the last number in the text. Commas,
``$``, units and a trailing full stop are ignored; values compare numerically (|a - b| < 1e-6), so
``1,000``, ``$1000.00`` and ``1000`` agree. (ELM's official scorer split the reference on
``The answer is:`` while its GSM8K file ends in ``#### N``, so it never matched; here both styles
are understood.)

MATH (LaTeX): the answer is the content of the last top-level ``\\boxed{...}``/``\\fbox{...}``,
else the text after the last ``The answer is``. Both sides are normalised in the way of the MATH
paper's ``strip_string`` (``\\left``/``\\right``, ``\\dfrac``/``\\tfrac``, ``^\\circ``, ``\\$``,
spaces, ``\\frac12`` -> ``\\frac{1}{2}``, ``a/b`` -> ``\\frac{a}{b}``, text units, ``x =`` prefixes),
then compared as strings, and failing that as numbers when both parse as simple numbers
(integers, decimals, fractions): so ``0.5`` equals ``\\frac12``.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

# ---------------------------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\$?\.\d+")
_ANSWER_IS = re.compile(r"the answer is\s*:?", re.I)


def _to_number(s: str) -> float | None:
    s = s.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return None
    return value if math.isfinite(value) else None  # a runaway "1111..." is just wrong


def extract_gsm8k(text: str) -> str | None:
    """The final numeric answer of a GSM8K-style response, as a canonical string, or None."""
    text = text.replace("\u2212", "-")  # unicode minus
    tail = None
    spans = list(_ANSWER_IS.finditer(text))
    if spans:
        tail = text[spans[-1].end():]
    elif "####" in text:
        tail = text.rsplit("####", 1)[1]
    if tail is not None:
        m = _NUMBER.search(tail)
        nums = [m.group(0)] if m else []
    else:
        nums = _NUMBER.findall(text)
    if not nums:
        return None
    value = _to_number(nums[-1] if tail is None else nums[0])
    if value is None:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def gsm8k_equal(pred: str | None, gold: str) -> bool:
    """Numeric comparison of an extracted prediction with the gold answer."""
    if pred is None:
        return False
    a = _to_number(pred)
    b = _to_number(gold)
    if b is None:  # a gold answer with trailing words ("18 dollars")
        g = extract_gsm8k(gold)
        b = _to_number(g) if g is not None else None
    return a is not None and b is not None and abs(a - b) < 1e-6


def score_gsm8k(response: str, gold: str) -> tuple[str | None, bool]:
    pred = extract_gsm8k(response)
    return pred, gsm8k_equal(pred, gold)


# ---------------------------------------------------------------------------------------------
# MATH
# ---------------------------------------------------------------------------------------------


def last_boxed(text: str) -> str | None:
    """Content of the last top-level ``\\boxed{..}`` / ``\\fbox{..}`` (raw brace counting, as
    in the MATH reference code, so an escaped ``\\}`` inside still closes nothing extra)."""
    found = None
    i = 0
    while True:
        m = re.compile(r"\\(?:boxed|fbox)\s*").search(text, i)
        if m is None:
            return found
        j = m.end()
        if j < len(text) and text[j] == "{":
            depth, k = 0, j
            while k < len(text):
                if text[k] == "{":
                    depth += 1
                elif text[k] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                k += 1
            if depth != 0:  # unclosed: take the rest
                found, i = text[j + 1:], len(text)
                continue
            found, i = text[j + 1:k], k + 1  # skip the inside: keep the outermost box
        else:  # "\boxed 5" form: one token
            tok = re.match(r"[^\s$]+", text[j:])
            if tok:
                found = tok.group(0)
            i = j


def extract_math(text: str) -> str | None:
    """The final answer of a MATH-style response (boxed, else after ``The answer is``)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    spans = list(_ANSWER_IS.finditer(text))
    if spans:
        ans = text[spans[-1].end():].strip()
        ans = ans.split("\n")[0].strip()
        ans = ans[:-1] if ans.endswith(".") else ans
        return ans.strip("$ ") or None
    return None


def _fix_fracs(s: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}, \frac{1}2 -> \frac{1}{2}
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{"):
            # numerator braced; denominator may be a bare char
            depth, k = 0, 0
            for k, ch in enumerate(part):  # noqa: B007  (k is read after the loop)
                depth += (ch == "{") - (ch == "}")
                if depth == 0:
                    break
            num, rest = part[:k + 1], part[k + 1:]
            if rest and rest[0] not in "{\\":
                rest = "{" + rest[0] + "}" + rest[1:]
            out += num + rest
        elif len(part) >= 2 and part[1] != "{":
            out += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
        elif len(part) >= 1:
            out += "{" + part[0] + "}" + part[1:]
    return out


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def _fix_slash(s: str) -> str:
    m = re.fullmatch(r"(-?)(\d+)/(\d+)", s)
    return f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}" if m else s


def normalize_math(s: str) -> str:
    """Canonical string form of a MATH answer (see the module docstring)."""
    s = s.strip().replace("\n", "").replace("\\!", "")
    s = s.replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    # trailing text units: "10\text{ cm}" -> "10"; a lone "\text{odd}" -> "odd"
    s = re.sub(r"(?<=\S)\s*\\(?:text|mbox|mathrm)\{\s*[a-zA-Z ]+\}(\^\d)?\s*$", "", s)
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", s)
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    # "x = 5" / "k=5" -> "5" (a short variable on the left only)
    m = re.fullmatch(r"\s*[a-zA-Z](?:_\w)?\s*=\s*(.+)", s)
    if m:
        s = m.group(1)
    s = s.replace(" ", "")
    s = _fix_sqrt(s)
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    s = _fix_slash(s)
    s = s.rstrip(".")
    return s


def _as_number(s: str) -> Fraction | float | None:
    """Value of a normalised answer when it is a plain number or a simple fraction."""
    neg = s.startswith("-")
    body = s[1:] if neg else s
    m = re.fullmatch(r"\\frac\{(-?)(\d+(?:\.\d+)?)\}\{(\d+(?:\.\d+)?)\}", body)
    try:
        if m:  # \frac{-3}{4} counts as negative too
            den = Fraction(m.group(3))
            val = Fraction(m.group(2)) / den if den else None
            neg = neg != (m.group(1) == "-")
        elif re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", body):
            val = Fraction(body.replace(",", ""))
        elif re.fullmatch(r"\d+(\.\d+)?|\.\d+", body):
            val = Fraction(body)
        else:
            return None
    except (ValueError, ZeroDivisionError):
        return None
    if val is None:
        return None
    return -val if neg else val


def math_equal(pred: str | None, gold: str) -> bool:
    """Equivalence of two MATH answers after normalisation (string, then numeric)."""
    if pred is None:
        return False
    a, b = normalize_math(pred), normalize_math(gold)
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and y is not None and abs(float(x) - float(y)) < 1e-6 * max(1, abs(float(y)))


def score_math(response: str, gold: str) -> tuple[str | None, bool]:
    pred = extract_math(response)
    return pred, math_equal(pred, gold)


SCORERS = {"gsm8k": score_gsm8k, "math": score_math}
