"""Text shipped inside the package (see ``data/assets/NOTICE.md`` for sources and licences).

- ``wikitext2_head()``: the first 180 rows of the WikiText-2 raw test split, normalised as
  ``eval.perplexity.read_wikitext2`` does (about 22k SmolLM2 tokens): evaluation text.
- ``c4_head()``: 400 documents of RedPajama's C4 sample (about 190k SmolLM2 tokens): training and
  calibration text.

They let ``elmkit demo --model <real model>`` run with nothing but the model.
"""

from __future__ import annotations

import gzip
import json
from importlib.resources import files

_ASSETS = files(__package__) / "assets"


def wikitext2_head() -> str:
    return (_ASSETS / "wikitext2_test_head.txt").read_text(encoding="utf-8").removesuffix("\n")


def c4_head() -> list[str]:
    raw = gzip.decompress((_ASSETS / "c4_head.jsonl.gz").read_bytes()).decode("utf-8")
    return [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]


def notice() -> str:
    """Sources and licences of the shipped text."""
    return (_ASSETS / "NOTICE.md").read_text(encoding="utf-8")
