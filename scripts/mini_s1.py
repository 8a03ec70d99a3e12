#!/usr/bin/env python3
"""Mini-s1 end to end: teacher traces and curation -> SFT -> budget-forcing sweeps -> results/mini-s1.

    python scripts/mini_s1.py --teacher qwen2.5-coder-1.5b --student qwen2.5-coder-0.5b   # `make mini-s1-gpu`

Stages run in order (``--stages`` picks some): ``curate`` (teacher traces over a pool sampled from MATH and GSM8K
train, difficulty with the student as the reference model, Algorithm 1 -> the curated 1K, and a uniform 1K-random
from the same traces), ``train`` (the s1 recipe on both), ``eval`` (MATH-500 and GSM8K: the base student, both
fine-tunes, budget-forcing sweeps, Waits, token-conditional control and rejection sampling) and ``report``.
Every stage resumes: curation and sweeps keep what they computed under ``--work`` and a finished checkpoint is
not trained again, so a run that is cut off continues when the same command runs again.
Models are anything ``s1kit`` loads: bundled names, .gguf files, checkpoint directories or HF ids.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

STAGES = ("curate", "train", "eval", "report")
MODELS = ("base", "s1kit-mini", "1k-random")  # the student before training, after the curated 1K, after 1K-random
BENCHMARKS = ("math500", "gsm8k")
# Per benchmark, the one-setting rows of Table 1/2 first (cheap), then s1kit-mini's sweep (MATH-500's is the main
# result, ~15 settings); a run cut off by a time limit keeps what matters most.
ORDER = [(m, b) for b in BENCHMARKS for m in ("base", "1k-random", "s1kit-mini")]


def log(msg: str) -> None:
    """A timestamped progress line (the GPU job's output is read as it ends)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--teacher", default="qwen2.5-coder-1.5b", help="model that writes the traces")
    p.add_argument("--student", default="qwen2.5-coder-0.5b", help="model that is fine-tuned (and the reference)")
    p.add_argument("--names", default=None, help="how the report names them: TEACHER,STUDENT [default: the refs]")
    p.add_argument("--work", type=Path, default=Path("runs/mini-s1"), help="caches, checkpoints and sweeps")
    p.add_argument("--results", type=Path, default=Path("results/mini-s1"), help="summary.json, scaling.png, report.md")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    p.add_argument("--pool-sample", type=int, default=2000, help="questions drawn from each of MATH and GSM8K train")
    p.add_argument("--size", type=int, default=1000, help="rows of the curated and the random set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-max-thinking", type=int, default=1024)
    p.add_argument("--teacher-max-answer", type=int, default=512)
    p.add_argument("--reference-max-thinking", type=int, default=512)
    p.add_argument("--epochs", type=float, default=5.0, help="s1: 5")
    p.add_argument("--lr", type=float, default=1e-5, help="s1: 1e-5")
    p.add_argument("--train-batch", type=int, default=16, help="global batch (s1: 16)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per forward pass")
    p.add_argument("--checkpointing", action="store_true",
                   help="gradient checkpointing (a 0.5B at block 4,096 fits an H100 without it)")
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--bf16", action="store_true",
                   help="train under bf16 autocast (s1's); at this scale it diverged on the H100, so float32 + TF32")
    p.add_argument("--save-every", type=int, default=0,
                   help="also checkpoint every N steps (0: only when SIGTERM/SIGUSR1 stops a training, e.g. a "
                        "job's time limit; each fp32 checkpoint of the 0.5B costs ~17 s on an H100)")
    p.add_argument("--curated-from", type=Path, default=None,
                   help="skip curation: take curated/ and random/ from a published run (results/mini-s1/curation)")
    p.add_argument("--budgets", type=ints, default=[128, 256, 512, 1024], help="thinking caps of the sweeps")
    p.add_argument("--unforced-cap", type=int, default=2048, help="safety cap of the runs without forcing")
    p.add_argument("--waits", type=ints, default=[1, 2, 4], help="forced Waits (under the unforced cap)")
    p.add_argument("--rejection-budgets", type=ints, default=[256, 512, 1024])
    p.add_argument("--max-answer", type=int, default=256)
    p.add_argument("--items", type=int, default=500, help="items per benchmark (MATH-500 has 500)")
    p.add_argument("--batch-size", type=int, default=256, help="sequences decoded together")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    return p.parse_args(argv)


