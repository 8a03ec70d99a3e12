"""The remote engine's HTTP client: one ``httpx.AsyncClient`` on its own event-loop thread, JSON requests with
retries and exponential backoff, and counters of the completions sent (tests and benchmarks read them)."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from concurrent.futures import Future
from typing import Any, Coroutine

import httpx

from ..errors import S1KitError

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class HTTPError(S1KitError):
    """The server answered an HTTP error status (after retries, if it was a retryable one)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def snippet(text: str, limit: int = 200) -> str:
    """``text`` on one line, cut to ``limit`` characters (for error messages)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


class Client:
    """Requests to the server at ``base_url`` (``.../v1``) from any thread; coroutines run on the client's loop."""

    def __init__(self, base_url: str, api_key: str | None, concurrency: int, timeout: float, retries: int,
                 backoff: float) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise S1KitError(f"--base-url must start with http:// or https://, got {base_url!r}")
        for name, value, low in (("concurrency", concurrency, 1), ("retries", retries, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise S1KitError(f"{name} must be an integer >= {low}, got {value!r}")
        if not timeout > 0:
            raise S1KitError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.base_url = base_url.rstrip("/")
        self.retries, self.backoff = retries, backoff
        self.in_flight = self.peak_in_flight = self.completions_sent = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="s1kit-remote", daemon=True)
        self._thread.start()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._http = self.submit(self._open(headers, limits, timeout)).result()

    async def _open(self, headers: dict, limits: httpx.Limits, timeout: float) -> httpx.AsyncClient:
        return httpx.AsyncClient(headers=headers, limits=limits,
                                 timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    def submit(self, coro: Coroutine) -> Future:
        """Run ``coro`` on the client's loop; its future."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    @property
    def closed(self) -> bool:
        """True once ``close`` ran."""
        return self._loop.is_closed()

    def close(self) -> None:
        """Close the connections and stop the loop's thread."""
        if self._loop.is_closed():
            return
        self.submit(self._http.aclose()).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def request(self, method: str, url: str, body: dict | None = None, retries: int | None = None,
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
                    r = await self._http.request(method, url, json=body)
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
                problem, status = f"{url} answered HTTP {r.status_code}: {snippet(r.text)}", r.status_code
                continue
            if r.status_code != 200:
                hint = "; does --base-url end in /v1?" if r.status_code == 404 else ""
                raise HTTPError(r.status_code,
                                f"{url} refused the request (HTTP {r.status_code}): {snippet(r.text)}{hint}")
            try:
                return r.json()
            except json.JSONDecodeError:
                raise S1KitError(f"{url} answered something that is not JSON: {snippet(r.text)}") from None
        tries = f"{retries + 1} tries" if retries else "1 try"
        if status is not None:
            raise HTTPError(status, f"{problem} (gave up after {tries})")
        raise S1KitError(f"{problem} (gave up after {tries}); is the server running?")

    def sync(self, method: str, url: str, body: dict | None = None, retries: int | None = None) -> Any:
        """``request`` from a thread outside the loop, waiting for it."""
        return self.submit(self.request(method, url, body, retries)).result()

    async def complete(self, body: dict) -> tuple[dict, int | None]:
        """POST one completion; (its first choice, completion tokens the server reports)."""
        data = await self.request("POST", self.base_url + "/completions", body, completion=True)
        try:
            choice = data["choices"][0]
            choice["text"], choice["finish_reason"]
        except (KeyError, IndexError, TypeError):
            raise S1KitError(f"{self.base_url}/completions answered something unexpected: "
                             f"{snippet(json.dumps(data))}") from None
        used = (data.get("usage") or {}).get("completion_tokens")
        return choice, used if isinstance(used, int) else None
