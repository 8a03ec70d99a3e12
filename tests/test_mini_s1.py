"""scripts/mini_s1.py's plan, and the published results/mini-s1: every number in summary.json must follow from the
graded samples that ship beside it (recomputed here with the same metrics code)."""

import gzip
import json
import sys
from pathlib import Path

from s1kit.evaluate.report import build_summary
from s1kit.evaluate.sweep import setting_from_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "mini-s1"
sys.path.insert(0, str(ROOT / "scripts"))

import mini_s1  # noqa: E402


def test_eval_parts_run_greedy_settings_first_and_rejection_sampling_last():
    plan = mini_s1.grids(mini_s1.Run(mini_s1.parse_args([])))  # the defaults, as results/mini-s1 ran them
    parts = mini_s1.eval_parts(plan)
    sampled = [i for i, (_, _, settings) in enumerate(parts) if any(s.accept_max is not None for s in settings)]
    assert sampled == [len(parts) - 1]  # one sampled part, at the end
    model, bench, settings = parts[-1]
    assert (model, bench) == ("s1kit-mini", "math500") and all(s.method == "rejection" for s in settings)
    assert [s.label for s in settings] == ["accept<=256", "accept<=512", "accept<=1024"]
    # nothing is lost or run twice: the parts add up to the whole plan
    for key, full in plan.items():
        got = [s.key for m, b, ss in parts if (m, b) == key for s in ss]
        assert sorted(got) == sorted(s.key for s in full)


def test_published_summary_follows_from_the_published_samples():
    summary = json.loads((RESULTS / "summary.json").read_text())
    for bench, models in summary["results"].items():
        for model, published in models.items():
            name = f"{model}-{bench}"
            config = json.loads((RESULTS / "samples" / f"{name}.config.json").read_text())
            settings = [setting_from_json(d) for d in config["settings"]]
            with gzip.open(RESULTS / "samples" / f"{name}.jsonl.gz", "rt") as f:
                records = [json.loads(line) for line in f]
            assert len(records) == sum(r["n"] for r in published["settings"]), name
            again = build_summary(records, settings)
            assert again["settings"] == published["settings"], name
            for k in ("control", "scaling", "performance"):
                assert again[k] == published[k], (name, k)
    mini = summary["results"]["math500"]["s1kit-mini"]
    assert (summary["control"], summary["scaling"], summary["performance"]) == \
        (mini["control"], mini["scaling"], mini["performance"])
    assert summary["control"] == 1.0 and summary["scaling"] > 0  # budget forcing controls and scales here

