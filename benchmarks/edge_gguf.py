"""The edge pay-off on a CPU: elmkit's GGUF exports run in llama.cpp (llama-cpp-python), checked
against transformers, and timed beside an ELM of the same size in elmkit's own decoder.

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \\
        -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF" pip install llama-cpp-python==0.3.36
    python benchmarks/edge_gguf.py --data ../shared/data --out benchmarks/results/edge_gguf

(A native build may target instructions the CPU advertises but the machine does not grant: it
dies with "Illegal instruction". The flags above build for AVX2.)

Stages, each resumable (a unit whose JSON exists with the same settings is not run again):

- ``build``: SmolLM2-135M-Instruct (``elmkit fetch smollm2-135m``) compressed without healing by
  ShortGPT (depth: 8 and 15 of 30 layers, 27% and 50% of the non-embedding parameters) and
  LLM-Pruner (width: the same fractions), calibrated on 32 C4 windows of 256 tokens; and the ELM
  of the same stored size (its block replaces 9 or 16 layers: 22 or 15 stored, as ShortGPT leaves),
  untrained: its speed does not depend on its weights at a fixed number of evaluations.
- ``export``: every stock and slim model to GGUF at f32, f16, q8_0 and q4_1.
- ``verify``: dense, ShortGPT-8 and LLM-Pruner-27% in llama.cpp against transformers (fp32): the
  logits of 8 fixed prompts, greedy continuations of 32 tokens, tokenization, and WikiText-2
  perplexity over its first 16 windows of 512 tokens (the same token ids in both runtimes). f16 is
  held to "within f16 rounding": its largest logit difference no larger than transformers' own when
  it runs the model in float16.
- ``speed``: file size, peak resident memory, prompt and decode tokens/s (prompt of 128 tokens, 128
  generated, greedy, 2 threads): 3 rounds, each running every configuration once in a fresh process
  (its peak memory is its own), one warm-up and 5 timed repeats there; mean +- std over the 15.
  llama.cpp at q8_0 and q4_1 for dense, depth- and width-pruned models and f32 for dense; elmkit's
  fast decoder (fp32, the only way an ELM runs) for dense, ShortGPT and the ELMs.
- ``report``: results.json, report.md and edge_speed.png, and the CPU section of BENCHMARKS.md.

The work folder (``--run``) holds the models and GGUF files (about 2 GB); nothing there is committed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, stdev

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from elmkit.io import atomic_write_text, read_json, save_figure, write_json  # noqa: E402

MODEL = "smollm2-135m"
LAYERS = 30
REMOVE = {"25": 8, "50": 15}  # tag -> layers ShortGPT removes (of 30); width methods the same fraction
CALIB = {"samples": 32, "seq_len": 256, "seed": 0}
TYPES = ("f32", "f16", "q8_0", "q4_1")
VERIFY_MODELS = ("dense", "shortgpt-25", "llm-pruner-25")
# (label, file type, KV cache type): llama.cpp keeps its KV cache in f16 unless told; the first row
# asks for f32 there too, so that it checks the export alone
VERIFY_TYPES = (("f32, KV f32", "f32", "f32"), ("f32", "f32", "f16"), ("f16", "f16", "f16"),
                ("q8_0", "q8_0", "f16"), ("q4_1", "q4_1", "f16"))
# llama.cpp's configurations: q8_0 and q4_1 for every model, and the dense f32 file, so that the gap
# to elmkit's fp32 decoder can be read at the same precision too
SPEED_GGUF = (("dense", "f32"), *((n, t) for n in ("dense", "shortgpt-25", "shortgpt-50", "llm-pruner-25",
                                                   "llm-pruner-50") for t in ("q8_0", "q4_1")))
SPEED_ELMKIT = ("dense", "shortgpt-25", "elm-25", "shortgpt-50", "elm-50")
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Question: What is 12 times 7?\nAnswer:",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nName three primary colours.<|im_end|>\n<|im_start|>assistant\n",
    "The mitochondria is the powerhouse of the cell because",
    "In 1969, Neil Armstrong",
    "<|im_start|>user\nTranslate 'good morning' into German.<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY_TOKENS = 32
PPL_WINDOW, PPL_WINDOWS = 512, 16
PROMPT_LEN, DECODE_LEN, REPEATS, THREADS, ROUNDS = 128, 128, 5, 2, 3


def settings(stage: str) -> dict:
    """What a unit of ``stage`` (verify or speed) depends on; one saved with other settings is
    measured again."""
    common = {"model": MODEL, "remove": REMOVE, "calib": CALIB}
    if stage == "verify":
        s = {**common, "prompts": PROMPTS, "greedy": GREEDY_TOKENS, "ppl": [PPL_WINDOW, PPL_WINDOWS],
             "types": VERIFY_TYPES}
    else:
        s = {**common, "speed": [PROMPT_LEN, DECODE_LEN, REPEATS, THREADS, ROUNDS], "warmup": 1,
             "gguf": [[n, t] for n, t in SPEED_GGUF]}
    return json.loads(json.dumps(s))  # as read back from a unit's JSON (tuples are lists there)


# ---------------------------------------------------------------------------------------------
# build and export
# ---------------------------------------------------------------------------------------------


def build(run: Path, data: Path) -> dict:
    """The compressed models under run/models/<name>/model; returns name -> what it is."""
    import torch

    from elmkit.compare import compress_method
    from elmkit.data.calibration import CalibConfig
    from elmkit.methods import elm as elm_method
    from elmkit.methods import llm_pruner
    from elmkit.methods.common import non_embedding_parameters
    from elmkit.methods.shortgpt import ShortGPTConfig
    from elmkit.models import count_parameters, load_model, load_tokenizer
    from elmkit.models.sources import named_dir

    dense_dir = named_dir(MODEL)
    if not (dense_dir / "config.json").is_file():
        raise SystemExit(f"{MODEL} has not been fetched: run elmkit fetch {MODEL}")
    c4 = data / "calibration" / "redpajama_c4_sample1.jsonl"
    if not c4.is_file():
        raise SystemExit(f"{c4} is missing: --data must hold calibration/redpajama_c4_sample1.jsonl")
    calib = CalibConfig(source=str(c4), **CALIB)
    dense = load_model(dense_dir, dtype="float32", device="cpu")
    e0 = non_embedding_parameters(dense)
    models = {"dense": {"path": str(dense_dir), "kind": "dense", "layers": LAYERS, "removed": 0.0,
                        "params": count_parameters(dense)}}
    for tag, k in REMOVE.items():
        jobs = {f"shortgpt-{tag}": ("shortgpt", ShortGPTConfig(n_remove=k)),
                f"llm-pruner-{tag}": ("llm-pruner", llm_pruner.for_target(llm_pruner.LLMPrunerConfig(), dense,
                                                                          k / LAYERS))}
        for name, (method, cfg) in jobs.items():
            out = run / "models" / name
            if not (out / "metrics.json").is_file():
                print(f"== build {name}", flush=True)
                compress_method(dense_dir, c4, out, method, cfg, calib)
            m = read_json(out / "metrics.json")
            models[name] = {"path": str(out / "model"), "kind": "depth" if method == "shortgpt" else "width",
                            "layers": m["layers_after"], "removed": m["removed_non_embedding"],
                            "params": m["params_after"]}
        name, out = f"elm-{tag}", run / "models" / f"elm-{tag}"
        if not (out / "model" / "config.json").is_file():
            print(f"== build {name}", flush=True)
            torch.manual_seed(0)
            # the block replaces k + 1 layers (elmkit's default start, the middle): as many stored
            # layers as ShortGPT leaves; evaluated k + 1 times per token, the paper's M
            plan = elm_method.plan(dense, span=k + 1, max_iter=k + 1, tol=0.0)
            elm = elm_method.apply_(load_model(dense_dir, dtype="float32", device="cpu"), plan)
            elm.save_pretrained(out / "model")
            load_tokenizer(dense_dir).save_pretrained(out / "model")
        elm = load_model(out / "model", dtype="float32", device="cpu")
        models[name] = {"path": str(out / "model"), "kind": "elm", "layers": LAYERS - k,
                        "removed": 1 - non_embedding_parameters(elm) / e0, "params": count_parameters(elm),
                        "evaluations": elm.config.max_iter, "tol": elm.config.tol}
    return models


def export_all(run: Path, models: dict) -> dict:
    """Every stock and slim model at every type: name -> type -> file."""
    from elmkit.export import ExportConfig, export

    files = {}
    for name, m in models.items():
        if m["kind"] == "elm":
            continue
        for t in TYPES:
            out = run / "gguf" / f"{name}.{t}.gguf"
            if not out.is_file():
                print(f"== export {name} {t}", flush=True)
                export(m["path"], out, ExportConfig(type=t), progress=False)
            files.setdefault(name, {})[t] = str(out)
    return files


# ---------------------------------------------------------------------------------------------
# verify: llama.cpp against transformers
# ---------------------------------------------------------------------------------------------


def wikitext_ids(tok, data: Path) -> list[int]:
    from elmkit.eval.perplexity import read_wikitext2

    text = read_wikitext2(data / "wikitext2" / "wiki.test.raw")
    ids = tok(text[:200_000], add_special_tokens=False)["input_ids"]
    if len(ids) < PPL_WINDOW * PPL_WINDOWS:
        raise SystemExit("the WikiText-2 slice is shorter than the windows asked for")
    return ids[:PPL_WINDOW * PPL_WINDOWS]


def nll_sum(logits, ids) -> float:
    """Summed -log p(ids[t+1] | ids[:t+1]) over one window: logits (T, V) as float64."""
    import torch

    lp = torch.as_tensor(logits, dtype=torch.float64).log_softmax(-1)[:-1]
    return -lp.gather(1, torch.as_tensor(ids[1:])[:, None]).sum().item()


def hf_reference(path: str, prompts: list[list[int]], wiki: list[int], dtype: str = "float32") -> dict:
    """transformers' logits of each prompt, its greedy continuation, and the WikiText-2 perplexity."""
    import torch

    from elmkit.models import load_model

    model = load_model(path, dtype=dtype, device="cpu")
    out = {"logits": [], "greedy": [], "nll": 0.0}
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out["logits"].append(model(x).logits[0].float())
            if dtype == "float32":  # greedy, EOS not special: the same loop as llama_run's
                seq = list(ids)
                for _ in range(GREEDY_TOKENS):
                    seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
                out["greedy"].append(seq[len(ids):])
        if dtype == "float32":
            for w in range(PPL_WINDOWS):
                win = wiki[w * PPL_WINDOW:(w + 1) * PPL_WINDOW]
                out["nll"] += nll_sum(model(torch.tensor([win])).logits[0], win)
    return out


