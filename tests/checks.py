"""Checks several test files share: cache consistency, surgery bookkeeping, remote-code loading,
benchmark scripts run as a user runs them."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from elmkit.models import get_layers
from elmkit.models.adapters import cache_kw, output_cache


def prompt_ids(B=1, T=5, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def cached_and_full(model, prompt_len=5, new=6):
    """Greedy-generate, then return (step-by-step cached logits, the same rows of one full
    forward, the cache): (1, new, V), (1, new, V), Cache."""
    seq = model.generate(prompt_ids(1, prompt_len), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    assert seq.shape[1] == prompt_len + new
    full = model(seq).logits  # (1, T, V)
    out = model(seq[:, :prompt_len], use_cache=True)
    steps, past = [out.logits[:, -1]], output_cache(out)
    for t in range(prompt_len, seq.shape[1] - 1):
        out = model(seq[:, t:t + 1], **cache_kw(past), use_cache=True)
        steps.append(out.logits[:, -1])
        past = output_cache(out)
    return torch.stack(steps, dim=1), full[:, prompt_len - 1:-1], past


def assert_cached_equals_full(model, prompt_len=5, new=6):
    """generate() with the cache gives the logits of one full forward, and the cache is whole."""
    cached, full, past = cached_and_full(model, prompt_len, new)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    assert len(past.layers) == model.config.num_hidden_layers
    assert all(past.get_seq_length(i) == prompt_len + new - 1 for i in range(len(past.layers)))


def assert_layers_consistent(model):
    """Config, layer_idx and per-layer config lists agree with the module list."""
    layers = get_layers(model)
    assert model.config.num_hidden_layers == len(layers)
    assert [l.self_attn.layer_idx for l in layers] == list(range(len(layers)))
    types = getattr(model.config, "layer_types", None)
    if types is not None:
        assert len(types) == len(layers)


def assert_loads_with_remote_code_only(folder, ids, want, tmp_path):
    """A fresh process where elmkit cannot be imported loads ``folder`` with trust_remote_code and
    gives exactly the logits ``want`` on ``ids``."""
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(want, tmp_path / "want.pt")
    script = f"""
import sys
sys.modules["elmkit"] = None  # elmkit must not be importable here
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
ids = torch.load({str(tmp_path / 'ids.pt')!r})
with torch.no_grad():
    got = m(ids).logits
want = torch.load({str(tmp_path / 'want.pt')!r})
assert torch.equal(got, want), (got - want).abs().max()
print("ok")
"""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def run_benchmark(script: str, *args: str, timeout: int = 900) -> str:
    """Run ``benchmarks/<script>`` in a fresh process (src and benchmarks importable); returns its
    stdout, or fails the test with the end of its stderr."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root / 'benchmarks'}"}
    r = subprocess.run([sys.executable, str(root / "benchmarks" / script), *args],
                       capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout
