"""Optional integrations with other engines: s1 budget forcing as a vLLM logits processor (``integrations.vllm``,
importable only with vLLM; its logic in ``processor.py`` and its request fields in ``xargs.py`` need only torch)."""
