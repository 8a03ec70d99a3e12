"""Remote engine: budget forcing over any OpenAI-compatible ``/v1/completions`` server (vLLM, SGLang, llama.cpp).

Two strategies, picked once per engine:

- **forced in the server** (a vLLM server started with s1kit's logits processor, ``integrations/vllm.py``):
  one request per sample carries the whole policy in ``vllm_xargs`` and vLLM enforces it in its own decode
  loop; the returned tokens are replayed through ``BudgetState`` for the counts (``integrations/replay.py``).
  A start-up probe asks for a cap of 0 and checks that the server forced the closing text.
- **stop and continue** everywhere else, with the row's ``BudgetState`` as the authority: each server call
  decodes freely until a stop token or as far as the machine lets proposals through (the cap and its grace
  window, the answer budget, the next early-exit count point); the returned tokens are stepped through the
  machine as the model's proposals and the first one it replaces (a Wait for a stop, the closing at a cap)
  cuts them there; forced tokens are emitted locally and the next call continues from the whole prefix (the
  server's prefix cache makes that cheap). Caps, minimums, Waits, graceful caps, early exit and stop-thinking
  therefore behave exactly as in the in-process engine.

Prompts go as token ids where the server takes them (vLLM, SGLang, llama-server) and as text otherwise
(llama-cpp-python), with a warning. The tokenizer is loaded locally. One event-loop thread holds an
``httpx.AsyncClient`` and runs every sequence as a task, at most ``concurrency`` at a time; the engine core
(``core.py``) starts the tasks and learns from each what it decoded (after every call of the loop, so the server
streams them) and when it ended. An abort cancels the task and its open request.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import threading
import warnings
from collections import deque
from concurrent.futures import Future
from queue import Empty, SimpleQueue
from typing import Any, Callable, Sequence

import httpx

from ..budget import BudgetPolicy, BudgetState, Phase
from ..errors import S1KitError
from ..formats import ThinkingFormat, render_prompt
from ..integrations.replay import replay
from ..integrations.xargs import to_xargs
from ..forcing import ForcingCompiler, context_cap
from .base import Completion, Request, SamplingParams
from .core import EngineCore, Prepared, Row
from .probe import normalized_answer

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
PLUGIN = "s1kit.integrations.vllm:S1BudgetLogitsProcessor"
# Servers that end on ``stop_token_ids`` (others get the stop tokens as strings too) and read "no top-k" as 0.
STOP_ID_SERVERS = frozenset({"vllm", "sglang"})
UNBOUNDED = 1 << 30  # max_tokens of a thinking call without a cap (the server's context ends it)


class _HTTPError(S1KitError):
    """The server answered an HTTP error status (after retries, if it was a retryable one)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Run:
    """A row's task on the event loop, and whether stop-thinking was asked of it."""

    def __init__(self) -> None:
        self.future: Future | None = None
        self.close_thinking = False


