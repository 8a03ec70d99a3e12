"""What budget forcing costs in the hf engine, and what the single pass saves over the s1 loop.

1. forced vs unforced, same model, same number of generated tokens: "forced" is min = max = N thinking
   tokens in the s1 format (the model keeps trying to stop and every stop is replaced by "Wait");
   "unforced" runs the same engine loop with the budget machine swapped for a pass-through that emits the
   model's own proposals for exactly as many tokens, so the difference is what forcing costs.
2. single pass vs the reference stop-and-continue loop at 4 Waits (greedy; both emit the same tokens).

    python benchmarks/forcing_overhead.py [--model smollm2-135m] [--prompts 8] [--tokens 128] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from _timing import median_time
from rich.console import Console
from rich.table import Table

from s1kit import BudgetPolicy, Request, ThinkingFormat
from s1kit.engines import hf
from s1kit.engines.hf import HFEngine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import hf_complete, stop_and_continue  # noqa: E402 - the s1 loop is a test oracle, not library code

PROMPTS = [
    "What is 17*23?",
    "A train travels 60 km in 45 minutes. What is its average speed in km/h?",
    "How many positive divisors does 360 have?",
    "Simplify (x^2 - 9)/(x - 3).",
    "What is the sum of the first 20 positive odd numbers?",
    "If 3x + 7 = 22, what is x?",
    "What is the area of a circle of radius 5?",
    "How many ways can 5 people stand in a line?",
]
class PassThrough:
    """Stands in for BudgetState: emits every proposal, ends after ``n`` tokens (no forcing at all)."""

    next_is_forced = False

    def __init__(self, n: int) -> None:
        self.n, self.token_ids = n, []
        self.thinking_ids, self.answer_ids, self.waits_used, self.hit_cap, self.finish_reason = [], [], 0, False, "length"

    @property
    def done(self) -> bool:
        return len(self.token_ids) >= self.n

    def step(self, proposed: int) -> int:
        self.token_ids.append(proposed)
        self.thinking_ids.append(proposed)
        return proposed


# Free text until the end of the turn: thinking that is not forced.
FREE = ThinkingFormat("free", think_open="", stop_tokens=("<|im_end|>",), answer_open="<|im_start|>answer\n",
                      end_tokens=("<|im_end|>",))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()

    eng = HFEngine.load(args.model, device=args.device, batch_size=args.prompts)
    prompts = (PROMPTS * ((args.prompts + len(PROMPTS) - 1) // len(PROMPTS)))[: args.prompts]
    n = args.tokens
    forced = [Request(p, BudgetPolicy(min_thinking_tokens=n, max_thinking_tokens=n, max_answer_tokens=1)) for p in prompts]
    eng.generate(forced[:1])  # warm-up
    per_row = len(eng.generate(forced[:1])[0].token_ids)

    def unforced_run():
        real = hf.BudgetState
        hf.BudgetState = lambda *a, **k: PassThrough(per_row)  # same loop, no forcing
        try:
            return eng.generate(forced)
        finally:
            hf.BudgetState = real

    # Interleaved repetitions, so that load drifting on a shared machine hits both sides alike.
    runs = [(median_time(lambda: eng.generate(forced), 1), median_time(unforced_run, 1)) for _ in range(args.reps)]
    t_forced, c_forced = statistics.median(f[0] for f, _ in runs), runs[0][0][1]
    t_free, c_free = statistics.median(u[0] for _, u in runs), runs[0][1][1]
    tok_forced = sum(len(c.token_ids) for c in c_forced)
    tok_free = sum(len(c.token_ids) for c in c_free)
    waits = sum(c.waits_used for c in c_forced)

    waited = [Request(p, BudgetPolicy(num_waits=4, max_thinking_tokens=4 * n, max_answer_tokens=16), FREE)
              for p in prompts]
    t_single, c_single = median_time(lambda: eng.generate(waited), args.reps)
    one_by_one = HFEngine(eng.model, eng.tokenizer, batch_size=1)
    t_single1, _ = median_time(lambda: one_by_one.generate(waited), 1)
    complete = hf_complete(eng.model, eng.pad_id)

    def reference():
        out = []
        for r in waited:
            ids, tokens, cap = eng.prepare(r)
            out.append(stop_and_continue(ids, r.policy, tokens, complete, cap))
        return out

    t_ref, c_ref = median_time(reference, 1)
    same = all(a.token_ids == b.token_ids for a, b in zip(c_single, c_ref))
    tok_waited = sum(len(c.token_ids) for c in c_single)

    results = {
        "model": args.model, "device": str(eng.device), "prompts": args.prompts, "tokens": n,
        "forced_s": t_forced, "forced_tokens": tok_forced, "forced_waits": waits,
        "unforced_s": t_free, "unforced_tokens": tok_free,
        "forced_per_token_over_unforced": (t_forced / tok_forced) / (t_free / tok_free),
        "single_pass_batched_s": t_single, "single_pass_batch1_s": t_single1, "reference_loop_s": t_ref,
        "waited_tokens": tok_waited, "waits_used": sum(c.waits_used for c in c_single),
        "reference_over_single_batched": t_ref / t_single, "reference_over_single_batch1": t_ref / t_single1,
        "identical_tokens": same,
    }
    table = Table("measure", "value", title=f"{args.model} on {eng.device}, {args.prompts} prompts")
    table.add_row("forced: min=max=N, time / tokens / waits", f"{t_forced:.2f} s / {tok_forced} / {waits}")
    table.add_row("unforced: N free tokens, time / tokens", f"{t_free:.2f} s / {tok_free}")
    table.add_row("forced / unforced (per token)", f"{results['forced_per_token_over_unforced']:.3f}")
    table.add_row("4 Waits: single pass, batched", f"{t_single:.2f} s ({tok_waited} tokens)")
    table.add_row("4 Waits: single pass, batch 1", f"{t_single1:.2f} s")
    table.add_row("4 Waits: reference loop (s1)", f"{t_ref:.2f} s")
    table.add_row("reference / single pass (batched)", f"{results['reference_over_single_batched']:.2f}")
    table.add_row("reference / single pass (batch 1)", f"{results['reference_over_single_batch1']:.2f}")
    table.add_row("identical tokens", str(same))
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