def llama_run(gguf_path: str, prompts: list[list[int]], texts: list[str], wiki: list[int],
              kv: str = "f16") -> dict:
    """The same in llama.cpp, on the same token ids (and its own tokenization of the texts); ``kv``:
    the KV cache's type."""
    import llama_cpp
    import numpy as np
    import torch

    kv_type = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}[kv]
    llm = llama_cpp.Llama(gguf_path, n_ctx=PPL_WINDOW, n_batch=PPL_WINDOW, logits_all=True,
                          n_threads=THREADS, n_threads_batch=THREADS, type_k=kv_type, type_v=kv_type,
                          verbose=False)
    out = {"logits": [], "greedy": [], "nll": 0.0, "tokens": []}
    for ids, text in zip(prompts, texts):
        out["tokens"].append(llm.tokenize(text.encode(), add_bos=False, special=True))
        llm.reset()
        llm.eval(ids)
        out["logits"].append(torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32)))
        seq = []
        for _ in range(GREEDY_TOKENS):  # greedy: argmax of the last position, fed back
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            seq.append(nxt)
            llm.eval([nxt])
        out["greedy"].append(seq)
    for w in range(PPL_WINDOWS):
        win = wiki[w * PPL_WINDOW:(w + 1) * PPL_WINDOW]
        llm.reset()
        llm.eval(win)
        out["nll"] += nll_sum(np.array(llm.scores[:len(win)]), win)
    llm.close()
    return out


