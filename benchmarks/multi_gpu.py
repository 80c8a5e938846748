"""ELM training on 1 process vs 2 (DDP and FSDP2 through accelerate), same global batch and seed,
and resume after killing a 2-process run.

    python benchmarks/multi_gpu.py --out benchmarks/results/multi_gpu        # 2 GPUs
    python benchmarks/multi_gpu.py --cpu --shape tiny --steps 6 --out DIR     # 2 CPU processes (gloo)

Runs, each into WORK/<name> (--work, default runs/multi_gpu):
  single     one process
  ddp        2 processes, DDP   (accelerate launch --config_file configs/accelerate/ddp.yaml;
             torchrun on a CPU)
  fsdp       2 processes, FSDP2 (configs/accelerate/fsdp.yaml; GPU only: accelerate has no FSDP on a CPU)
  ddp_kill   the ddp run killed right after its checkpoint at --kill-at, then started again: it
             resumes, and its final block is compared with ddp's
Writes OUT/results.json (loss per step, tokens/s, the 2-vs-1 speed-up, curve differences, the
resume check) and OUT/loss_curves.png. The model is random-initialised from a config (the same on
every rank: seeded), the data the testbed's problems with the byte tokenizer; the ELM replaces M
middle layers. ``train`` is the per-process entry the launcher starts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # hidden, layers, heads, kv heads, intermediate
    "tiny": (64, 6, 4, 2, 128),
    "bench": (1024, 16, 16, 4, 2816),
}


def build(shape: str, seed: int):
    """(dense model, tokenizer, training examples), identical on every rank."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from elmkit.data.tokenizer import byte_tokenizer
    from elmkit.testbed.pretrain import PRESETS
    from elmkit.testbed.problems import make_split

    hidden, layers, heads, kv, inter = SHAPES[shape]
    tok = byte_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    dense = Qwen2ForCausalLM(cfg)
    data = make_split("train", 4000, PRESETS["base"].problems, seed)
    return dense, tok, data


def train(args) -> None:
    """One process of a run (started by the driver, directly or through a launcher)."""
    from elmkit.methods import elm as elm_method
    from elmkit.train import dist
    from elmkit.train.elm import ElmTrainConfig, SpanTeacher, train_elm

    if args.deterministic:  # cuDNN / flash attention backward are not: the math kernel is
        torch.use_deterministic_algorithms(True, warn_only=True)
        for backend in ("flash", "mem_efficient", "cudnn"):
            getattr(torch.backends.cuda, f"enable_{backend}_sdp")(False)
    d = dist.current()
    device = d.device or torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dense, tok, data = build(args.shape, args.seed)
    dense.to(device)
    n = dense.config.num_hidden_layers
    span = max(2, n // 4)
    start = (n - span) // 2
    teacher = SpanTeacher(dense, start, span)
    elm = elm_method.apply_(dense, elm_method.plan(dense, start=start, span=span, max_iter=4))
    cfg = ElmTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-3, seed=args.seed,
                         save_every=args.save_every, precision="fp32" if args.cpu else "auto",
                         ce_schedule="constant")

    def on_step(step: int, loss: float) -> None:
        if step == args.kill_at:  # a hard kill of every rank right after that step's checkpoint
            os._exit(3)

    train_elm(elm, teacher, tok, data, args.out, cfg, progress=d.main, on_step=on_step)