def load_tokenizer(ref: Any) -> Any:
    """A tokenizer object, or one loaded from a model reference (bundled name, ``.gguf``, dir, HF id)."""
    if not isinstance(ref, str):
        return ref
    from transformers import AutoTokenizer

    from ..models import resolve

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve(ref))
    except OSError as e:
        raise S1KitError(f"could not load a tokenizer for {ref!r} ({str(e).splitlines()[0]}); "
                         "pass --tokenizer with a local model directory, .gguf file or bundled name") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class RemoteEngine(EngineCore):
    """Budget forcing against an OpenAI-compatible completions server at ``base_url`` (``.../v1``).

    ``model`` is the tokenizer source unless ``tokenizer`` is given, and the model name sent to the server
    unless ``served_model`` is; a server that serves a single model gets that one. ``plugin``: True requires
    s1kit's vLLM processor on the server, False never uses it, None (default) uses it when a probe finds it.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        tokenizer: Any = None,
        concurrency: int = 8,
        timeout: float = 600.0,
        retries: int = 4,
        backoff: float = 0.5,
        served_model: str | None = None,
        token_prompts: bool | None = None,
        max_context: int | None = None,
        plugin: bool | None = None,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise S1KitError(f"--base-url must start with http:// or https://, got {base_url!r}")
        for name, value, low in (("concurrency", concurrency, 1), ("retries", retries, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise S1KitError(f"{name} must be an integer >= {low}, got {value!r}")
        if not timeout > 0:
            raise S1KitError(f"timeout must be > 0 seconds, got {timeout!r}")
        super().__init__()
        self._running: set[Row] = set()  # rows whose task runs on the event loop
        self._events: SimpleQueue[tuple[Row, BaseException | None]] = SimpleQueue()
        self.guessed_waits = 0  # sampled plugin sequences whose waits_used had to be guessed
        self.base_url = base_url.rstrip("/")
        self.concurrency, self.retries, self.backoff = concurrency, retries, backoff
        self.in_flight = self.peak_in_flight = self.completions_sent = 0  # for tests and benchmarks
        self._tok_lock = threading.Lock()
        self._stop_texts: dict[frozenset[int], list[str]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="s1kit-remote", daemon=True)
        self._thread.start()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = self._submit(self._open_client(headers, limits, timeout)).result()
        try:
            self.served_model, listed_context, self.server_kind = self._discover(model, served_model)
            self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else model)
            self.compile = ForcingCompiler(self.tokenizer)
            self._special = frozenset(self.tokenizer.all_special_ids)
            self._eos = self.tokenizer.eos_token_id
            self.max_context = max_context if max_context is not None else listed_context
            self.token_prompts = self._probe_token_prompts() if token_prompts is None else token_prompts
            self._tokenize_url = None if self.token_prompts else self._probe_server_tokenizer()
            self.plugin = self._probe_plugin(required=plugin is True) if plugin is not False else False
        except BaseException:
            self.close()
            raise

    # -- HTTP -------------------------------------------------------------------------------------------

    async def _open_client(self, headers: dict, limits: httpx.Limits, timeout: float) -> httpx.AsyncClient:
        return httpx.AsyncClient(headers=headers, limits=limits,
                                 timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    def _submit(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def close(self) -> None:
        """Close the HTTP connections and stop the event loop thread."""
        if self._loop.is_closed():
            return
        for row in list(getattr(self, "_running", ())):
            self._cancel(row)
        if getattr(self, "_client", None) is not None:
            self._submit(self._client.aclose()).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _request(self, method: str, url: str, body: dict | None = None, retries: int | None = None,
                       completion: bool = False) -> Any:
        """JSON from ``url``, retrying 429/5xx, timeouts and connection errors with exponential backoff."""
        retries = self.retries if retries is None else retries
        problem, status = "", None
        for attempt in range(retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1) * (1 + random.random() / 2))
            try:
                if completion:
                    self.in_flight += 1
                    self.completions_sent += 1
                    self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                try:
                    r = await self._client.request(method, url, json=body)
                finally:
                    if completion:
                        self.in_flight -= 1
            except httpx.TimeoutException as e:
                problem, status = f"no answer from {url} within the timeout ({type(e).__name__})", None
                continue
            except httpx.TransportError as e:
                problem = f"cannot reach the server at {self.base_url} ({type(e).__name__}: {e or 'no detail'})"
                status = None
                continue
            if r.status_code in RETRY_STATUS:
                problem, status = f"{url} answered HTTP {r.status_code}: {_snippet(r.text)}", r.status_code
                continue
            if r.status_code != 200:
                hint = "; does --base-url end in /v1?" if r.status_code == 404 else ""
                raise _HTTPError(r.status_code,
                                 f"{url} refused the request (HTTP {r.status_code}): {_snippet(r.text)}{hint}")
            try:
                return r.json()
            except json.JSONDecodeError:
                raise S1KitError(f"{url} answered something that is not JSON: {_snippet(r.text)}") from None
        tries = f"{retries + 1} tries" if retries else "1 try"
        if status is not None:
            raise _HTTPError(status, f"{problem} (gave up after {tries})")
        raise S1KitError(f"{problem} (gave up after {tries}); is the server running?")

    def _sync(self, method: str, url: str, body: dict | None = None, retries: int | None = None) -> Any:
        return self._submit(self._request(method, url, body, retries)).result()

    async def _complete_call(self, body: dict) -> tuple[dict, int | None]:
        """POST one completion; (its first choice, completion tokens the server reports)."""
        return self._choice(await self._request("POST", self.base_url + "/completions", body, completion=True))

    # -- what the server can do (asked once, at start) ----------------------------------------------------

    def _discover(self, model: str, served_model: str | None) -> tuple[str, int | None, str | None]:
        """The model name to send, the context length and who serves it (``owned_by``), from ``GET /models``."""
        try:
            listing = self._sync("GET", self.base_url + "/models")
        except _HTTPError as e:
            if e.status not in (404, 405, 501):
                raise S1KitError(str(e)) from None
            return served_model or model, None, None  # a server without /models: trust the names given
        try:
            entries = {m["id"]: m for m in listing["data"]}
        except (KeyError, TypeError):
            raise S1KitError(f"{self.base_url}/models answered something unexpected: {_snippet(str(listing))}; "
                             "is this an OpenAI-compatible server (the URL usually ends in /v1)?") from None
        name = served_model or (model if model in entries or len(entries) != 1 else next(iter(entries)))
        if entries and name not in entries:
            raise S1KitError(f"the server at {self.base_url} serves {', '.join(sorted(entries))}, not {name!r}; "
                             "pass one of them as --model (and the tokenizer as --tokenizer)")
        entry = entries.get(name) or {}
        length = entry.get("max_model_len")  # vLLM lists it
        owner = entry.get("owned_by")
        return name, length if isinstance(length, int) else None, owner if isinstance(owner, str) else None

    def _probe_token_prompts(self) -> bool:
        """True when the server takes token-id prompts; False (with a warning) when only text works."""
        body = {"model": self.served_model, "max_tokens": 1, "temperature": 0.0}
        url = self.base_url + "/completions"
        try:  # a refusal comes as 400, 422 or even 500 (llama-cpp-python): then try text once
            self._sync("POST", url, {**body, "prompt": self._encode("Hello")}, retries=0)
            return True
        except _HTTPError as e:
            refusal = e
        try:
            self._sync("POST", url, {**body, "prompt": "Hello"})
        except _HTTPError:
            raise S1KitError(str(refusal)) from None  # text fails too: report the first refusal
        warnings.warn(f"the server at {self.base_url} does not take token-id prompts: sending text, which the "
                      "server re-tokenizes", RuntimeWarning, stacklevel=3)
        return False

    def _probe_server_tokenizer(self) -> str | None:
        """llama-cpp-python's ``/extras/tokenize`` URL if it tokenizes like the local tokenizer, else None.

        Where the server's tokenizer splits text differently from the local one (llama.cpp and
        transformers disagree on e.g. ``":\\n\\n1"``), only the server's reading of its own output gives
        back the tokens it generated."""
        root = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        url = root + "/extras/tokenize"
        try:
            tokens = self._sync("POST", url, {"input": "Hello", "model": self.served_model}, retries=0)["tokens"]
        except (S1KitError, KeyError, TypeError):
            return None
        return url if tokens == self._encode("Hello") else None

    def _probe_plugin(self, required: bool) -> bool:
        """True when the server forces budgets itself: a cap of 0 must come back as exactly the forced closing."""
        why = self._plugin_answer() if self.token_prompts else "it does not take token-id prompts"
        if why is None:
            return True
        if required:
            raise S1KitError(f"the server at {self.base_url} does not run s1kit's vLLM processor: {why}; start it "
                             f"with `vllm serve MODEL --logits-processors {PLUGIN}` (docs/scale-out.md)")
        return False

    def _plugin_answer(self) -> str | None:
        """None if a probe request came back forced by the processor, else why not."""
        eos = self.tokenizer.eos_token
        if not eos:
            return "the tokenizer has no EOS token to probe with"
        fmt = ThinkingFormat("probe", think_open="", stop_tokens=(eos,), answer_open="Answer")
        policy = BudgetPolicy(max_thinking_tokens=0, answer_prefix=" is", max_answer_tokens=1)
        tokens = self.compile(fmt, policy)
        closing = [t for part in tokens.cap_close_ids(tokens.prompt_ends_with_newline) for t in part]
        body = self._forced_body(self._encode("Hello"), policy, fmt, tokens, 0, SamplingParams(), 0)
        try:
            choice, _ = self._submit(self._complete_call(body)).result()
        except _HTTPError as e:
            return f"it refused a request with vllm_xargs ({e})"
        got = self._returned_ids(choice)
        if got is not None and got[: len(closing)] == closing:
            return None
        return f"a cap of 0 came back unforced ({_snippet(repr(choice.get('text')))})"

    # -- bodies -----------------------------------------------------------------------------------------

    def _sampling_fields(self, sp: SamplingParams, seed: int) -> dict:
        # The penalties are sent explicitly: vLLM otherwise applies the model's generation_config.json
        # (Qwen2.5: repetition_penalty 1.1), which changes greedy tokens and slows every step. "No top-k" is
        # 0 on vLLM, SGLang and llama.cpp but refused by some; the vocabulary size means the same everywhere.
        top_k = sp.top_k or (0 if self.server_kind in STOP_ID_SERVERS or not self.token_prompts else len(self.tokenizer))
        return {"temperature": sp.temperature, "top_p": sp.top_p, "top_k": top_k, "seed": seed, "n": 1,
                "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}

    def _body(self, ids: list[int], max_new: int, stop: frozenset[int], sp: SamplingParams, seed: int) -> dict:
        body = {
            "model": self.served_model,
            "prompt": ids if self.token_prompts else self._text(ids),
            "max_tokens": max_new,
            **self._sampling_fields(sp, seed),
            # Extensions: vLLM/SGLang (stop ids, token ids back, special tokens kept in the text), llama.cpp
            # (no repetition penalty: plain sampling as in the hf engine, tokens back).
            "stop_token_ids": sorted(stop),
            "skip_special_tokens": False,
            "return_token_ids": True,
        }
        if self.server_kind not in STOP_ID_SERVERS:  # a server that may ignore stop_token_ids: stop strings too
            body.update(stop=self._stop_strings(stop), repeat_penalty=1.0, return_tokens=True)
        return body

    def _forced_body(self, ids: list[int], policy: Any, fmt: ThinkingFormat, tokens: Any, cap: int | None,
                     sp: SamplingParams, seed: int) -> dict:
        """One request carrying the whole policy: ``max_tokens`` fits thinking, closing, answer and the end token."""
        if cap is None:
            raise S1KitError("a budget without max_thinking_tokens needs the server's context length: the server "
                             "does not list max_model_len, pass max_context")
        return {
            "model": self.served_model, "prompt": ids, "max_tokens": cap + tokens.max_closing_len + policy.max_answer_tokens + 1,
            **self._sampling_fields(sp, seed), "skip_special_tokens": False, "return_token_ids": True,
            "vllm_xargs": to_xargs(policy, fmt),
        }

    def _stop_strings(self, stop: frozenset[int]) -> list[str]:
        texts = self._stop_texts.get(stop)
        if texts is None:
            texts = self._stop_texts[stop] = sorted({t for t in map(self._text, ([i] for i in stop)) if t})
        return texts

    # -- tokens ------------------------------------------------------------------------------------------

    def _text(self, ids: list[int]) -> str:
        with self._tok_lock:  # fast tokenizers may refuse concurrent calls ("Already borrowed")
            return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _encode(self, text: str) -> list[int]:
        with self._tok_lock:
            return self.tokenizer.encode(text, add_special_tokens=False)

    async def _retokenize(self, text: str) -> list[int]:
        """Token ids of generated text (text-only servers): by the server's tokenizer where it has one."""
        if self._tokenize_url is None or not text:
            return self._encode(text)
        tokens = (await self._request("POST", self._tokenize_url, {"input": text, "model": self.served_model})
                  ).get("tokens")
        if not (isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)):
            raise S1KitError(f"{self._tokenize_url} answered something unexpected: {_snippet(str(tokens))}")
        return tokens

    def _choice(self, data: Any) -> tuple[dict, int | None]:
        try:
            choice = data["choices"][0]
            choice["text"], choice["finish_reason"]
        except (KeyError, IndexError, TypeError):
            raise S1KitError(f"{self.base_url}/completions answered something unexpected: "
                             f"{_snippet(json.dumps(data))}") from None
        used = (data.get("usage") or {}).get("completion_tokens")
        return choice, used if isinstance(used, int) else None

    @staticmethod
    def _returned_ids(choice: dict) -> list[int] | None:
        """Generated token ids if the server sent them (vLLM ``token_ids``, llama-server ``tokens``)."""
        for key in ("token_ids", "tokens"):
            ids = choice.get(key)
            if isinstance(ids, list) and all(isinstance(i, int) for i in ids) and (ids or not choice["text"]):
                return list(ids)
        return None

    def _stop_id(self, choice: dict, stop: frozenset[int]) -> int:
        reason = choice.get("stop_reason", choice.get("matched_stop"))  # vLLM, SGLang
        if isinstance(reason, int) and reason in stop:
            return reason
        if isinstance(reason, str):
            for i in stop:
                if self._text([i]) == reason:
                    return i
        return self._eos if self._eos in stop else min(stop)

    # -- a sequence forced by the server's processor ----------------------------------------------------

    async def _forced_sequence(self, row: Row, run: _Run) -> tuple[Any, bool]:
        """One request, then its tokens replayed through ``BudgetState`` (greedy ambiguities asked of the server).

        Returns the finished state and whether a Wait had to be guessed (sampling: the tokens cannot tell). The
        server decides the whole sequence: a stop-thinking request cannot reach it."""
        req, job = row.request, row.prepared
        body = self._forced_body(job.prompt_ids, req.policy, req.format, job.tokens, job.cap, req.sampling, row.seed)
        choice, _ = await self._complete_call(body)
        ids = self._returned_ids(choice)
        if ids is None:
            raise S1KitError(f"{self.base_url} returned no token ids (return_token_ids): it is not a vLLM server")
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
            done = replay(ids[:-1] + [self._stop_id(choice, job.tokens.end_ids)], req.policy, job.tokens, job.cap,
                          choices)
            state = done.state
        if not state.done:
            raise S1KitError(f"the server ended a forced sequence early ({choice['finish_reason']}) after {len(ids)} "
                             "tokens; is max_model_len smaller than it reports?")
        if len(done.trailing) > 1:
            raise S1KitError(f"the server went on {len(done.trailing)} tokens after the budget's end")
        return state, bool(done.guessed)

    async def _greedy_is_stop(self, job: Prepared, output: list[int]) -> bool:
        """Whether the model's own greedy token after ``output`` is a stop (one unforced token, no xargs)."""
        body = {"model": self.served_model, "prompt": job.prompt_ids + output, "max_tokens": 1,
                **self._sampling_fields(SamplingParams(), 0), "skip_special_tokens": False, "return_token_ids": True}
        choice, _ = await self._complete_call(body)
        ids = self._returned_ids(choice) or []
        return (bool(ids) and ids[0] in job.tokens.stop_ids) or (not ids and choice["finish_reason"] == "stop")

    # -- the stop-and-continue loop ---------------------------------------------------------------------

    async def _loop_sequence(self, row: Row, run: _Run) -> None:
        """One sequence over plain server calls, its ``BudgetState`` stepped over each call's tokens (see the
        module); nothing is ever guessed. The row's trace is the state: it grows after each call and the stepping
        thread hears of it (streaming)."""
        job, policy = row.prepared, row.request.policy
        state = row.trace = BudgetState(policy, job.tokens, job.cap)
        every = policy.early_exit.every if policy.early_exit is not None else None
        calls = itertools.count(1)
        while True:
            if run.close_thinking:
                run.close_thinking = False
                state.stop_thinking()
            while state.next_is_forced:  # a Wait being spelled out, the opener, a cap's closing
                state.step(-1)
            if state.done:
                return
            room = state.free_proposals()
            if state.phase is Phase.THINK:
                ask, stop = UNBOUNDED if room is None else room, job.tokens.stop_ids
                if every:  # calls end at the next count point, where a probe is due
                    ask = min(ask, every - len(state.thinking_ids) % every)
            else:
                ask, stop = room, job.tokens.end_ids
            out = await self._complete(row, job.prompt_ids + state.token_ids, ask, stop, calls)
            for proposed in out:
                if state.probe_due(proposed):
                    await self._probe(row, state)
                if state.step(proposed) != proposed or state.done:
                    break  # the machine acted (or ended): the rest of the call's tokens are not the sequence's
            else:
                if not out:  # the server can decode nothing more (its context is full)
                    state.end("length")
                elif len(out) < ask and out[-1] not in stop and state.phase is Phase.THINK:
                    state.stop_thinking()  # it stopped early without a stop token: close as at a cap
            self._events.put((row, None))

    async def _probe(self, row: Row, state: BudgetState) -> None:
        """An early-exit probe of ``state`` now: a greedy side request on the sequence's context, the answer opener
        and prefix (a server's prefix cache makes the shared part cheap); its confidence is the mean probability
        of the tokens it returned (logprobs). The result goes to ``state.observe_probe``."""
        ee, tokens = row.request.policy.early_exit, row.prepared.tokens
        opener, prefix = state.probe_suffix()
        ids = row.prepared.prompt_ids + state.token_ids + list(opener) + list(prefix)
        body = self._body(ids, ee.probe_tokens, tokens.end_ids, SamplingParams(), row.seed)
        if ee.confidence is not None:
            body["logprobs"] = 1
        choice, used = await self._complete_call(body)
        out = self._returned_ids(choice)
        if out is None:
            out = await self._retokenize(choice["text"])
        answer = [i for i in out if i not in tokens.end_ids and i not in self._special]
        # decode steps, the end token's included (as the in-process probe counts them): the server's count if given
        steps = min(used if used is not None else len(answer) + (choice["finish_reason"] == "stop"), ee.probe_tokens)
        confidence = 0.0
        if ee.confidence is not None:
            logprobs = [x for x in ((choice.get("logprobs") or {}).get("token_logprobs") or []) if x is not None]
            if not logprobs and steps:
                raise S1KitError(f"{self.base_url} returned no logprobs: early exit by confidence needs them "
                                 "(use agree=N with this server)")
            confidence = sum(math.exp(x) for x in logprobs) / len(logprobs) if logprobs else 0.0
        with self._tok_lock:
            text = self.tokenizer.decode(list(prefix) + answer, skip_special_tokens=True)
        state.observe_probe(normalized_answer(text), confidence, len(opener) + len(prefix) + steps)

    async def _complete(self, row: Row, ids: list[int], max_new: int, stop: frozenset[int], calls: Any) -> list[int]:
        out: list[int] = []
        while True:  # a second call only when a text-only server's output re-tokenized short
            seed = (row.seed + 7919 * next(calls)) % 2**31  # distinct per call, reproducible per sequence
            new, stopped, exhausted = await self._one_call(ids + out, max_new - len(out), stop, row.request.sampling,
                                                           seed)
            out += new
            if stopped or len(out) >= max_new or not new or not exhausted:
                return out[:max_new]

    async def _one_call(self, ids: list[int], max_new: int, stop: frozenset[int], sp: SamplingParams,
                        seed: int) -> tuple[list[int], bool, bool]:
        """(new ids, ending with a stop id if the server stopped; stopped; server used all of ``max_new``)."""
        body = self._body(ids, max_new, stop, sp, seed)
        choice, used = await self._complete_call(body)
        stopped = choice["finish_reason"] == "stop"
        out = self._returned_ids(choice)
        if out is None:  # a text-only server
            out = await self._retokenize(choice["text"])
            if used is not None and used > len(out) and stop - {self._eos}:
                # It generated a token its text hides: a special token such as <|im_start|>, which
                # llama-cpp-python renders as "" and cannot stop on. Find where, and read it as the stop.
                located = await self._locate_hidden_stop(body, used)
                if located is not None:
                    return located, True, True
        if stopped and out and out[-1] in self._special and out[-1] not in stop:
            out.pop()  # an end token of the server's own (e.g. EOS) that this format does not name
        if stopped and (not out or out[-1] not in stop):
            out.append(self._stop_id(choice, stop))  # the server dropped the stop token from its output
        return out, stopped, used is None or used >= max_new

    async def _locate_hidden_stop(self, body: dict, used: int) -> list[int] | None:
        """The ids before the first hidden token plus a stop id, or None if no token is hidden after all.

        Bisects on ``max_tokens`` with the same prompt and seed, so the server regenerates the same tokens
        (greedy, or seeded sampling): the first hidden token is where the server's count first exceeds the
        re-tokenized count while the text stays the same."""

        async def probe(k: int) -> tuple[str, bool]:
            choice, n = await self._complete_call({**body, "max_tokens": k})
            return choice["text"], n is not None and n > len(await self._retokenize(choice["text"]))

        lo, hi, text = 1, used, None
        while lo < hi:  # the smallest k whose first k tokens hold a hidden one
            mid = (lo + hi) // 2
            t, hidden = await probe(mid)
            if hidden:
                hi, text = mid, t
            else:
                lo = mid + 1
        if text is None:
            text, hidden = await probe(lo)
            if not hidden:
                return None
        if lo > 1 and (await probe(lo - 1))[0] != text:  # the k-th token shows text: not a hidden token
            return None
        return await self._retokenize(text) + [min(set(body["stop_token_ids"]) - {self._eos})]

    # -- the engine core's hooks ------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered prompt (the local tokenizer, which the server shares)."""
        return self._encode(text)

    def prepare(self, request: Request) -> Prepared:
        """Prompt ids, compiled forcing tokens and effective cap of a request (validates the format)."""
        text = render_prompt(self.tokenizer, request.prompt, request.format, request.system)
        ids = self._encode(text)
        tokens = self.compile(request.format, request.policy)
        ee = request.policy.early_exit
        if ee is not None and ee.words and self.server_kind not in STOP_ID_SERVERS:
            raise S1KitError("early-exit words need a server that stops on token ids (vLLM, SGLang); this one stops "
                             "on text, where a word cannot be told from the inside of another: probe every N tokens")
        plugin = self._uses_plugin(request)
        if plugin:
            forced = {*tokens.opener_ids, *tokens.newline_ids, *tokens.prefix_ids, *(t for w in tokens.wait_ids for t in w)}
            if forced & tokens.end_ids:
                raise S1KitError(f"a forced text holds an end token ({self._text(sorted(forced & tokens.end_ids))!r}), "
                                 "which would end the request inside vLLM; use the stop-and-continue loop (plugin=False)")
        # forced in the server, the sequence also holds the end token forced after an answer budget
        return Prepared(ids, tokens, context_cap(request.policy, tokens, len(ids) + plugin, self.max_context))

    def _uses_plugin(self, request: Request) -> bool:
        """Whether a request runs as one request on the server's processor: early exit needs the loop's probes, and
        a graceful cap the loop's machine (the processor's wire format carries neither)."""
        return bool(self.plugin) and request.policy.early_exit is None and not request.policy.cap_grace

    def generate(self, requests: Sequence[Request], on_progress: Callable[[int], None] | None = None,
                 on_complete: Callable[[Completion], None] | None = None) -> list[Completion]:
        """Completions for ``requests`` (see ``EngineCore.generate``); warns once if sampled sequences on the vLLM
        processor hold a wait string the model may have written itself where a Wait was due."""
        guessed = self.guessed_waits
        out = super().generate(requests, on_progress, on_complete)
        if self.guessed_waits > guessed:
            warnings.warn(f"{self.guessed_waits - guessed} sampled sequence(s) hold a wait string the model may have "
                          "written itself where a Wait was due: their waits_used counts it as forced (the tokens "
                          "cannot tell)", RuntimeWarning, stacklevel=2)
        return out

    def _advance(self, queue: deque[Row]) -> list[Row]:
        """Start queued rows while fewer than ``concurrency`` run; take what the running ones reported."""
        while queue and len(self._running) < self.concurrency:
            row = queue.popleft()
            row.slot = run = _Run()
            self._running.add(row)
            run.future = self._submit(self._sequence(row, run))
        if not self._running:
            return []
        try:  # a short wait, so that whoever steps (a server's worker) also gets to take new requests
            events = [self._events.get(timeout=0.05)]
        except Empty:
            return []
        while True:
            try:
                events.append(self._events.get_nowait())
            except Empty:
                break
        updated = []
        for row, error in events:
            if row not in self._running:
                continue  # aborted meanwhile
            if error is not None:
                row.handle.error = row.handle.error or error
                row.trace.finish_reason = "error"
            if row.trace.finish_reason is not None:
                self._running.discard(row)
            updated.append(row)
        return updated

    def _cancel(self, row: Row) -> None:
        self._running.discard(row)
        if row.slot is not None and row.slot.future is not None:
            row.slot.future.cancel()  # cancels the task, and with it the request in flight

    def _stop_thinking(self, row: Row) -> None:
        row.slot.close_thinking = True  # the loop closes after the call in flight

    async def _sequence(self, row: Row, run: _Run) -> None:
        """A row's task: its sequence, then the news that it ended (or failed) for the stepping thread."""
        try:
            if self._uses_plugin(row.request):
                state, guessed = await self._forced_sequence(row, run)
                row.trace = state
                self.guessed_waits += guessed
            else:
                await self._loop_sequence(row, run)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - reported to the stepping thread, which fails the request
            self._events.put((row, e))
            return
        self._events.put((row, None))


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
