"""The pieces of a batch-32 decode step, timed alone, each as 28 replays in one CUDA graph (GPU only).

Candidates for the fast path are measured here before they are built: separate q/k/v and gate/up projections
against fused ones, cuBLAS against inductor's autotuned GEMMs, and SDPA decode attention over the whole static
cache against attention over only the columns in use.

    python benchmarks/decode_kernels.py [--arch qwen2.5-1.5b] [--batch 32] [--cache 1024] [--used 384]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from s1kit.bench import ARCHS


def graph_us(fns: list, reps: int = 20) -> float:
    """Microseconds per call of ``fns`` (run in order, as one CUDA graph), the median of ``reps`` replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2] / len(fns)


def linears(m: int, shapes: list[tuple[int, int]], layers: int, compiled: bool) -> tuple[float, int]:
    """µs for one layer's worth of ``x @ W.T`` over ``shapes`` (out, in), distinct weights per layer."""
    dev, dt = "cuda", torch.bfloat16
    ws = [[torch.randn(o, i, device=dev, dtype=dt) * 0.02 for o, i in shapes] for _ in range(layers)]
    xs = {i: torch.randn(m, i, device=dev, dtype=dt) for _, i in shapes}
    lin = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False) if compiled else F.linear
    outs = []

    def call(w):
        return lambda: outs.append(lin(xs[w.shape[1]], w))

    fns = [call(w) for layer in ws for w in layer]
    us = graph_us(fns) * len(shapes)
    return us, sum(o * i * 2 for o, i in shapes)


def _decode_inputs(b: int, hq: int, hkv: int, d: int, cols: int, layers: int) -> tuple[list, list, list]:
    """Random bf16 queries [b, hkv, G, d] and K/V [b, hkv, cols, d], one set per layer."""
    def rand(n: int) -> list:
        return [torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]

    return rand(hq // hkv), rand(cols), rand(cols)


def attention(b: int, hq: int, hkv: int, d: int, cols: int, layers: int, masked: bool, naive: bool) -> float:
    """µs per layer of decode attention: ``hq`` query heads folded per KV group, over ``cols`` columns."""
    qs, ks, vs = _decode_inputs(b, hq, hkv, d, cols, layers)
    mask = torch.zeros(b, 1, 1, cols, device="cuda", dtype=torch.bfloat16) if masked else None

    def call(i):
        if naive:
            def f():
                s = torch.matmul(qs[i], ks[i].transpose(-1, -2)) * d ** -0.5
                if mask is not None:
                    s = s + mask
                torch.matmul(s.softmax(-1), vs[i])
            return f
        return lambda: F.scaled_dot_product_attention(qs[i], ks[i], vs[i], attn_mask=mask)

    return graph_us([call(i) for i in range(layers)])


def split_k(b: int, hq: int, hkv: int, d: int, cols: int, used: int, layers: int, chunk: int,
            **tiling: int) -> float:
    """µs per layer of ``decode_attention`` over a ``cols``-column cache of which every slot uses ``used``."""
    from s1kit.engines.decode_attention import decode_attention

    qs, ks, vs = _decode_inputs(b, hq, hkv, d, cols, layers)
    mask = torch.zeros(b, cols, device="cuda", dtype=torch.bfloat16)
    last = torch.full((b,), used - 1, device="cuda")
    return graph_us([lambda i=i: decode_attention(qs[i], ks[i], vs[i], mask, last, d ** -0.5, chunk, **tiling)
                     for i in range(layers)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen2.5-1.5b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--cache", type=int, default=1024, help="static cache columns")
    ap.add_argument("--used", type=int, default=384, help="columns a row attends to on average")
    ap.add_argument("--no-compile", action="store_true", help="skip the autotuned (inductor) GEMMs")
    ap.add_argument("--attention-only", action="store_true", help="skip the projections")
    ap.add_argument("--sweep", action="store_true", help="time tilings of the split-K kernel")
    args = ap.parse_args()
    c = ARCHS[args.arch]
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hq, hkv = c["num_attention_heads"], c["num_key_value_heads"]
    d = h // hq
    groups = {} if args.attention_only else {
        "q,k,v (3 GEMMs)": [(hq * d, h), (hkv * d, h), (hkv * d, h)],
        "qkv fused": [((hq + 2 * hkv) * d, h)],
        "o": [(h, hq * d)],
        "gate,up (2 GEMMs)": [(inter, h), (inter, h)],
        "gate_up fused": [(2 * inter, h)],
        "down": [(h, inter)],
    }
    print(f"{args.arch} batch {args.batch}, {torch.cuda.get_device_name()}")
    print("| projection | cuBLAS µs/layer | GB/s | autotuned µs/layer | GB/s |")
    print("|---|---|---|---|---|")
    for name, shapes in groups.items():
        us, nbytes = linears(args.batch, shapes, layers, False)
        row = f"| {name} | {us:.1f} | {nbytes / us / 1e3:.0f} |"
        if not args.no_compile:
            us2, _ = linears(args.batch, shapes, layers, True)
            row += f" {us2:.1f} | {nbytes / us2 / 1e3:.0f} |"
        print(row, flush=True)
    if not args.attention_only:
        us, nbytes = linears(args.batch, [(c["vocab_size"], h)], 2, False)
        print(f"| lm_head | {us:.1f} | {nbytes / us / 1e3:.0f} |", flush=True)
    print("\n| attention (per layer) | columns | µs |")
    print("|---|---|---|")
    for cols in (args.cache, args.used):
        for masked, naive, label in ((True, False, "SDPA + mask"), (False, False, "SDPA no mask"),
                                     (True, True, "matmul-softmax-matmul + mask")):
            us = attention(args.batch, hq, hkv, d, cols, layers, masked, naive)
            print(f"| {label} | {cols} | {us:.1f} |", flush=True)
    if args.sweep:  # tilings of the split-K kernel: µs per layer at each context
        used = (128, args.used, args.cache)
        print(f"\n| chunk | block | warps | stages | " + " | ".join(f"{u} cols" for u in used) + " |")
        for chunk in (128, 256):
            for block in (32, 64):
                for warps in (2, 4, 8):
                    for stages in (2, 4):
                        if block > chunk:
                            continue
                        t = [split_k(args.batch, hq, hkv, d, args.cache, u, layers, chunk, block=block, warps=warps,
                                     stages=stages) for u in used]
                        print(f"| {chunk} | {block} | {warps} | {stages} | " + " | ".join(f"{x:.1f}" for x in t) + " |",
                              flush=True)
        return
    print("\n| split-K kernel (per layer), columns in use of the cache's | chunk 64 | 128 | 256 |")
    print("|---|---|---|---|")
    for used in (128, 256, args.used, 768, args.cache):
        us = [split_k(args.batch, hq, hkv, d, args.cache, used, layers, c) for c in (64, 128, 256)]
        print(f"| {used} of {args.cache} | " + " | ".join(f"{u:.1f}" for u in us) + " |", flush=True)


if __name__ == "__main__":
    main()
