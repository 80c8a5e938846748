"""Run folders and atomic file writes.

Every command writes a self-describing folder: ``config.json`` (what was asked), ``metrics.json``
(what was measured) and its outputs. Files are written to a temporary name and renamed, so an
interrupted run never leaves a half-written JSON behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from . import __version__


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # 0-d tensors / numpy scalars
        return obj.item()
    return obj


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> Path:
    """Move a fully written folder into place, replacing any previous one."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp_dir, final_dir)
    return final_dir


def save_figure(fig, png: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt

    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    # a name of its own: processes saving the same figure at once must not take each other's file
    fd, tmp = tempfile.mkstemp(dir=png.parent, prefix=f".{png.name}.", suffix=".tmp.png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, png)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return png


def environment() -> dict[str, Any]:
    """Versions that a metric depends on; stored with every metrics.json."""
    import torch
    import transformers

    env = {
        "elmkit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    return env


class RunDir:
    """An output folder with config.json / metrics.json written atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()

    def write_config(self, command: str, **config: Any) -> None:
        write_json(self.path / "config.json", {"command": command, **config})

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        metrics = {**metrics, "wall_time_s": round(time.time() - self.t0, 3), "env": environment()}
        write_json(self.path / "metrics.json", metrics)

    def __truediv__(self, name: str) -> Path:
        return self.path / name


def path_identity(path) -> object:
    """A file or folder as (name, size, mtime) of its files, so that edits and rebuilds change a
    fingerprint made from it; a string that is no local path (a hub id, testbed:tiny) as itself."""
    if path is None:
        return None
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
    return [str(path)] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