def verify(run: Path, data: Path, models: dict, files: dict, folder: Path) -> None:
    """One unit per model: every type against transformers fp32, and transformers' own float16."""
    from elmkit.models import load_tokenizer

    for name in VERIFY_MODELS:
        path = folder / f"verify_{name}.json"
        if path.is_file() and read_json(path).get("settings") == settings("verify"):
            continue
        print(f"== verify {name}", flush=True)
        t0 = time.time()
        tok = load_tokenizer(models[name]["path"])
        prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        wiki = wikitext_ids(tok, data)
        ref = hf_reference(models[name]["path"], prompts, wiki)
        half = hf_reference(models[name]["path"], prompts, wiki, dtype="float16")
        n_scored = PPL_WINDOWS * (PPL_WINDOW - 1)
        unit = {"settings": settings("verify"), "model": name, "hf_ppl": math.exp(ref["nll"] / n_scored),
                "hf_f16_max_logit_diff": max((a - b).abs().max().item()
                                             for a, b in zip(half["logits"], ref["logits"])),
                "types": {}}
        for label, t, kv in VERIFY_TYPES:
            got = llama_run(files[name][t], prompts, PROMPTS, wiki, kv)
            diffs = [(a - b).abs() for a, b in zip(got["logits"], ref["logits"])]
            top1 = [(a.argmax(-1) == b.argmax(-1)).float().mean().item()
                    for a, b in zip(got["logits"], ref["logits"])]
            prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), GREEDY_TOKENS)
                      for a, b in zip(got["greedy"], ref["greedy"])]
            ppl = math.exp(got["nll"] / n_scored)
            unit["types"][label] = {
                "type": t, "kv_cache": kv, "max_logit_diff": max(d.max().item() for d in diffs),
                "mean_logit_diff": sum(d.mean().item() for d in diffs) / len(diffs),
                "top1_agreement": sum(top1) / len(top1),
                "greedy_identical": sum(p == GREEDY_TOKENS for p in prefix), "greedy_prefix": prefix,
                "tokenization_identical": sum(a == b for a, b in zip(got["tokens"], prompts)),
                "ppl": ppl, "ppl_rel_diff": ppl / unit["hf_ppl"] - 1,
                "bytes": os.path.getsize(files[name][t])}
            r = unit["types"][label]
            print(f"  {label}: max |dlogit| {r['max_logit_diff']:.4f}, "
                  f"greedy {r['greedy_identical']}/{len(PROMPTS)}, ppl {ppl:.3f} vs {unit['hf_ppl']:.3f} "
                  f"({100 * r['ppl_rel_diff']:+.2f}%)", flush=True)
        unit["seconds"] = round(time.time() - t0, 1)
        write_json(path, unit)


