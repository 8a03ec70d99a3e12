"""Remote engine: budget forcing over any OpenAI-compatible ``/v1/completions`` server (vLLM, SGLang, llama.cpp).

No such server extends thinking, so this engine runs the s1 stop-and-continue loop
(``engines.reference.stop_and_continue``) with every ``complete`` call sent over HTTP: generate until a
stop token or the remaining budget, then continue from the whole prefix (the server's prefix cache makes
that cheap). Prompts go as token ids where the server takes them (vLLM, SGLang, llama-server) and as text
otherwise (llama-cpp-python), with a warning. The tokenizer is loaded locally.

Concurrency: one event loop thread holds an ``httpx.AsyncClient``; ``concurrency`` worker threads each run
one sequence's loop and wait on its requests, so at most that many completions are in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import threading
import warnings
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import httpx

from ..errors import S1KitError
from ..formats import render_prompt
from .base import Completion, ForcingCompiler, Request, SamplingParams, context_cap, make_completion
from .reference import Complete, stop_and_continue

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class _HTTPError(S1KitError):
    """The server answered an HTTP error status (after retries, if it was a retryable one)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Aborted(Exception):
    """Another sequence of the same ``generate`` call failed: stop this one quietly."""


@dataclass
class _Job:
    request_index: int
    sample_index: int
    prompt_ids: list[int]
    tokens: Any
    cap: int | None
    sampling: SamplingParams
    seed: int


class _Run:
    """The requests of one ``generate`` call, so that one failure cancels all the others at once."""

    def __init__(self, engine: "RemoteEngine") -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.aborted = False
        self.pending: set[Future] = set()

    def post(self, url: str, body: dict, completion: bool = False) -> Any:
        """POST from a worker thread and wait for the JSON answer."""
        with self.lock:
            if self.aborted:
                raise _Aborted
            fut = self.engine._submit(self.engine._request("POST", url, body, completion=completion))
            self.pending.add(fut)
        try:
            return fut.result()
        except CancelledError:
            raise _Aborted from None
        finally:
            with self.lock:
                self.pending.discard(fut)

    def cancel(self) -> None:
        """Refuse new requests and cancel the open ones."""
        with self.lock:
            self.aborted = True
            for fut in self.pending:
                fut.cancel()


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


