"""The remote engine's forced path: a vLLM server that runs s1kit's logits processor (``integrations/vllm.py``)
enforces a whole policy in its own decode loop, so each sample is one request carrying the policy in
``vllm_xargs``; the returned tokens are replayed through ``BudgetState`` for the counts
(``integrations/replay.py``). A start-up probe asks for a cap of 0 and checks that the server forced the closing."""

from __future__ import annotations

from typing import Any

from ..budget import BudgetPolicy, BudgetState, ForcingTokens, Phase
from ..errors import S1KitError
from ..formats import ThinkingFormat
from ..integrations.replay import replay
from ..integrations.xargs import to_xargs
from .base import Request, SamplingParams
from .core import Prepared, Row
from .remote_http import HTTPError, snippet
from .remote_server import Server, returned_ids

PLUGIN = "s1kit.integrations.vllm:S1BudgetLogitsProcessor"


class ForcedPath:
    """Requests that the server's processor forces, over ``server``; ``compile`` makes forcing tokens."""

    def __init__(self, server: Server, compile: Any) -> None:
        self.server, self.compile = server, compile

    def found(self, required: bool) -> bool:
        """True when the server forces budgets itself: a cap of 0 must come back as exactly the forced closing."""
        why = self._answer() if self.server.token_prompts else "it does not take token-id prompts"
        if why is None:
            return True
        if required:
            raise S1KitError(f"the server at {self.server.client.base_url} does not run s1kit's vLLM processor: "
                             f"{why}; start it with `vllm serve MODEL --logits-processors {PLUGIN}` "
                             "(docs/scale-out.md)")
        return False

    def _answer(self) -> str | None:
        """None if a probe request came back forced by the processor, else why not."""
        eos = self.server.tokenizer.eos_token
        if not eos:
            return "the tokenizer has no EOS token to probe with"
        fmt = ThinkingFormat("probe", think_open="", stop_tokens=(eos,), answer_open="Answer")
        policy = BudgetPolicy(max_thinking_tokens=0, answer_prefix=" is", max_answer_tokens=1)
        tokens = self.compile(fmt, policy)
        closing = [t for part in tokens.cap_close_ids(tokens.prompt_ends_with_newline) for t in part]
        body = self.body(self.server.encode("Hello"), policy, fmt, tokens, 0, SamplingParams(), 0)
        try:
            choice, _ = self.server.client.submit(self.server.client.complete(body)).result()
        except HTTPError as e:
            return f"it refused a request with vllm_xargs ({e})"
        got = returned_ids(choice)
        if got is not None and got[: len(closing)] == closing:
            return None
        return f"a cap of 0 came back unforced ({snippet(repr(choice.get('text')))})"

    @staticmethod
    def takes(request: Request) -> bool:
        """Whether the processor can run ``request`` alone: early exit needs the loop's probes, a graceful cap and a
        template that turned thinking off the loop's machine (the processor's wire format carries none of them)."""
        return request.policy.early_exit is None and not request.policy.cap_grace and not request.format.closed

    def check(self, tokens: ForcingTokens) -> None:
        """Refuse forcing tokens that would end the request inside vLLM (a forced text holding an end token)."""
        forced = {*tokens.opener_ids, *tokens.newline_ids, *tokens.prefix_ids, *(t for w in tokens.wait_ids for t in w)}
        if forced & tokens.end_ids:
            raise S1KitError(f"a forced text holds an end token ({self.server.text(sorted(forced & tokens.end_ids))!r}), "
                             "which would end the request inside vLLM; use the stop-and-continue loop (plugin=False)")

    def body(self, ids: list[int], policy: BudgetPolicy, fmt: ThinkingFormat, tokens: ForcingTokens, cap: int | None,
             sp: SamplingParams, seed: int) -> dict:
        """One request carrying the whole policy: ``max_tokens`` fits thinking, closing, answer and the end token."""
        if cap is None:
            raise S1KitError("a budget without max_thinking_tokens needs the server's context length: the server "
                             "does not list max_model_len, pass max_context")
        return {
            "model": self.server.served_model, "prompt": ids,
            "max_tokens": cap + tokens.max_closing_len + policy.max_answer_tokens + 1,
            **self.server.sampling_fields(sp, seed), "skip_special_tokens": False, "return_token_ids": True,
            "vllm_xargs": to_xargs(policy, fmt),
        }

    async def sequence(self, row: Row) -> BudgetState:
        """One request, then its tokens replayed through ``BudgetState`` (greedy ambiguities asked of the server).

        Returns the finished state; its ``waits_exact`` is False where a Wait had to be guessed (sampling: the
        tokens cannot tell). The server decides the whole sequence: a stop-thinking request cannot reach it."""
        req, job, server = row.request, row.prepared, self.server
        body = self.body(job.prompt_ids, req.policy, req.format, job.tokens, job.cap, req.sampling, row.seed)
        choice, _ = await server.client.complete(body)
        ids = returned_ids(choice)
        if ids is None:
            raise S1KitError(f"{server.client.base_url} returned no token ids (return_token_ids): it is not a vLLM "
                             "server")
        choices: dict[int, bool] = {}
        while True:
            done = replay(ids, req.policy, job.tokens, job.cap, choices)
            if not done.guessed or not req.sampling.greedy:
                break
            for i in done.guessed:  # did the model propose a stop here? Its greedy argmax tells
                choices[i] = await self._greedy_is_stop(job, ids[:i])
        state = done.state
        if not state.done and choice["finish_reason"] == "stop" and state.phase is Phase.ANSWER and ids:
            # The server ended on an end token of its own (e.g. a second EOS in generation_config.json) that this
            # format does not name: read it as the format's end, as the stop-and-continue loop does.
            done = replay(ids[:-1] + [server.stop_id(choice, job.tokens.end_ids)], req.policy, job.tokens, job.cap,
                          choices)
            state = done.state
        if not state.done:
            raise S1KitError(f"the server ended a forced sequence early ({choice['finish_reason']}) after {len(ids)} "
                             "tokens; is max_model_len smaller than it reports?")
        if len(done.trailing) > 1:
            raise S1KitError(f"the server went on {len(done.trailing)} tokens after the budget's end")
        state.waits_exact = not done.guessed
        return state

    async def _greedy_is_stop(self, job: Prepared, output: list[int]) -> bool:
        """Whether the model's own greedy token after ``output`` is a stop (one unforced token, no xargs)."""
        body = {"model": self.server.served_model, "prompt": job.prompt_ids + output, "max_tokens": 1,
                **self.server.sampling_fields(SamplingParams(), 0), "skip_special_tokens": False,
                "return_token_ids": True}
        choice, _ = await self.server.client.complete(body)
        ids = returned_ids(choice) or []
        return (bool(ids) and ids[0] in job.tokens.stop_ids) or (not ids and choice["finish_reason"] == "stop")