# ---------------------------------------------------------------------------------------------
# speed: one fresh process per unit
# ---------------------------------------------------------------------------------------------


def speed(run: Path, data: Path, models: dict, files: dict, folder: Path) -> None:
    """ROUNDS rounds over every configuration, each run in a fresh process; a configuration's numbers
    pool its rounds (between-process drift on a shared CPU is larger than the spread within one).
    Interleaved, so that a slow spell of the machine does not land on one configuration; resumable
    round by round."""
    from elmkit.models import load_tokenizer

    tok = load_tokenizer(models["dense"]["path"])
    prompt = wikitext_ids(tok, data)[:PROMPT_LEN]
    units = [("baseline-llama.cpp", "-", "-", ""), ("baseline-elmkit", "-", "-", "")]
    units += [("llama.cpp", n, t, files[n][t]) for n, t in SPEED_GGUF]
    units += [("elmkit", n, "f32", models[n]["path"]) for n in SPEED_ELMKIT]
    for rnd in range(ROUNDS):
        for runtime, name, t, path in units:
            out = folder / f"speed_{runtime}_{name}_{t}.json".replace("_-_-", "")
            info = models.get(name, {})  # what was timed: a model rebuilt differently is timed again
            unit = read_json(out) if out.is_file() else {}
            if unit.get("settings") != settings("speed") or unit.get("model_info", {}) != info:
                size = (os.path.getsize(path) if runtime == "llama.cpp" else
                        sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) if path else 0)
                unit = {"settings": settings("speed"), "runtime": runtime, "model": name, "type": t,
                        "bytes": size, "model_info": info, "rounds": []}
            if len(unit["rounds"]) > rnd:
                continue
            print(f"== speed round {rnd + 1}/{ROUNDS}: {runtime} {name} {t}", flush=True)
            cmd = [sys.executable, str(ROOT / "benchmarks" / "edge_child.py"), runtime, path,
                   ",".join(map(str, prompt)), str(DECODE_LEN), str(REPEATS), str(THREADS)]
            env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode:
                raise SystemExit(f"speed unit {runtime} {name} {t} failed:\n{res.stderr[-2000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])  # the child's one JSON line
            unit["rounds"].append(r)
            write_json(out, unit)
            if "decode_tokens_per_s" in r:
                print(f"  decode {mean(r['decode_tokens_per_s']):.1f} tokens/s, prefill "
                      f"{mean(r['prefill_tokens_per_s']):.0f}, peak {r['peak_rss_mb']:.0f} MB", flush=True)


def pooled(unit: dict, key: str) -> list[float]:
    """Every repeat of every round of a speed unit."""
    return [x for r in unit["rounds"] for x in r[key]]


def peak(unit: dict) -> float:
    """The largest peak resident memory of the unit's rounds, MB."""
    return max(r["peak_rss_mb"] for r in unit["rounds"])


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import llama_cpp
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": THREADS, "python": platform.python_version(),
            "torch": torch.__version__, "llama_cpp_python": llama_cpp.__version__}


