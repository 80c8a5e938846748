"""The versions elmkit runs on: ``python -m elmkit.versions`` prints one ``name==version`` a line.

The drift checks (``make test-latest``, ``make test-oldest``) record it beside pytest's summary, and
a bug report should carry it.
"""

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("torch", "transformers", "tokenizers", "peft", "accelerate", "safetensors", "lm-eval",
            "huggingface-hub", "numpy", "matplotlib")
"""The packages whose behaviour decides ours, in the order they are printed."""


def versions() -> dict[str, str]:
    """``{name: version}`` for Python and every package in ``PACKAGES`` ("absent" if not installed)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


if __name__ == "__main__":
    for name, v in versions().items():
        print(f"{name}=={v}")
