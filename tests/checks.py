"""Checks several test files share: cache consistency, surgery bookkeeping, remote-code loading,
benchmark scripts run as a user runs them."""

import math
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
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


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def deci_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """llama.cpp's deci graph (src/models/deci.cpp, llama.cpp b8000s) computed from an f32 GGUF file
    alone, as a second implementation to hold the export against: (T, V) logits.

    Per layer: no heads -> the attention is skipped and the layer's input goes on; width 0 -> the
    layer's update is dropped entirely (llama.cpp's ``continue``); RoPE on adjacent pairs; query head
    h reads KV head h // (n_head / n_head_kv). Not modelled: on the last layer, llama.cpp's ``continue``
    also skips the selection of the output rows and aborts (the export never writes such a layer;
    test_llama_cpp_runs_the_deci_file_with_the_source_logits checks it where llama.cpp is installed)."""
    r = gguf.GGUFReader(path)
    def field(key):
        return r.fields[key].contents()

    arch = field("general.architecture")
    # what this reference does not compute must not pass unnoticed
    if any(t.tensor_type != gguf.GGMLQuantizationType.F32 for t in r.tensors):
        raise ValueError("deci_logits reads f32 files only")
    if "rope_freqs.weight" in {t.name for t in r.tensors} or f"{arch}.rope.scaling.type" in r.fields:
        raise ValueError("deci_logits computes plain RoPE only (no frequency factors or scaling)")
    W = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in r.tensors}
    heads, kv_heads, widths = (field(f"{arch}.{k}") for k in
                               ("attention.head_count", "attention.head_count_kv", "feed_forward_length"))
    hd, eps = field(f"{arch}.attention.key_length"), field(f"{arch}.attention.layer_norm_rms_epsilon")
    theta = field(f"{arch}.rope.freq_base")
    T_ = len(ids)
    pos = torch.arange(T_, dtype=torch.float64)[:, None]
    ang = pos * theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (T, hd/2)
    cos, sin = ang.cos().float(), ang.sin().float()

    def rope(x):  # (T, n, hd): pairs (2i, 2i+1) rotated by angle i
        a, b = x[..., 0::2], x[..., 1::2]
        c, s_ = cos[:, None], sin[:, None]
        return torch.stack((a * c - b * s_, a * s_ + b * c), -1).flatten(-2)

    def lin(x, name):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    x = W["token_embd.weight"][ids]  # (T, d)
    mask = torch.full((T_, T_), float("-inf")).triu(1)
    for i, (nq, nkv, nff) in enumerate(zip(heads, kv_heads, widths)):
        b = f"blk.{i}."
        cur = x
        if nq:
            h = rms(x, W[b + "attn_norm.weight"], eps)
            q = rope(lin(h, b + "attn_q").view(T_, nq, hd))
            k = rope(lin(h, b + "attn_k").view(T_, nkv, hd))
            v = lin(h, b + "attn_v").view(T_, nkv, hd)
            k, v = (t.repeat_interleave(nq // nkv, dim=1) for t in (k, v))  # head h -> KV h // group
            att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
            mixed = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(T_, nq * hd)
            cur = lin(mixed, b + "attn_output")
        if nff == 0:
            continue
        ffn_in = cur + x if nq else x
        h = rms(ffn_in, W[b + "ffn_norm.weight"], eps)
        gated = torch.nn.functional.silu(lin(h, b + "ffn_gate")) * lin(h, b + "ffn_up")
        x = lin(gated, b + "ffn_down") + ffn_in
    out = W.get("output.weight", W["token_embd.weight"])
    return rms(x, W["output_norm.weight"], eps) @ out.T
