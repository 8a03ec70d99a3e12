"""Where a fast-path decode step spends its time: the CUDA kernels of one run, by total time (GPU only).

    python benchmarks/profile_decode.py [--arch qwen2.5-1.5b] [--batch 32] [--new-tokens 128] [--top 25]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from s1kit.bench import bench_fast, random_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen2.5-1.5b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    model = random_model(args.arch, "cuda", torch.bfloat16)
    bench_fast(model, args.batch, args.prompt_len, args.new_tokens, True)  # compile + capture outside the trace
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ms = bench_fast(model, args.batch, args.prompt_len, args.new_tokens, True)
    print(f"{args.arch} batch {args.batch}: {ms:.2f} ms/step")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
