"""Where a captured decode step spends its time: kernels of 20 graph replays, by total GPU time.

    python benchmarks/profile_decode.py --shape qwen2.5-1.5b --batch 1 --prompt 512 --path fast

Prints torch.profiler's kernel table for a fast path's dense decode step (--path: one of
decode_speed.py's, default the Decoder's default step; and writes it to --out when given); used to
decide what to fuse next, not a published figure.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from decode_speed import STEPS
from gpu_shapes import random_model
from torch.profiler import ProfilerActivity, profile

from elmkit.infer import DecodeConfig, Decoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-1.5b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--path", default="fast", choices=sorted(STEPS), help="which decode step")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", type=int, default=25, help="kernels shown, by total GPU time")
    args = ap.parse_args()
    model = random_model(args.shape)
    ids = torch.randint(1, 1000, (args.batch, args.prompt), device="cuda")
    dec = Decoder(model, args.batch, args.prompt + 64, step=STEPS[args.path])
    cfg = DecodeConfig(max_new_tokens=40, stop_at_eos=False)
    dec.generate(ids, cfg=cfg)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.generate(ids, cfg=DecodeConfig(max_new_tokens=21, stop_at_eos=False, check_every=1000))
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows,
                                      max_name_column_width=70)
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
