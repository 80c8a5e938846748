import os
from pathlib import Path

import pytest
import torch

# Without a GPU, elmkit's Triton kernels run in Triton's interpreter. Triton reads the switch when a
# kernel is defined, its own library's too, so before anything imports triton (elmkit does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from elmkit.data import byte_tokenizer  # noqa: E402
from elmkit.models.tiny import tiny_model  # noqa: E402

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]


def shared_data_dir() -> Path | None:
    """The real benchmark files, when this checkout sits beside them (../shared/data)."""
    env = os.environ.get("ELMKIT_SHARED_DATA")
    cand = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return cand if cand.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("../shared/data is not present")
    return d


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def make_model():
    def make(family="qwen2", seed=0, **kw):
        kw.setdefault("num_layers", 6)
        kw.setdefault("hidden_size", 32)
        return tiny_model(family, seed=seed, **kw)

    return make


@pytest.fixture
def tiny_dir(tmp_path, tokenizer):
    """A saved tiny Qwen2 model folder with the byte tokenizer."""
    d = tmp_path / "tiny"
    torch.manual_seed(0)
    tiny_model("qwen2", num_layers=4, hidden_size=32).save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA; without it they are skipped with a reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