class Run:
    """Paths and shared state of one mini-s1 run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = args.work
        self.curated = args.work / "curated" / "s1k.jsonl"
        self.random = args.work / "random" / "s1k.jsonl"
        self.timings: dict[str, float] = {}
        self.fast: dict[str, dict] = {}  # the fast path's counters per model stage (fast_path.json)
        self._student = None

    def computes_here(self) -> None:
        """Record this machine as the one that ran the stages (the report may be written elsewhere)."""
        from mini_s1_report import DEVICE_FILE, device_name

        (self.work / DEVICE_FILE).write_text(device_name() + "\n")

    def engine(self, ref: str):
        """An hf engine for ``ref`` with the run's batch size, device and dtype."""
        from s1kit.api import make_engine

        self.computes_here()
        return make_engine(ref, device=self.args.device, dtype=self.args.dtype, batch_size=self.args.batch_size)

    def student_engine(self):
        """The base student, loaded once (reference model in curation and base row of the sweeps)."""
        if self._student is None:
            self._student = self.engine(self.args.student)
        return self._student

    def checkpoint(self, name: str) -> Path:
        return self.work / "ckpt" / name

    def model_ref(self, name: str) -> str:
        return self.args.student if name == "base" else str(self.checkpoint(name))

    def fast_path(self, engine, before: dict | None, tag: str) -> None:
        """Log, and keep for fast_path.json, what the engine's fast path did since ``before`` (its earlier stats)."""
        stats = engine.fast_stats()
        if not stats:
            return
        d = {k: v - (before or {}).get(k, 0) for k, v in stats.items()}
        if d["steps"]:
            secs = d["decode_s"] + d["prefill_s"]
            log(f"  {tag}: {d['rows']} rows, {d['tokens']:,} tokens, {d['tokens'] / secs:,.0f} tokens/s; "
                f"{1e3 * d['decode_s'] / d['steps']:.2f} ms/step, slots busy {100 * d['busy_slot_steps'] / d['slot_steps']:.0f}%, "
                f"prefill {d['prefill_s']:.1f} s of {secs:.1f} s")
            old = self.fast.get(tag, {})  # a part resumed after a time limit adds to the earlier calls' counts
            self.fast[tag] = {k: old.get(k, 0) + v for k, v in d.items()}
            self.save()

    def load(self) -> None:
        """The timings and fast-path counters of earlier calls (a run resumed after a time limit)."""
        for name, attr in (("timings.json", "timings"), ("fast_path.json", "fast")):
            if (self.work / name).is_file():
                setattr(self, attr, json.loads((self.work / name).read_text()))

    def save(self) -> None:
        """Write them as each part ends, so a call killed by its time limit keeps what it finished."""
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "timings.json").write_text(json.dumps(self.timings, indent=2))
        (self.work / "fast_path.json").write_text(json.dumps(self.fast, indent=2))

    def timed(self, name: str, fn, *a, **kw):
        start = time.time()
        try:
            return fn(*a, **kw)
        finally:  # a part stopped by a signal counts too: its work is resumed, not redone
            self.timings[name] = round(self.timings.get(name, 0.0) + time.time() - start, 1)
            log(f"{name}: {self.timings[name]:.1f} s")
            self.save()


# ---------------------------------------------------------------- stages


def stage_curate(run: Run) -> None:
    """Teacher traces over the sampled pool, then the curated 1K and the 1K-random from the same traces."""
    from s1kit.budget import BudgetPolicy
    from s1kit.curate import NamedEngine, curate

    a = run.args
    if a.curated_from:
        return restore_curation(run, a.curated_from)
    chunk = 4 * a.batch_size
    teacher = NamedEngine(a.teacher, lambda: run.engine(a.teacher), chunk)
    student = NamedEngine(a.student, run.student_engine, chunk)
    common = dict(size=a.size, seed=a.seed, eval_sets=BENCHMARKS, teacher=teacher, per_pool=a.pool_sample,
                  classifier="field:type,source_type",  # MATH's subjects, and GSM8K as one more domain
                  tokenizer=a.student, workdir=run.work / "curate.work",
                  teacher_policy=BudgetPolicy(max_thinking_tokens=a.teacher_max_thinking,
                                              max_answer_tokens=a.teacher_max_answer),
                  reference_policy=BudgetPolicy(max_thinking_tokens=a.reference_max_thinking, max_answer_tokens=256))
    pools = ["math-train", "gsm8k-train"]
    result = run.timed("curate (s1)", curate, pools, run.curated, references=[student], **common)
    if run._student is not None:
        run.fast_path(run._student, None, "difficulty")
    for s in result.stages:
        log(f"  {s.name}: {s.rows_in} -> {s.rows_out} {dict(s.dropped) or ''}")
    run.timed("curate (random)", curate, pools, run.random, selection="random", **common)
    del teacher, common  # frees the teacher's weights and caches before the next stage
    _free_gpu()


