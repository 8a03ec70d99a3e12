"""s1 budget forcing inside vLLM (v1 engine, targeted release 0.26.0): a logits processor that runs a full
``BudgetPolicy`` per request, batched, in vLLM's own decode loop (tensor/pipeline parallel, several nodes).

Start the server with it (s1kit must be importable there; vLLM loads the class by name in every worker)::

    vllm serve MODEL --logits-processors s1kit.integrations.vllm:S1BudgetLogitsProcessor

and ask for a budget per request in ``vllm_xargs`` (HTTP) or ``SamplingParams.extra_args`` (Python)::

    {"prompt": ..., "max_tokens": 600, "temperature": 0, "repetition_penalty": 1,
     "vllm_xargs": {"s1_max_thinking_tokens": 512, "s1_num_waits": 2, "s1_wait_strings": ["Wait", " Hmm,"]}}

The fields are in ``xargs.py``; a request without ``s1_`` fields is not touched. Bad fields are refused
before the request is queued (``validate_params``: HTTP 400). Give the request enough ``max_tokens`` for
thinking + closing + answer + 1 (the processor lowers the thinking cap to fit, as for a context window),
and no ``stop`` strings or ``stop_token_ids`` that the forced texts contain. The logic lives in
``processor.py`` (plain torch, tested on the CPU); this module only adapts vLLM's interface and is
importable only where vLLM is installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

try:
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError as e:  # a clear line instead of a deep import error inside vLLM's worker start-up
    raise ImportError(f"s1kit.integrations.vllm needs vLLM (>= 0.26, v1 engine): {e}") from e

from .processor import BudgetRows, RequestParams, check_request, rows_from_updates
from .sampling import RowSampling

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def request_params(sp: SamplingParams) -> RequestParams:
    """What the processor needs from a vLLM request's ``SamplingParams``."""
    ending = set(sp.stop_token_ids or ())
    if sp.eos_token_id is not None:  # None when ignore_eos
        ending.add(sp.eos_token_id)
    return RequestParams(
        extra_args=sp.extra_args,
        sampling=RowSampling(sp.temperature, sp.top_p, sp.top_k, sp.min_p),
        seed=sp.seed,
        max_tokens=sp.max_tokens,
        ending_ids=frozenset(ending),
        penalties=(sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty),
    )


class S1BudgetLogitsProcessor(LogitsProcessor):
    """vLLM v1 logits processor: s1 budget forcing (cap, minimum, Waits, answer prefix) per request."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Refuse a request whose ``s1_`` fields are unknown or invalid (vLLM turns the ValueError into HTTP 400)."""
        check_request(request_params(sampling_params))

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        from transformers import AutoTokenizer

        mc = vllm_config.model_config
        tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer, revision=mc.tokenizer_revision,
                                                  trust_remote_code=mc.trust_remote_code)
        self.rows = BudgetRows(tokenizer, mc.max_model_len, device, seed=mc.seed or 0)

    def is_argmax_invariant(self) -> bool:
        """False: forcing changes the argmax (vLLM then applies it to greedy requests too)."""
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Follow vLLM's persistent batch: rows removed, added (with their live output lists) and moved."""
        if batch_update is None:
            return
        moved = [(a, b, d == MoveDirectionality.SWAP) for a, b, d in batch_update.moved]
        rows_from_updates(self.rows, batch_update.removed, batch_update.added, moved, request_params)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Force or draw the next token of every row with a budget; other rows pass untouched."""
        return self.rows.apply(logits)
