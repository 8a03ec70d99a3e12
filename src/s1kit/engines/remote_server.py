"""What the remote engine's server is and how to talk to it: the model name to send, its context length, who
serves it (``owned_by``), whether it takes token-id prompts (else text, read back with the server's own tokenizer
where it has one), request bodies in its dialect, and its answers read back as token ids. Found once, at start."""

from __future__ import annotations

import threading
import warnings
from typing import Any

from ..errors import S1KitError
from .base import SamplingParams
from .remote_http import Client, HTTPError, snippet

# Servers that end on ``stop_token_ids`` (others get the stop tokens as strings too) and read "no top-k" as 0.
STOP_ID_SERVERS = frozenset({"vllm", "sglang"})


def discover(client: Client, model: str, served_model: str | None) -> tuple[str, int | None, str | None]:
    """The model name to send, the context length and who serves it (``owned_by``), from ``GET /models``."""
    try:
        listing = client.sync("GET", client.base_url + "/models")
    except HTTPError as e:
        if e.status not in (404, 405, 501):
            raise S1KitError(str(e)) from None
        return served_model or model, None, None  # a server without /models: trust the names given
    try:
        entries = {m["id"]: m for m in listing["data"]}
    except (KeyError, TypeError):
        raise S1KitError(f"{client.base_url}/models answered something unexpected: {snippet(str(listing))}; "
                         "is this an OpenAI-compatible server (the URL usually ends in /v1)?") from None
    name = served_model or (model if model in entries or len(entries) != 1 else next(iter(entries)))
    if entries and name not in entries:
        raise S1KitError(f"the server at {client.base_url} serves {', '.join(sorted(entries))}, not {name!r}; "
                         "pass one of them as --model (and the tokenizer as --tokenizer)")
    entry = entries.get(name) or {}
    length = entry.get("max_model_len")  # vLLM lists it
    owner = entry.get("owned_by")
    return name, length if isinstance(length, int) else None, owner if isinstance(owner, str) else None


def returned_ids(choice: dict) -> list[int] | None:
    """Generated token ids if the server sent them (vLLM ``token_ids``, llama-server ``tokens``)."""
    for key in ("token_ids", "tokens"):
        ids = choice.get(key)
        if isinstance(ids, list) and all(isinstance(i, int) for i in ids) and (ids or not choice["text"]):
            return list(ids)
    return None