class RemoteEngine:
    """Budget forcing against an OpenAI-compatible completions server at ``base_url`` (``.../v1``).

    ``model`` is the tokenizer source unless ``tokenizer`` is given, and the model name sent to the server
    unless ``served_model`` is; a server that serves a single model gets that one.
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
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise S1KitError(f"--base-url must start with http:// or https://, got {base_url!r}")
        for name, value, low in (("concurrency", concurrency, 1), ("retries", retries, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise S1KitError(f"{name} must be an integer >= {low}, got {value!r}")
        if not timeout > 0:
            raise S1KitError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.base_url = base_url.rstrip("/")
        self.concurrency, self.retries, self.backoff = concurrency, retries, backoff
        self.in_flight = self.peak_in_flight = self.completions_sent = 0  # for tests and benchmarks
        self._stats_lock, self._tok_lock = threading.Lock(), threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="s1kit-remote", daemon=True)
        self._thread.start()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = self._submit(self._open_client(headers, limits, timeout)).result()
        try:
            self.served_model, listed_context = self._discover(model, served_model)  # fails fast if unreachable
            self.tokenizer = load_tokenizer(tokenizer if tokenizer is not None else model)
            self.compile = ForcingCompiler(self.tokenizer)
            self._special = frozenset(self.tokenizer.all_special_ids)
            self._eos = self.tokenizer.eos_token_id
            self.max_context = max_context if max_context is not None else listed_context
            self.token_prompts = self._probe_token_prompts() if token_prompts is None else token_prompts
            self._tokenize_url = None if self.token_prompts else self._probe_server_tokenizer()
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
        if getattr(self, "_client", None) is not None:
            self._submit(self._client.aclose()).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> "RemoteEngine":
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
                    self._count(+1)
                try:
                    r = await self._client.request(method, url, json=body)
                finally:
                    if completion:
                        self._count(-1)
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

    def _count(self, delta: int) -> None:
        with self._stats_lock:
            self.in_flight += delta
            if delta > 0:
                self.completions_sent += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _sync(self, method: str, url: str, body: dict | None = None, retries: int | None = None) -> Any:
        return self._submit(self._request(method, url, body, retries)).result()

    # -- what the server can do (asked once, at start) ----------------------------------------------------

    def _discover(self, model: str, served_model: str | None) -> tuple[str, int | None]:
        """The model name to send and the context length, from ``GET /models``."""
        try:
            listing = self._sync("GET", self.base_url + "/models")
        except _HTTPError as e:
            if e.status not in (404, 405, 501):
                raise S1KitError(str(e)) from None
            return served_model or model, None  # a server without /models: trust the names given
        try:
            entries = {m["id"]: m for m in listing["data"]}
        except (KeyError, TypeError):
            raise S1KitError(f"{self.base_url}/models answered something unexpected: {_snippet(str(listing))}; "
                             "is this an OpenAI-compatible server (the URL usually ends in /v1)?") from None
        name = served_model or (model if model in entries or len(entries) != 1 else next(iter(entries)))
        if entries and name not in entries:
            raise S1KitError(f"the server at {self.base_url} serves {', '.join(sorted(entries))}, not {name!r}; "
                             "pass one of them as --model (and the tokenizer as --tokenizer)")
        length = (entries.get(name) or {}).get("max_model_len")  # vLLM lists it
        return name, length if isinstance(length, int) else None

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

    # -- one completion -----------------------------------------------------------------------------------

    def _text(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _encode(self, text: str) -> list[int]:
        with self._tok_lock:  # fast tokenizers may refuse concurrent calls ("Already borrowed")
            return self.tokenizer.encode(text, add_special_tokens=False)

    def _retokenize(self, run: _Run, text: str) -> list[int]:
        """Token ids of generated text (text-only servers): by the server's tokenizer where it has one."""
        if self._tokenize_url is None or not text:
            return self._encode(text)
        tokens = run.post(self._tokenize_url, {"input": text, "model": self.served_model}).get("tokens")
        if not (isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)):
            raise S1KitError(f"{self._tokenize_url} answered something unexpected: {_snippet(str(tokens))}")
        return tokens

    def _body(self, ids: list[int], max_new: int, stop: frozenset[int], sp: SamplingParams, seed: int) -> dict:
        return {
            "model": self.served_model,
            "prompt": ids if self.token_prompts else self._text(ids),
            "max_tokens": max_new,
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "seed": seed,
            "n": 1,
            "stop": sorted({t for t in map(self._text, ([i] for i in stop)) if t}),
            # Extensions: vLLM/SGLang (stop ids, token ids back, special tokens kept in the text), llama.cpp
            # (no repetition penalty or min-p: plain sampling as in the hf engine); servers ignore the ones
            # they do not know. "No top-k" is -1, 0 or refused depending on the server; the vocabulary
            # size means the same everywhere.
            "top_k": sp.top_k or len(self.tokenizer),
            "min_p": 0.0,
            "repeat_penalty": 1.0,
            "stop_token_ids": sorted(stop),
            "skip_special_tokens": False,
            "return_token_ids": True,
            "return_tokens": True,
        }

    def _complete(self, run: _Run, job: _Job) -> Complete:
        """The ``complete`` function of one sequence's s1 loop, over HTTP."""
        calls = itertools.count(1)

        def complete(ids: list[int], max_new: int, stop: frozenset[int]) -> list[int]:
            out: list[int] = []
            while True:  # a second call only when a text-only server's output re-tokenized short
                seed = (job.seed + 7919 * next(calls)) % 2**31  # distinct per call, reproducible per sequence
                new, stopped, exhausted = self._one_call(run, ids + out, max_new - len(out), stop, job.sampling, seed)
                out += new
                if stopped or len(out) >= max_new or not new or not exhausted:
                    return out[:max_new]

        return complete

    def _one_call(self, run: _Run, ids: list[int], max_new: int, stop: frozenset[int], sp: SamplingParams,
                  seed: int) -> tuple[list[int], bool, bool]:
        """(new ids, ending with a stop id if the server stopped; stopped; server used all of ``max_new``)."""
        body = self._body(ids, max_new, stop, sp, seed)
        choice, used = self._choice(run.post(self.base_url + "/completions", body, completion=True))
        stopped = choice["finish_reason"] == "stop"
        out = self._returned_ids(choice)
        if out is None:  # a text-only server
            out = self._retokenize(run, choice["text"])
            if used is not None and used > len(out) and stop - {self._eos}:
                # It generated a token its text hides: a special token such as <|im_start|>, which
                # llama-cpp-python renders as "" and cannot stop on. Find where, and read it as the stop.
                located = self._locate_hidden_stop(run, body, used)
                if located is not None:
                    return located, True, True
        if stopped and out and out[-1] in self._special and out[-1] not in stop:
            out.pop()  # an end token of the server's own (e.g. EOS) that this format does not name
        if stopped and (not out or out[-1] not in stop):
            out.append(self._stop_id(choice, stop))  # the server dropped the stop token from its output
        return out, stopped, used is None or used >= max_new

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

    def _locate_hidden_stop(self, run: _Run, body: dict, used: int) -> list[int] | None:
        """The ids before the first hidden token plus a stop id, or None if no token is hidden after all.

        Bisects on ``max_tokens`` with the same prompt and seed, so the server regenerates the same tokens
        (greedy, or seeded sampling): the first hidden token is where the server's count first exceeds the
        re-tokenized count while the text stays the same."""

        def probe(k: int) -> tuple[str, bool]:
            choice, n = self._choice(run.post(self.base_url + "/completions", {**body, "max_tokens": k},
                                              completion=True))
            return choice["text"], n is not None and n > len(self._retokenize(run, choice["text"]))

        lo, hi, text = 1, used, None
        while lo < hi:  # the smallest k whose first k tokens hold a hidden one
            mid = (lo + hi) // 2
            t, hidden = probe(mid)
            if hidden:
                hi, text = mid, t
            else:
                lo = mid + 1
        if text is None:
            text, hidden = probe(lo)
            if not hidden:
                return None
        if lo > 1 and probe(lo - 1)[0] != text:  # the k-th token shows text: not a hidden token
            return None
        return self._retokenize(run, text) + [min(set(body["stop_token_ids"]) - {self._eos})]

    def _stop_id(self, choice: dict, stop: frozenset[int]) -> int:
        reason = choice.get("stop_reason", choice.get("matched_stop"))  # vLLM, SGLang
        if isinstance(reason, int) and reason in stop:
            return reason
        if isinstance(reason, str):
            for i in stop:
                if self._text([i]) == reason:
                    return i
        return self._eos if self._eos in stop else min(stop)

    # -- the Engine protocol -------------------------------------------------------------------------------

    def prepare(self, request: Request) -> tuple[list[int], Any, int | None]:
        """Prompt ids, compiled forcing tokens and effective cap of a request (validates the format)."""
        text = render_prompt(self.tokenizer, request.prompt, request.format, request.system)
        ids = self._encode(text)
        tokens = self.compile(request.format, request.policy)
        return ids, tokens, context_cap(request.policy, tokens, len(ids), self.max_context)

    def generate(
        self, requests: Sequence[Request], on_progress: Callable[[int], None] | None = None
    ) -> list[Completion]:
        """Completions for ``requests``, ``n`` per request, in request order: all of them or an error."""
        jobs, prompt_lens = [], []
        for ri, req in enumerate(requests):
            ids, tokens, cap = self.prepare(req)
            prompt_lens.append(len(ids))
            base = req.sampling.seed if req.sampling.seed is not None else int.from_bytes(os.urandom(4), "little")
            # n samples are n seeded sequences: each continues from its own prefix
            jobs += [_Job(ri, si, ids, tokens, cap, req.sampling, base + si) for si in range(req.sampling.n)]
        run = _Run(self)
        results: dict[int, Any] = {}

        def one(k: int, job: _Job) -> None:
            results[k] = stop_and_continue(job.prompt_ids, requests[job.request_index].policy, job.tokens,
                                           self._complete(run, job), job.cap)

        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="s1kit-seq") as pool:
            futures = [pool.submit(one, k, job) for k, job in enumerate(jobs)]
            try:
                for f in as_completed(futures):
                    f.result()
                    if on_progress is not None:
                        on_progress(1)
            except BaseException:
                run.cancel()  # fail fast: no new requests, open ones cancelled, queued sequences dropped
                for f in futures:
                    f.cancel()
                raise
        return [
            make_completion(results[k], self.tokenizer, requests[j.request_index], prompt_lens[j.request_index],
                            j.request_index, j.sample_index)
            for k, j in enumerate(jobs)
        ]


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
