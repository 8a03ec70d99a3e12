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
import random
import threading
import warnings
from collections import deque
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from queue import Empty, SimpleQueue
from typing import Any

import httpx

from ..errors import S1KitError
from .base import ForcingCompiler, SamplingParams
from .core import EngineCore, Row
from .reference import Complete, stop_and_continue

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class _HTTPError(S1KitError):
    """The server answered an HTTP error status (after retries, if it was a retryable one)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Aborted(Exception):
    """The row was aborted (its request was cancelled, or another row of a ``generate`` call failed)."""


class _Run:
    """One row's requests in flight, so that aborting the row cancels them at once."""

    def __init__(self, engine: "RemoteEngine") -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.aborted = False
        self.close_thinking = False  # stop-thinking was asked: close after the call in flight
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


class RemoteEngine(EngineCore):
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
        super().__init__()
        self._running: dict[Row, Future] = {}  # rows whose loop runs in a worker thread
        self._events: SimpleQueue[tuple[Row, BaseException | None]] = SimpleQueue()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s1kit-seq")
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
        for row in list(self._running):
            self._cancel(row)
        self._pool.shutdown(wait=True)
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

    def _complete(self, run: _Run, row: Row) -> Complete:
        """The ``complete`` function of one sequence's s1 loop, over HTTP."""
        calls = itertools.count(1)

        def complete(ids: list[int], max_new: int, stop: frozenset[int]) -> list[int]:
            out: list[int] = []
            while True:  # a second call only when a text-only server's output re-tokenized short
                seed = (row.seed + 7919 * next(calls)) % 2**31  # distinct per call, reproducible per sequence
                new, stopped, exhausted = self._one_call(run, ids + out, max_new - len(out), stop,
                                                         row.request.sampling, seed)
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

    # -- the engine core's hooks: one worker thread per row in flight, at most ``concurrency`` ---------------

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered prompt (the local tokenizer, which the server shares)."""
        return self._encode(text)

    def _advance(self, queue: deque[Row]) -> list[Row]:
        """Start queued rows while fewer than ``concurrency`` run; wait for at least one to make progress."""
        while queue and len(self._running) < self.concurrency:
            row = queue.popleft()
            row.slot = run = _Run(self)
            self._running[row] = self._pool.submit(self._run_row, row, run)
        if not self._running:
            return []
        try:  # a short wait, so that whoever steps (a server's worker) also gets to take new requests
            events = [self._events.get(timeout=0.05)]
        except Empty:
            return []
        while not self._events.empty():
            events.append(self._events.get())
        updated = []
        for row, error in events:
            if row not in self._running:
                continue  # aborted meanwhile
            if error is not None:
                row.handle.error = row.handle.error or error
                row.trace.finish_reason = "error"
            if row.trace.finish_reason is not None:
                del self._running[row]
            updated.append(row)
        return updated

    def _cancel(self, row: Row) -> None:
        row.slot.cancel()
        self._running.pop(row, None)

    def _stop_thinking(self, row: Row) -> None:
        row.slot.close_thinking = True

    def _run_row(self, row: Row, run: _Run) -> None:
        """A worker thread: the s1 loop of one row, reporting after each completion call."""
        p = row.prepared
        try:
            stop_and_continue(p.prompt_ids, row.request.policy, p.tokens, self._complete(run, row), p.cap,
                              trace=row.trace, on_call=lambda: self._events.put((row, None)),
                              close_thinking=lambda: run.close_thinking)
            self._events.put((row, None))
        except _Aborted:
            pass
        except BaseException as e:  # noqa: BLE001 - reported to the stepping thread, which fails the request
            self._events.put((row, e))


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