def report(folder: Path, models: dict) -> str:
    """results.json, report.md and edge_speed.png from the saved units; returns the Markdown body."""
    verify_units = [read_json(folder / f"verify_{n}.json") for n in VERIFY_MODELS
                    if (folder / f"verify_{n}.json").is_file()]
    speed_units = {(u["runtime"], u["model"], u["type"]): u
                   for u in map(read_json, sorted(folder.glob("speed_*.json"))) if u.get("rounds")}
    env = read_json(folder / "machine.json")
    write_json(folder / "results.json", {"settings": {s: settings(s) for s in ("verify", "speed")},
                                         "machine": env, "models": models, "verify": verify_units,
                                         "speed": list(speed_units.values())})
    lines = [f"Machine: {env['cpu']}, {env['cores']} cores, {env['threads']} threads used; "
             f"llama-cpp-python {env['llama_cpp_python']} (llama.cpp built for AVX2), torch {env['torch']}, "
             f"Python {env['python']}.",
             "", "Command: `python benchmarks/edge_gguf.py --data ../shared/data --out "
             "benchmarks/results/edge_gguf` (stages build, export, verify, speed, report; each "
             "resumable).", ""]
    lines += ["### llama.cpp runs what `elmkit export` writes", "",
              f"transformers (fp32) against llama.cpp on the same token ids: {len(PROMPTS)} fixed prompts "
              f"(every position's logits; greedy continuations of {GREEDY_TOKENS} tokens) and WikiText-2 "
              f"perplexity over its first {PPL_WINDOWS} windows of {PPL_WINDOW} tokens. Tokenization: "
              "llama.cpp's own tokenizer, from the file, against transformers' on the prompt texts. "
              "f16 rounding: transformers itself running the model in float16 moves the logits by the "
              "amount in the last column; llama.cpp's f16 file is held to that. llama.cpp keeps its KV cache "
              "in f16 unless told otherwise, and every row but \"f32, KV f32\" runs so; that row, f32 "
              "throughout, checks the export alone. Greedy: the argmax fed back, 32 times, end-of-text not "
              "special, in both runtimes. The source folder holds SmolLM2's published Q4_1 weights, "
              "dequantized (`elmkit fetch`): at q4_1 the dense and ShortGPT files hold those very blocks "
              "again (lossless; tests/test_export.py checks it byte for byte), so their q4_1 rows measure "
              "llama.cpp's arithmetic alone, while LLM-Pruner's removed channels shift the 32-weight blocks "
              "and its q4_1 file pays a second 4-bit rounding.", "",
              "| model | type | file MB | max abs logit diff | top-1 agree | greedy identical "
              "| tokens identical | ppl llama.cpp | ppl transformers | ppl diff | within f16 rounding |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for u in verify_units:
        for t, r in u["types"].items():
            within = (("yes" if r["max_logit_diff"] <= u["hf_f16_max_logit_diff"] else "**no**")
                      + f" ({u['hf_f16_max_logit_diff']:.3f})") if t == "f16" else ""
            lines.append(f"| {u['model']} | {t} | {r['bytes'] / 1e6:.1f} | {r['max_logit_diff']:.4f} | "
                         f"{100 * r['top1_agreement']:.1f}% | {r['greedy_identical']}/{len(PROMPTS)} | "
                         f"{r['tokenization_identical']}/{len(PROMPTS)} | {r['ppl']:.3f} | "
                         f"{u['hf_ppl']:.3f} | {100 * r['ppl_rel_diff']:+.2f}% | {within} |")
    base = {rt: peak(speed_units[(f"baseline-{rt}", "-", "-")]) if (f"baseline-{rt}", "-", "-") in speed_units
            else 0.0 for rt in ("llama.cpp", "elmkit")}
    lines += ["", "### Speed and memory on this CPU", "",
              f"Prompt of {PROMPT_LEN} WikiText-2 tokens, then {DECODE_LEN} tokens decoded greedily, "
              f"{THREADS} threads; mean +- std over {ROUNDS} rounds x {REPEATS} repeats (after one warm-up "
              "in each process): each round runs "
              "every configuration once, interleaved, each in a fresh process (the drift between "
              "processes on this shared CPU is larger than the spread within one). Peak RSS: the largest "
              "VmHWM of a configuration's processes; \"model\" subtracts the runtime's own "
              f"(a process that only imports it: llama.cpp {base['llama.cpp']:.0f} MB, elmkit + torch "
              f"{base['elmkit']:.0f} MB). Removed: share of the non-embedding parameters. Compressed "
              "models are not healed: this table is about size and speed; what each keeps is RESULTS.md's "
              "subject. The ELM decodes with its block evaluated at every one of its M iterations (no "
              "early stop), in elmkit's fp32 decoder (no llama.cpp graph computes its loop). x dense: "
              "decode speed against the dense model in the same runtime and type.", "",
              "| runtime | model | kind | layers | removed | type | file MB | peak RSS MB (model) "
              "| prefill tokens/s | decode tokens/s | x dense |",
              "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for (rt, name, t), u in speed_units.items():
        if rt.startswith("baseline") or not u.get("rounds"):
            continue
        m = models[name]
        ref = speed_units.get((rt, "dense", t))
        dec, pre = pooled(u, "decode_tokens_per_s"), pooled(u, "prefill_tokens_per_s")
        ratio = mean(dec) / mean(pooled(ref, "decode_tokens_per_s")) if ref else float("nan")
        kind = m["kind"] + (f" ({m['evaluations']} evaluations)" if m["kind"] == "elm" else "")
        lines.append(f"| {rt} | {name} | {kind} | {m['layers']} | {100 * m['removed']:.0f}% | {t} | "
                     f"{u['bytes'] / 1e6:.1f} | {peak(u):.0f} ({peak(u) - base[rt]:.0f}) | "
                     f"{mean(pre):.0f} +- {stdev(pre):.0f} | {mean(dec):.1f} +- {stdev(dec):.1f} | "
                     f"{ratio:.2f} |")
    el = speed_units.get(("elmkit", "dense", "f32"))
    if el:
        base_dec = mean(pooled(el, "decode_tokens_per_s"))
        gaps = [f"{mean(pooled(u, 'decode_tokens_per_s')) / base_dec:.1f}x at {t}"
                for t in ("f32", "q8_0", "q4_1") if (u := speed_units.get(("llama.cpp", "dense", t)))]
        lines += ["", "The dense model decodes faster in llama.cpp than in elmkit's fp32 decoder on this "
                  "CPU: " + ", ".join(gaps) + " (same precision: the f32 file)."]
    lines += ["", "![edge speed](edge_speed.png)"]
    body = "\n".join(lines) + "\n"
    _plot(folder / "edge_speed.png", speed_units, models)
    atomic_write_text(folder / "report.md", "# The edge pay-off: GGUF in llama.cpp on a CPU\n\n" + body)
    return body


def _plot(png: Path, units: dict, models: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k, u) for k, u in units.items() if not k[0].startswith("baseline") and u.get("rounds")]
    if not rows:
        return
    labels = [f"{name}\n{rt} {t}" for (rt, name, t), _ in rows]
    colors = {"dense": "tab:grey", "depth": "tab:blue", "width": "tab:orange", "elm": "tab:green"}
    c = [colors[models[k[1]]["kind"]] for k, _ in rows]
    fig, ax = plt.subplots(1, 2, figsize=(13, 5.5))
    y = range(len(rows))
    ax[0].barh(y, [mean(pooled(u, "decode_tokens_per_s")) for _, u in rows],
               xerr=[stdev(pooled(u, "decode_tokens_per_s")) for _, u in rows], color=c)
    ax[0].set_xlabel("decode tokens/s (mean +- std)")
    ax[1].barh(y, [peak(u) for _, u in rows], color=c)
    ax[1].set_xlabel("peak resident memory, MB")
    for a in ax:
        a.set_yticks(list(y), labels, fontsize=7)
        a.invert_yaxis()
    from matplotlib.patches import Patch
    ax[1].legend(handles=[Patch(color=v, label=k) for k, v in colors.items()], fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct on a CPU: llama.cpp (GGUF) and elmkit's decoder")
    fig.tight_layout()
    save_figure(fig, png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"),
                    help="folder with calibration/redpajama_c4_sample1.jsonl and wikitext2/wiki.test.raw")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "edge_gguf"),
                    help="results folder (committed)")
    ap.add_argument("--run", default=str(ROOT / "runs" / "edge_gguf"),
                    help="work folder: models, GGUF files")
    ap.add_argument("--stages", default="build,export,verify,speed,report",
                    help="stages to run, in order: build, export, verify, speed, report")
    ap.add_argument("--benchmarks-md", default=str(ROOT / "BENCHMARKS.md"),
                    help="the Markdown file whose edge-cpu section the report stage writes")
    args = ap.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - {"build", "export", "verify", "speed", "report"}
    if unknown:
        raise SystemExit(f"unknown --stages {sorted(unknown)}; choose from build, export, verify, speed, "
                         "report")
    out, run, data = Path(args.out), Path(args.run), Path(args.data)
    if stages == ["report"]:  # from the committed JSON alone: no model, no llama.cpp needed
        if not (out / "results.json").is_file():
            raise SystemExit(f"{out / 'results.json'} is missing: run the other stages first")
        models = read_json(out / "results.json")["models"]
    else:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise SystemExit("llama-cpp-python is not installed; build it as this script's docstring "
                             "says") from None
        out.mkdir(parents=True, exist_ok=True)
        models = build(run, data)  # each model is built once; later calls read what is there
        files = export_all(run, models) if {"export", "verify", "speed"} & set(stages) else {}
        if {"verify", "speed"} & set(stages):
            write_json(out / "machine.json", machine())  # where the measurements were taken
        if "verify" in stages:
            verify(run, data, models, files, out)
        if "speed" in stages:
            speed(run, data, models, files, out)
    if "report" in stages:
        body = report(out, models)
        from md_sections import put

        md = Path(args.benchmarks_md)
        text = md.read_text() if md.is_file() else "# Benchmarks\n"
        body = body.replace("](edge_speed.png)", "](benchmarks/results/edge_gguf/edge_speed.png)")
        title = "## The edge pay-off on a CPU: GGUF in llama.cpp\n\n"
        atomic_write_text(md, put(text, "edge-cpu", title + body))
        print(f"wrote {out / 'report.md'} and the edge-cpu section of {md}")


if __name__ == "__main__":
    main()
