"""Sections of a generated Markdown file that another script owns, kept between markers::

    <!-- real-model:start -->
    ...
    <!-- real-model:end -->

RESULTS.md is rewritten whole by results_table.py; real_model.py owns one marked section of it.
Each writer keeps the sections it does not own.
"""

from __future__ import annotations

import re

_SECTION = re.compile(r"<!-- ([\w-]+):start -->\n.*?<!-- \1:end -->\n?", re.S)


def marked(text: str) -> dict[str, str]:
    """Every marked section of ``text``, markers included, by name."""
    return {m.group(1): m.group(0).rstrip("\n") + "\n" for m in _SECTION.finditer(text)}


def put(text: str, name: str, body: str) -> str:
    """``text`` with section ``name`` holding ``body``: replaced where it is, else appended."""
    block = f"<!-- {name}:start -->\n{body.rstrip()}\n<!-- {name}:end -->\n"
    old = marked(text).get(name)
    if old is not None:
        return text.replace(old, block)
    return text.rstrip("\n") + "\n\n" + block


def keep(new: str, old: str) -> str:
    """``new`` with the marked sections of ``old`` that ``new`` lacks appended."""
    have = marked(new)
    for name, block in marked(old).items():
        if name not in have:
            new = new.rstrip("\n") + "\n\n" + block
    return new