class Server:
    """A discovered server (``discover``) with the local tokenizer: bodies to send and answers read back."""

    def __init__(self, client: Client, tokenizer: Any, served_model: str, max_context: int | None,
                 kind: str | None, token_prompts: bool | None = None) -> None:
        self.client, self.tokenizer = client, tokenizer
        self.served_model, self.max_context, self.kind = served_model, max_context, kind
        self._lock = threading.Lock()  # fast tokenizers may refuse concurrent calls ("Already borrowed")
        self._stop_texts: dict[frozenset[int], list[str]] = {}
        self._special = frozenset(tokenizer.all_special_ids)
        self._eos = tokenizer.eos_token_id
        self.token_prompts = self._probe_token_prompts() if token_prompts is None else token_prompts
        self.tokenize_url = None if self.token_prompts else self._probe_server_tokenizer()

    def is_special(self, token: int) -> bool:
        """Whether ``token`` is one of the tokenizer's special tokens."""
        return token in self._special

    @property
    def stops_on_ids(self) -> bool:
        """True when the server ends on ``stop_token_ids`` (vLLM, SGLang)."""
        return self.kind in STOP_ID_SERVERS

    def _probe_token_prompts(self) -> bool:
        """True when the server takes token-id prompts; False (with a warning) when only text works."""
        body = {"model": self.served_model, "max_tokens": 1, "temperature": 0.0}
        url = self.client.base_url + "/completions"
        try:  # a refusal comes as 400, 422 or even 500 (llama-cpp-python): then try text once
            self.client.sync("POST", url, {**body, "prompt": self.encode("Hello")}, retries=0)
            return True
        except HTTPError as e:
            refusal = e
        try:
            self.client.sync("POST", url, {**body, "prompt": "Hello"})
        except HTTPError:
            raise S1KitError(str(refusal)) from None  # text fails too: report the first refusal
        warnings.warn(f"the server at {self.client.base_url} does not take token-id prompts: sending text, which the "
                      "server re-tokenizes", RuntimeWarning, stacklevel=3)
        return False

    def _probe_server_tokenizer(self) -> str | None:
        """llama-cpp-python's ``/extras/tokenize`` URL if it tokenizes like the local tokenizer, else None.

        Where the server's tokenizer splits text differently from the local one (llama.cpp and
        transformers disagree on e.g. ``":\\n\\n1"``), only the server's reading of its own output gives
        back the tokens it generated."""
        root = self.client.base_url[: -len("/v1")] if self.client.base_url.endswith("/v1") else self.client.base_url
        url = root + "/extras/tokenize"
        try:
            tokens = self.client.sync("POST", url, {"input": "Hello", "model": self.served_model}, retries=0)["tokens"]
        except (S1KitError, KeyError, TypeError):
            return None
        return url if tokens == self.encode("Hello") else None

    def sampling_fields(self, sp: SamplingParams, seed: int) -> dict:
        """The sampling fields of a request body, penalties neutral."""
        # The penalties are sent explicitly: vLLM otherwise applies the model's generation_config.json
        # (Qwen2.5: repetition_penalty 1.1), which changes greedy tokens and slows every step. "No top-k" is
        # 0 on vLLM, SGLang and llama.cpp but refused by some; the vocabulary size means the same everywhere.
        top_k = sp.top_k or (0 if self.stops_on_ids or not self.token_prompts else len(self.tokenizer))
        return {"temperature": sp.temperature, "top_p": sp.top_p, "top_k": top_k, "seed": seed, "n": 1,
                "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}

    def body(self, ids: list[int], max_new: int, stop: frozenset[int], sp: SamplingParams, seed: int) -> dict:
        """A plain completion request: up to ``max_new`` tokens after ``ids``, stopping at any of ``stop``."""
        body = {
            "model": self.served_model,
            "prompt": ids if self.token_prompts else self.text(ids),
            "max_tokens": max_new,
            **self.sampling_fields(sp, seed),
            # Extensions: vLLM/SGLang (stop ids, token ids back, special tokens kept in the text), llama.cpp
            # (no repetition penalty: plain sampling as in the hf engine, tokens back).
            "stop_token_ids": sorted(stop),
            "skip_special_tokens": False,
            "return_token_ids": True,
        }
        if not self.stops_on_ids:  # a server that may ignore stop_token_ids: stop strings too
            body.update(stop=self.stop_strings(stop), repeat_penalty=1.0, return_tokens=True)
        return body

    def stop_strings(self, stop: frozenset[int]) -> list[str]:
        """The texts of ``stop`` tokens, for servers that stop on strings."""
        texts = self._stop_texts.get(stop)
        if texts is None:
            texts = self._stop_texts[stop] = sorted({t for t in map(self.text, ([i] for i in stop)) if t})
        return texts

    def text(self, ids: list[int]) -> str:
        """Text of ``ids``, special tokens kept (what the server's text shows)."""
        with self._lock:  # fast tokenizers may refuse concurrent calls ("Already borrowed")
            return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` by the local tokenizer, which the server shares."""
        with self._lock:
            return self.tokenizer.encode(text, add_special_tokens=False)

    async def retokenize(self, text: str) -> list[int]:
        """Token ids of generated text (text-only servers): by the server's tokenizer where it has one."""
        if self.tokenize_url is None or not text:
            return self.encode(text)
        tokens = (await self.client.request("POST", self.tokenize_url, {"input": text, "model": self.served_model})
                  ).get("tokens")
        if not (isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)):
            raise S1KitError(f"{self.tokenize_url} answered something unexpected: {snippet(str(tokens))}")
        return tokens

    def stop_id(self, choice: dict, stop: frozenset[int]) -> int:
        """Which of ``stop`` the server stopped on (it reports it, or the text shows it; else EOS or any)."""
        reason = choice.get("stop_reason", choice.get("matched_stop"))  # vLLM, SGLang
        if isinstance(reason, int) and reason in stop:
            return reason
        if isinstance(reason, str):
            for i in stop:
                if self.text([i]) == reason:
                    return i
        return self._eos if self._eos in stop else min(stop)

    async def call(self, ids: list[int], max_new: int, stop: frozenset[int], sp: SamplingParams,
                   seed: int) -> tuple[list[int], bool, bool]:
        """One plain completion: (new ids, ending with a stop id if the server stopped; stopped; the server used all
        of ``max_new``)."""
        body = self.body(ids, max_new, stop, sp, seed)
        choice, used = await self.client.complete(body)
        stopped = choice["finish_reason"] == "stop"
        out = returned_ids(choice)
        if out is None:  # a text-only server
            out = await self.retokenize(choice["text"])
            if used is not None and used > len(out) and stop - {self._eos}:
                # It generated a token its text hides: a special token such as <|im_start|>, which
                # llama-cpp-python renders as "" and cannot stop on. Find where, and read it as the stop.
                located = await self._locate_hidden_stop(body, used)
                if located is not None:
                    return located, True, True
        if stopped and out and out[-1] in self._special and out[-1] not in stop:
            out.pop()  # an end token of the server's own (e.g. EOS) that this format does not name
        if stopped and (not out or out[-1] not in stop):
            out.append(self.stop_id(choice, stop))  # the server dropped the stop token from its output
        return out, stopped, used is None or used >= max_new

    async def _locate_hidden_stop(self, body: dict, used: int) -> list[int] | None:
        """The ids before the first hidden token plus a stop id, or None if no token is hidden after all.

        Bisects on ``max_tokens`` with the same prompt and seed, so the server regenerates the same tokens
        (greedy, or seeded sampling): the first hidden token is where the server's count first exceeds the
        re-tokenized count while the text stays the same."""

        async def probe(k: int) -> tuple[str, bool]:
            choice, n = await self.client.complete({**body, "max_tokens": k})
            return choice["text"], n is not None and n > len(await self.retokenize(choice["text"]))

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
        return await self.retokenize(text) + [min(set(body["stop_token_ids"]) - {self._eos})]