def restore_curation(run: Run, source: Path) -> None:
    """The curated 1K and the 1K-random (with their curation reports) of a published run, into ``--work``."""
    import gzip
    import shutil

    for out in (run.curated, run.random):
        src = source / out.parent.name
        if not (src / "s1k.jsonl.gz").is_file():
            raise SystemExit(f"--curated-from: {src / 's1k.jsonl.gz'} not found")
        out.parent.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.name == "s1k.jsonl.gz":
                out.write_bytes(gzip.decompress(f.read_bytes()))
            else:
                shutil.copy(f, out.parent / f.name)
        log(f"  {out}: {sum(1 for _ in out.open())} rows from {src}")


def stage_train(run: Run) -> None:
    """The s1 recipe on the curated 1K and on the 1K-random (a finished checkpoint is kept)."""
    from s1kit.errors import S1KitError
    from s1kit.train import Recipe, train
    from s1kit.train.recipe import SUMMARY_FILE

    a = run.args
    recipe = Recipe(epochs=a.epochs, learning_rate=a.lr, batch_size=a.train_batch, micro_batch_size=a.micro_batch,
                    block_size=a.block_size, truncate=True, seed=a.seed,
                    gradient_checkpointing=a.checkpointing, bf16=a.bf16, save_steps=a.save_every or None)
    for name, data in (("s1kit-mini", run.curated), ("1k-random", run.random)):
        out = run.checkpoint(name)
        if (out / SUMMARY_FILE).is_file():
            log(f"train {name}: done before")
            continue
        run.computes_here()
        try:
            summary = run.timed(f"train {name}", train, a.student, str(data), out, recipe, overwrite=True,
                                resume=True,
                                on_data=lambda d: log(f"  data: {d['trained_rows']} rows, {d['tokens']:,} tokens"),
                                on_log=lambda d: d["step"] % 10 == 0 and log(f"  step {d['step']}/{d['max_steps']} "
                                                                              f"loss {d['loss']:.4f}"))
        except S1KitError as e:  # stopped by a signal (a checkpoint is saved) or bad input: say so, no traceback
            log(f"train {name}: {e}")
            raise SystemExit(3) from None
        log(f"train {name}: {summary['steps']} steps, loss {summary['train_loss']:.4f}")
        _free_gpu()


def grids(run: Run) -> dict[tuple[str, str], list]:
    """The settings of every (model, benchmark) sweep."""
    from s1kit.evaluate.sweep import build_grid

    a = run.args
    kw = dict(max_answer=a.max_answer)
    unforced = build_grid(max_thinking=[a.unforced_cap], **kw)
    sweep = build_grid(max_thinking=[*a.budgets, a.unforced_cap], **kw) + \
        build_grid(max_thinking=[a.unforced_cap], waits=[w for w in a.waits if w], **kw)
    out = {}
    for bench in BENCHMARKS:
        out[("base", bench)] = unforced
        out[("1k-random", bench)] = unforced
        out[("s1kit-mini", bench)] = sweep
    out[("s1kit-mini", "math500")] = sweep + build_grid(methods=("token-conditional",), max_thinking=a.budgets, **kw) \
        + build_grid(methods=("rejection",), max_thinking=a.rejection_budgets, **kw)
    return out


def sweep_dir(run: Run, model: str, bench: str) -> Path:
    return run.work / "eval" / f"{model}-{bench}"


