"""One timed configuration of benchmarks/edge_gguf.py, run in a process of its own so that its peak
resident memory is its own: a llama.cpp process imports llama_cpp and numpy only (not elmkit, torch
or transformers), an elmkit process what its decoder needs.

    python benchmarks/edge_child.py RUNTIME PATH PROMPT_IDS DECODE_LEN REPEATS THREADS

RUNTIME: llama.cpp (PATH a .gguf file), elmkit (PATH a model folder), or baseline-llama.cpp /
baseline-elmkit (the runtime imported, nothing loaded). Prints one line of JSON.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def speed_child(runtime: str, path: str, prompt: list[int], decode_len: int, repeats: int,
                threads: int) -> dict:
    """Runs in its own process: load, one warm-up, then repeats x (prefill the prompt, decode
    decode_len greedily)."""
    if runtime == "baseline-llama.cpp":
        import llama_cpp  # noqa: F401
        import numpy  # noqa: F401
        return {"peak_rss_mb": peak_rss_mb()}
    if runtime == "baseline-elmkit":
        import torch  # noqa: F401

        from elmkit import infer  # noqa: F401
        from elmkit.models import load_model  # noqa: F401
        return {"peak_rss_mb": peak_rss_mb()}
    prefill, decode = [], []
    if runtime == "llama.cpp":
        import numpy as np
        from llama_cpp import Llama

        t0 = time.perf_counter()
        llm = Llama(path, n_ctx=len(prompt) + decode_len, n_batch=len(prompt), n_threads=threads,
                    n_threads_batch=threads, verbose=False)
        load_s = time.perf_counter() - t0
        n_vocab = llm.n_vocab()

        def last_argmax() -> int:  # the one row of logits the last eval asked for
            return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

        for i in range(repeats + 1):  # the first is a warm-up (page faults, caches), not kept
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            t1 = time.perf_counter()
            for _ in range(decode_len):
                llm.eval([last_argmax()])
            t2 = time.perf_counter()
            if i:
                prefill.append(len(prompt) / (t1 - t0))
                decode.append(decode_len / (t2 - t1))
    else:
        import torch

        from elmkit.infer import DecodeConfig, generate
        from elmkit.models import load_model

        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        model = load_model(path, dtype="float32", device="cpu")
        load_s = time.perf_counter() - t0
        ids = torch.tensor([prompt])
        cfg = DecodeConfig(max_new_tokens=decode_len + 1, stop_at_eos=False)
        for i in range(repeats + 1):  # the first is a warm-up, not kept
            _, st = generate(model, ids, cfg=cfg, cuda_graphs=False)
            if i:
                prefill.append(len(prompt) / st.prefill_s)
                decode.append(st.tokens_per_s)  # decode_len steps after the first token
    return {"load_s": load_s, "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
            "peak_rss_mb": peak_rss_mb()}


if __name__ == "__main__":
    rt, path, ids, n, reps, threads = sys.argv[1:]
    prompt = [int(x) for x in ids.split(",")]
    print(json.dumps(speed_child(rt, path, prompt, int(n), int(reps), int(threads))))