def launch(kind: str, out: Path, args, kill_at: int = 0) -> int:
    """Start one run; returns its exit code."""
    entry = [str(Path(__file__).resolve()), "train", "--out", str(out), "--shape", args.shape,
             "--steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--save-every", str(args.save_every), "--seed", str(args.seed), "--kill-at", str(kill_at)]
    entry += ["--cpu"] if args.cpu else []
    entry += ["--deterministic"] if args.deterministic else []
    if kind == "single":
        cmd = [sys.executable, *entry]
    elif args.cpu:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(29500 + os.getpid() % 1000), *entry]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / f"{kind}.yaml"), "--num_processes", "2", *entry]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "OMP_NUM_THREADS": "1"}
    print(f"== {out.name}: {' '.join(cmd[:6])} ...", flush=True)
    t0 = time.time()
    rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
    print(f"== {out.name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
    return rc


def block_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The trained block's tensors of a saved ELM."""
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    start = read_json(folder / "config.json")["start"]  # the block sits at its start layer
    return {k: v for k, v in sd.items() if k.startswith(f"model.layers.{start}.")}


def read_json(p: Path):
    import json

    return json.loads(p.read_text())


def driver(args) -> None:
    out, runs = Path(args.out), Path(args.work)
    kinds = ["single", "ddp"] + ([] if args.cpu else ["fsdp"])
    res: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu
                 else "cpu", "torch": torch.__version__, "shape": dict(zip(
                     ("hidden", "layers", "heads", "kv_heads", "intermediate"), SHAPES[args.shape])),
                 "steps": args.steps, "global_batch": args.batch_size, "seed": args.seed,
                 "deterministic": args.deterministic, "runs": {}}
    for kind in list(kinds):
        if not (runs / kind / "metrics.json").is_file() and launch(kind, runs / kind, args):
            if kind != "fsdp":
                raise SystemExit(f"the {kind} run failed")
            res["fsdp_error"] = "the FSDP run failed; its log is above"  # the rest is still reported
            kinds.remove(kind)
            continue
        m, h = read_json(runs / kind / "metrics.json"), read_json(runs / kind / "history.json")
        res["runs"][kind] = {"processes": m["processes"], "parallel": m["parallel"],
                             "tokens_per_s": m["tokens_per_s"], "train_time_s": m["train_time_s"],
                             "loss": [r["loss"] for r in h], "distill": [r["distill"] for r in h],
                             "ce": [r["ce"] for r in h]}

    # resume: killed after the checkpoint at kill_at, then the same command again
    kill = runs / "ddp_kill"
    if not (kill / "metrics.json").is_file():
        rc = launch("ddp", kill, args, kill_at=args.kill_at)
        if rc == 0:
            raise SystemExit("the run meant to be killed finished")
        if launch("ddp", kill, args):
            raise SystemExit("the resumed run failed")
    a, b = block_tensors(runs / "ddp" / "model"), block_tensors(kill / "model")
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    same_history = read_json(kill / "history.json") == read_json(runs / "ddp" / "history.json")
    res["resume"] = {"killed_at_step": args.kill_at, "block_tensors": len(a),
                     "bitwise_equal": all(torch.equal(a[k], b[k]) for k in a), "max_abs_diff": diff,
                     "history_equal": same_history}
    report(res, out)


def report(res: dict, out: Path) -> None:
    """The 2-vs-1 figures, results.json and loss_curves.png from the runs' curves."""
    from elmkit.io import save_figure, write_json

    kinds = list(res["runs"])
    one = res["runs"]["single"]
    for kind in kinds[1:]:
        r = res["runs"][kind]
        rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["loss"], one["loss"])]
        r["max_rel_loss_diff_vs_single"] = max(rel)
        r["max_rel_loss_diff_first_10_steps"] = max(rel[:10])
        r["mean_rel_loss_diff_vs_single"] = sum(rel) / len(rel)
        r["speedup_vs_single"] = r["tokens_per_s"] / one["tokens_per_s"]
    write_json(out / "results.json", res)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    steps = range(1, res["steps"] + 1)
    for kind, style in zip(kinds, ("-", "--", ":")):
        r = res["runs"][kind]
        label = f"{kind} ({r['processes']} proc., {r['tokens_per_s']:,.0f} tok/s)"
        axes[0].plot(steps, r["loss"], style, label=label)
        if kind != "single":
            axes[1].plot(steps, [x - y for x, y in zip(r["loss"], one["loss"])], style, label=kind)
    axes[0].set(xlabel="step", ylabel="SJFB loss (global batch)", yscale="log",
                title=f"ELM training, global batch {res['global_batch']}")
    axes[1].set(xlabel="step", ylabel="loss - single-process loss", title="difference to 1 process")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, out / "loss_curves.png")
    print({k: v for k, v in res.items() if k != "runs"})
    for kind in kinds:
        r = res["runs"][kind]
        print(kind, {k: v for k, v in r.items() if k not in ("loss", "distill", "ce")})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="driver", choices=("driver", "train"))
    ap.add_argument("--out", default="benchmarks/results/multi_gpu", help="results.json, loss_curves.png")
    ap.add_argument("--work", default="runs/multi_gpu", help="the runs' folders (models, checkpoints)")
    ap.add_argument("--shape", default="bench", choices=tuple(SHAPES))
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=32, help="global batch (examples per step)")
    ap.add_argument("--save-every", type=int, default=20)
    ap.add_argument("--kill-at", type=int, default=40, help="step after which ddp_kill is killed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu", action="store_true", help="2 CPU processes (gloo) instead of 2 GPUs")
    ap.add_argument("--deterministic", action="store_true",
                    help="deterministic algorithms and the math attention kernel (bitwise resume on a GPU)")
    ap.add_argument("--report-only", action="store_true", help="figures and plot from OUT/results.json")
    args = ap.parse_args()
    if args.mode == "driver" and (args.kill_at % args.save_every or not 0 < args.kill_at < args.steps):
        ap.error("--kill-at must be a multiple of --save-every inside (0, --steps)")
    sys.path.insert(0, str(ROOT / "src"))
    if args.mode == "train":
        train(args)
    elif args.report_only:
        report(read_json(Path(args.out) / "results.json"), Path(args.out))
    else:
        driver(args)


if __name__ == "__main__":
    main()