def eval_parts(plan: dict[tuple[str, str], list]) -> list[tuple[str, str, list]]:
    """(model, benchmark, settings) in the order they run: every greedy setting in ORDER first, then the sampled
    ones (rejection sampling); a sampling fault, or a time limit, then costs no greedy row."""
    greedy = [(m, b, [s for s in plan[(m, b)] if s.accept_max is None]) for m, b in ORDER]
    sampled = [(m, b, [s for s in plan[(m, b)] if s.accept_max is not None]) for m, b in ORDER]
    return [p for p in greedy + sampled if p[2]]


def stage_eval(run: Run) -> None:
    """Every sweep, one engine per model; graded samples are stored as they come (resumable). A part that fails
    is logged and the rest still run; the stage then exits with status 4."""
    import traceback

    from s1kit.data.benchmarks import load_benchmark
    from s1kit.evaluate.report import write_report
    from s1kit.evaluate.record import RunRecord, open_run
    from s1kit.evaluate.sweep import run_sweep
    from s1kit.train.recipe import SUMMARY_FILE

    a = run.args
    plan = grids(run)
    engines: dict = {}
    failed = []
    for model, bench, settings in eval_parts(plan):
        if model != "base" and not (run.checkpoint(model) / SUMMARY_FILE).is_file():
            log(f"  {model} {bench}: skipped, the model is not trained (run the train stage)")
            continue
        whole = load_benchmark(bench)
        b = whole.first(a.items)
        out = sweep_dir(run, model, bench)
        open_run(out, RunRecord.create(run.model_ref(model), bench, whole.items, plan[(model, bench)], a.items,
                                       dtype=a.dtype), whole.items)
        tag = f"{model} {bench}" + (" (sampled)" if settings[0].accept_max is not None else "")

        def engine(model=model):  # run_sweep calls it only if samples are missing: a finished part loads nothing
            if model not in engines:
                for other in [m for m in engines if m != "base"]:  # one fine-tune in memory at a time
                    del engines[other]
                _free_gpu()
                engines[model] = run.student_engine() if model == "base" else run.engine(run.model_ref(model))
            return engines[model]

        done = {"n": 0}

        def on_sample(rec: dict, done=done, total=len(settings) * len(b.items), tag=tag) -> None:
            done["n"] += 1
            if done["n"] % 500 == 0:
                log(f"  {tag}: {done['n']}/{total} new samples")

        def loaded(model=model):  # the base student may be loaded already, by curation
            return run._student if model == "base" else engines.get(model)

        before = loaded().fast_stats() if loaded() else {}  # an engine loaded during the part counts from zero
        try:
            run.timed(f"eval {tag}", run_sweep, engine, b, settings, out, chunk=4 * a.batch_size,
                      on_sample=on_sample)
        except Exception:  # noqa: BLE001 - keep the other parts; the traceback says what to fix
            log(f"  {tag}: FAILED\n{traceback.format_exc()}")
            failed.append(tag)
            continue
        finally:  # also when a time limit's SIGTERM stops the part: its work is kept, so its counters too
            if loaded():
                run.fast_path(loaded(), before, f"eval {tag}")
        summary = write_report(out, plan[(model, bench)], {"model": model, "benchmark": b.name, "items": len(b.items)})
        mine = {s.key for s in settings}
        log(f"  {tag}: " + ", ".join(f"{r['label']} {100 * r['accuracy']:.1f}%" for r in summary["settings"]
                                     if r["setting"] in mine))
    if failed:
        log(f"eval: {len(failed)} part(s) failed: {', '.join(failed)}")
        raise SystemExit(4)


def _free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _stop_on_sigterm() -> None:
    """Turn SIGTERM (a job's time limit) into SystemExit, so the part in progress records its time and counters
    (Python's default would end the process on the spot). Training installs its own handler while it runs."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main() -> None:
    args = parse_args()
    _stop_on_sigterm()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"unknown stage {bad[0]!r}; choose from {', '.join(STAGES)}")
    run = Run(args)
    args.work.mkdir(parents=True, exist_ok=True)
    run.load()
    for stage in STAGES:
        if stage in stages:
            log(f"stage {stage}")
            if stage == "report":
                from mini_s1_report import write_results

                write_results(run, grids(run), sweep_dir, platform.node())
            else:
                globals()[f"stage_{stage}"](run)
    log("done")


if __name__ == "__main__":
    main()
