"""A stand-in for ``vllm serve --logits-processors s1kit.integrations.vllm:S1BudgetLogitsProcessor``.

vLLM cannot be installed in CI (its wheels need a CUDA GPU), so the remote engine's tests talk to this:
``/v1/models`` and ``/v1/completions`` as vLLM answers them (token-id prompts, ``stop_token_ids``,
``return_token_ids``, ``vllm_xargs``, ``owned_by: vllm``, ``max_model_len``, ``stream``), over the real SmolLM2 in
transformers (float32, CPU, one request at a time, KV cache kept across its steps). With ``plugin=True``
every step's logits go through s1kit's processor core (``BudgetRows``, the code the vLLM adapter runs)
and bad ``s1_`` fields are a 400, as vLLM's ``validate_params`` makes them; without, ``vllm_xargs`` is
ignored, as vLLM ignores it when no processor reads it. What is not vLLM here: the HTTP layer, the
scheduler (one request at a time) and the sampler (argmax, or a seeded softmax draw).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import DynamicCache

from s1kit.engines.base import cache_kwargs
from s1kit.integrations.processor import BudgetRows, RequestParams, check_request
from s1kit.integrations.sampling import RowSampling


class VLLMStandIn:
    """Serves ``model`` on a loopback port until ``close``; ``plugin`` runs s1kit's processor on every step."""

    def __init__(self, model, tokenizer, plugin: bool, name: str = "smollm2-135m", max_model_len: int = 2048):
        self.model, self.tokenizer, self.plugin, self.name = model, tokenizer, plugin, name
        self.max_model_len = max_model_len
        self.rows = BudgetRows(tokenizer, max_model_len)
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [
                        {"id": standin.name, "object": "model", "owned_by": "vllm", "max_model_len": max_model_len}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/completions":
                    return self._send(404, {"error": "not found"})
                try:
                    answer = standin.complete(body)
                except ValueError as e:
                    return self._send(400, {"error": {"message": str(e), "type": "BadRequestError", "code": 400}})
                if not body.get("stream"):
                    return self._send(200, answer)
                self.send_response(200)  # server-sent events: one chunk per token, then [DONE]
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                choice = answer["choices"][0]
                for k, token in enumerate(choice["token_ids"]):
                    last = k == len(choice["token_ids"]) - 1
                    text = standin.tokenizer.decode(choice["token_ids"][: k + 1], skip_special_tokens=False)
                    text = text[len(standin.tokenizer.decode(choice["token_ids"][:k], skip_special_tokens=False)):]
                    chunk = {"choices": [{"index": 0, "text": text, "token_ids": [token],
                                          "finish_reason": choice["finish_reason"] if last else None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()

    def _params(self, body: dict) -> RequestParams:
        eos = self.tokenizer.eos_token_id
        ending = set(body.get("stop_token_ids") or ()) | ({eos} if not body.get("ignore_eos") else set())
        return RequestParams(
            extra_args=body.get("vllm_xargs"),
            sampling=RowSampling(body.get("temperature", 1.0), body.get("top_p", 1.0), body.get("top_k", 0),
                                 body.get("min_p", 0.0)),
            seed=body.get("seed"), max_tokens=body["max_tokens"], ending_ids=frozenset(ending),
            penalties=(body.get("presence_penalty", 0.0), body.get("frequency_penalty", 0.0),
                       body.get("repetition_penalty", 1.0)))

    def complete(self, body: dict) -> dict:
        """One completion, decoded token by token as vLLM would (the processor on every step with ``plugin``)."""
        params = self._params(body)
        forcing = self.plugin and check_request(params) is not None  # ValueError -> 400
        prompt = list(body["prompt"])
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens {params.max_tokens} + prompt {len(prompt)} exceeds {self.max_model_len}")
        with self.lock:
            self.requests.append(body)
            out: list[int] = []
            logprobs: list[float] = []  # of each returned token, as vLLM gives them with ``logprobs``
            key = object()
            if forcing:
                self.rows.add(0, key, params, prompt, out)
            gen = torch.Generator().manual_seed(params.seed or 0)
            cache, ids = DynamicCache(), prompt
            finish = "length"
            with torch.inference_mode():
                while len(out) < params.max_tokens:
                    logits = self.model(torch.tensor([ids]), use_cache=True, **cache_kwargs(self.model, cache)).logits[:, -1]
                    logits = logits.float()
                    if forcing:
                        logits = self.rows.apply(logits)
                    if params.sampling.greedy:
                        token = int(logits.argmax(-1))
                    else:
                        probs = (logits / params.sampling.temperature).softmax(-1)
                        token = int(torch.multinomial(probs, 1, generator=gen))
                    out.append(token)
                    logprobs.append(float(logits.log_softmax(-1)[0, token]))
                    ids = [token]
                    if token in params.ending_ids:
                        finish = "stop"
                        break
            if forcing:
                self.rows.remove(0)
        text = self.tokenizer.decode(out, skip_special_tokens=bool(body.get("skip_special_tokens", True)))
        choice = {"index": 0, "text": text, "token_ids": out, "finish_reason": finish,
                  "stop_reason": out[-1] if finish == "stop" and out[-1] != self.tokenizer.eos_token_id else None}
        if body.get("logprobs") is not None:
            choice["logprobs"] = {"tokens": [self.tokenizer.decode([t]) for t in out], "token_logprobs": logprobs}
        return {"object": "text_completion", "model": self.name, "choices": [choice],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(out)}}
