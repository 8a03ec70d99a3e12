"""The remote engine against a real llama.cpp server (llama-cpp-python[server], built by ``make test``) on
loopback, serving the bundled SmolLM2-135M GGUF: exact budgets, token-for-token equality with the s1 loop
run on llama.cpp in this process, concurrency, clear errors, and a sweep that survives a killed server."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from s1kit import BUNDLED, BudgetPolicy, Request, S1KitError, SamplingParams, ThinkingFormat
from s1kit.data.benchmarks import load_benchmark
from s1kit.engines.remote import RemoteEngine
from s1kit.evaluate.sweep import build_grid, run_sweep
from s1kit.models import bundled_files

from reference import llama_cpp_requests, stop_and_continue

ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
THREADS = 2
# Free text until the end of the turn (as in test_engine): long thinking that the model ends itself.
PLAIN = ThinkingFormat("plain", think_open="", stop_tokens=("<|im_end|>",), answer_open="<|im_start|>answer\n",
                       end_tokens=("<|im_end|>",))


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama-cpp-python is not installed: run `make test` (it builds the wheel once into .wheels/)")
    return llama_cpp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """``python -m llama_cpp.server`` on a loopback port, started and killed by the tests."""

    def __init__(self, gguf: str, port: int) -> None:
        self.gguf, self.port = gguf, port
        self.url = f"http://127.0.0.1:{port}/v1"
        self.proc = None

    def start(self) -> None:
        _llama_cpp()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", self.gguf, "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", "2048", "--n_threads", str(THREADS), "--logits_all", "False", "--verbose", "False"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"llama.cpp server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/models", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        pytest.fail("llama.cpp server did not start within 120 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def gguf():
    return str(bundled_files(BUNDLED["smollm2-135m"])[0])


@pytest.fixture(scope="module")
def server(gguf):
    s = LlamaServer(gguf, free_port())
    s.start()
    yield s
    s.kill()


@pytest.fixture(scope="module")
def remote(server):
    with pytest.warns(RuntimeWarning, match="does not take token-id prompts"):  # llama-cpp-python: text only
        engine = RemoteEngine(server.url, "smollm2-135m", concurrency=8)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def reference(gguf, remote):
    """The s1 loop's ``complete`` on llama.cpp in this process, greedy, recording how each call ended.

    llama-cpp-python's server takes prompts as text only, so this reads each prefix the way the server
    does: as the text of the ids, tokenized by llama.cpp (where llama.cpp's tokenizer merges differently
    from the local one, e.g. a forced "\n" before a "\n", both sides see the same tokens)."""
    llm = _llama_cpp().Llama(model_path=gguf, n_ctx=2048, n_threads=THREADS, verbose=False)
    ends = []

    def complete(ids, max_new, stop):
        text = remote.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out = []
        for tok in llm.generate(llm.tokenize(text.encode(), add_bos=False, special=True), temp=0.0,
                                repeat_penalty=1.0, reset=True):
            out.append(tok)
            if tok in stop or len(out) >= max_new:
                break
        ends.append(out[-1] if out else None)
        return out

    complete.ends = ends
    yield complete
    llm.close()


def s1kit(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "s1kit.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def test_greedy_remote_equals_the_reference_loop_on_llama_cpp(remote, reference):
    im_start = remote.tokenizer.convert_tokens_to_ids("<|im_start|>")
    requests = llama_cpp_requests(PLAIN)
    # One request at a time: llama.cpp's logits depend on whether the prefix was decoded token by token or
    # re-read in a batch, and the server keeps only the last request's prefix. In order, it sees exactly
    # the calls the reference makes.
    remote.concurrency = 1
    try:
        completions = remote.generate(requests)
    finally:
        remote.concurrency = 8
    assert [(c.request_index, c.sample_index) for c in completions] == [(i, 0) for i in range(len(requests))]
    for req, c in zip(requests, completions):
        ids, tokens, cap = remote.prepare(req)
        ref = stop_and_continue(ids, req.policy, tokens, reference, cap)
        assert c.token_ids == ref.token_ids, f"mismatch for {req.policy} / {req.format.name}"
        assert (c.thinking_tokens, c.waits_used, c.hit_cap, c.finish_reason) == (
            len(ref.thinking_ids), ref.waits_used, ref.hit_cap, ref.finish_reason)
    # the comparison covered caps, 0-2 waits, minimums, and a stop the server hid
    assert {c.waits_used for c in completions} >= {0, 1, 2}
    assert any(c.hit_cap for c in completions) and any(not c.hit_cap for c in completions)
    assert im_start in reference.ends
    # llama.cpp in this process (--engine llamacpp) on the same GGUF, one request at a time: the server's tokens
    from s1kit.engines.llamacpp import LlamaCppEngine

    local = LlamaCppEngine.load("smollm2-135m", batch_size=1, threads=THREADS, max_model_len=2048)
    try:
        for req, c in zip(requests, completions):
            [mine] = local.generate([req])
            assert (mine.token_ids, mine.thinking_tokens, mine.waits_used, mine.hit_cap, mine.finish_reason) == (
                c.token_ids, c.thinking_tokens, c.waits_used, c.hit_cap, c.finish_reason)
    finally:
        local.close()


def test_cap_min_and_waits_are_exact_on_the_server(remote):
    reqs = [
        Request("What is 17*23?", BudgetPolicy(min_thinking_tokens=40, max_thinking_tokens=40, max_answer_tokens=8)),
        Request("Count from one to fifty in words.", BudgetPolicy(max_thinking_tokens=32, max_answer_tokens=8), PLAIN),
        Request("Name a prime.", BudgetPolicy(min_thinking_tokens=30, max_answer_tokens=8)),
        Request("What is 17*23?", BudgetPolicy(num_waits=3, max_thinking_tokens=400, max_answer_tokens=8)),
        Request("What is 17*23?", BudgetPolicy(max_thinking_tokens=0, max_answer_tokens=8)),
    ]
    exact, capped, minimum, waited, zero = remote.generate(reqs)
    assert exact.thinking_tokens == 40 and exact.hit_cap and exact.answer.startswith("Final Answer:")
    assert capped.thinking_tokens == 32 and capped.hit_cap
    assert minimum.thinking_tokens >= 30 and minimum.waits_used >= 1 and not minimum.hit_cap
    assert waited.waits_used == 3 and not waited.hit_cap
    assert zero.thinking_tokens == 0 and zero.answer.startswith("Final Answer:")
    assert "<|im_start|>answer\nFinal Answer:" in remote.tokenizer.decode(exact.token_ids)


def test_seeded_samples_are_reproducible_and_n_gives_n(remote):
    req = Request("Tell me a short story about a cat.", BudgetPolicy(max_thinking_tokens=12, max_answer_tokens=4),
                  PLAIN, SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, n=3))
    a = remote.generate([req, req])
    assert [(c.request_index, c.sample_index) for c in a] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert len({tuple(c.token_ids) for c in a[:3]}) == 3  # one seed per sample
    # Same seed, same samples; one request at a time, since interleaved requests make llama.cpp re-read
    # prefixes in batches, which moves the logits by rounding (and can flip a sampled token).
    remote.concurrency = 1
    try:
        b, c = remote.generate([req]), remote.generate([req])
    finally:
        remote.concurrency = 8
    assert [x.token_ids for x in b] == [x.token_ids for x in c]
    assert [x.thinking_tokens for x in b] == [12, 12, 12]


def test_sweep_keeps_eight_requests_in_flight(remote, tmp_path):
    bench = load_benchmark("gsm8k", limit=8)
    settings = build_grid(["budget"], [16], max_answer=8)
    remote.client.peak_in_flight = 0
    records = run_sweep(remote, bench, settings, tmp_path, chunk=16)
    assert len(records) == 8 and remote.peak_in_flight == 8
    assert all(r["thinking_tokens"] <= 16 for r in records)


def test_cli_generate_remote_exact_budget(server, remote):
    r = s1kit("generate", "--engine", "remote", "--base-url", server.url, "--model", "smollm2-135m", "--json",
              "--min-thinking", "40", "--max-thinking", "40", "--max-answer", "8", "What is 17*23?")
    assert r.returncode == 0, r.stderr
    (c,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert c["thinking_tokens"] == 40 and c["hit_cap"]


def test_unreachable_or_wrong_server_is_one_clear_line(tmp_path):
    port = free_port()  # nothing listens there
    with pytest.raises(S1KitError, match=r"cannot reach the server at .* \(gave up after 2 tries\)"):
        RemoteEngine(f"http://127.0.0.1:{port}/v1", "smollm2-135m", retries=1, backoff=0.01)
    r = s1kit("generate", "--engine", "remote", "--base-url", f"http://127.0.0.1:{port}/v1", "Hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert f"cannot reach the server at http://127.0.0.1:{port}/v1" in r.stderr
    # an HTTP server that is not an OpenAI-compatible one
    web = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                            "--directory", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        r = s1kit("eval", "--engine", "remote", "--base-url", f"http://127.0.0.1:{port}/v1", "--limit", "2",
                  "--out", str(tmp_path / "ev"))
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert f"http://127.0.0.1:{port}/v1/completions refused the request (HTTP 501)" in r.stderr
    finally:
        web.kill()
        web.wait()
    for args, message in [
        (["--engine", "remote"], "--engine remote needs --base-url"),
        (["--engine", "remote", "--base-url", "127.0.0.1:8080"], "must start with http://"),
        (["--engine", "remote", "--base-url", "http://127.0.0.1:1/v1", "--concurrency", "0"], "concurrency must be"),
        (["--engine", "grpc"], "unknown engine 'grpc'"),
        (["--base-url", "http://127.0.0.1:1/v1"], "--base-url is only used with --engine remote"),
    ]:
        r = s1kit("generate", *args, "Hi")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_killed_server_records_nothing_partial_and_a_rerun_completes(server, remote, tmp_path):
    out = tmp_path / "killed"
    store = out / "samples.jsonl"
    args = ["eval", "--engine", "remote", "--base-url", server.url, "--benchmark", "gsm8k", "--limit", "6",
            "--max-thinking", "16,32", "--max-answer", "8", "--concurrency", "2", "--out", str(out)]
    # 12 samples, each stored as it completes (2 in flight): kill the server once 4 are stored
    p = subprocess.Popen([sys.executable, "-m", "s1kit.cli", *args], env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and (not store.exists() or store.read_text().count("\n") < 4):
            time.sleep(0.05)
        server.kill()
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
        server.start()
    assert p.returncode == 2 and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if not x.startswith(("warning: ", "format ", "evaluating"))]  # not progress
    assert line.startswith(f"error: cannot reach the server at {server.url}")
    text = store.read_text()
    assert text.endswith("\n")  # no half-written line
    kept = [json.loads(line) for line in text.splitlines()]
    assert 4 <= len(kept) < 12  # finished samples only: the ones in flight were not recorded
    assert all("correct" in k and k["finish_reason"] for k in kept)  # graded, finished samples
    r = s1kit(*args)
    assert r.returncode == 0, r.stderr
    done = [json.loads(line) for line in store.read_text().splitlines()]
    assert done[: len(kept)] == kept and len(done) == 12
    assert len({(d["setting"], d["item_id"]) for d in done}) == 12  # every (setting, item) once
    assert json.loads((out / "summary.json").read_text())["control"] == 1.0


def test_s1kit_server_in_front_of_a_remote_engine(remote):
    """`s1kit serve --engine remote`: the server's worker steps the remote engine's core like any other."""
    import threading
    import time

    import httpx
    import uvicorn

    from s1kit.serve import create_app

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(remote, "smollm2-135m"), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        while not srv.started:
            assert thread.is_alive()
            time.sleep(0.05)
        body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "What is 17*23?"}],
                "max_answer_tokens": 6, "temperature": 0, "thinking_budget": {"min_tokens": 20, "max_tokens": 20}}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=300).json()
        assert r["usage"]["completion_tokens_details"]["reasoning_tokens"] == 20
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json={**body, "stream": True},
                          timeout=300) as s:
            chunks = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks if c["choices"])
        assert text == r["choices"][0]["message"]["reasoning_content"]
    finally:
        srv.should_exit = True
        thread.join(60)


def test_early_exit_on_the_remote_engine_probes_by_side_requests(remote):
    """Early exit every N tokens: each probe is a side request on the sequence's context; a settled probe closes
    thinking exactly as a cap at that count (same tokens as the capped request on the same server)."""
    from s1kit.budget import EarlyExit

    forced = "Final Answer: \\boxed{42}"  # every probe answers 42: one probe settles (agree=1)
    exit_at_8 = BudgetPolicy(max_thinking_tokens=40, max_answer_tokens=4, answer_prefix=forced,
                             early_exit=EarlyExit(every=8, agree=1, probe_tokens=4))
    never = BudgetPolicy(max_thinking_tokens=24, max_answer_tokens=4,
                         early_exit=EarlyExit(every=8, agree=1000, probe_tokens=4))
    prompt = "Write a long story about a dragon who learns to count."
    c, capped, probed, plain = remote.generate([Request(prompt, p, PLAIN) for p in (
        exit_at_8, BudgetPolicy(max_thinking_tokens=8, max_answer_tokens=4, answer_prefix=forced),
        never, BudgetPolicy(max_thinking_tokens=24, max_answer_tokens=4))])
    assert (c.thinking_tokens, c.early_exit, c.hit_cap) == (8, True, False) and c.probe_tokens > 0
    assert c.token_ids == capped.token_ids and c.answer.startswith(forced)
    # probes at 8 and 16 change nothing (the calls split there, and a text-only server re-reads the text, so
    # only the first call's tokens are compared)
    assert probed.token_ids[:8] == plain.token_ids[:8] and probed.probe_tokens > 0
    assert (probed.thinking_tokens, probed.early_exit, probed.hit_cap) == (24, False, True)


def test_a_graceful_cap_on_llama_cpp_ends_the_sentence_within_its_window(remote):
    """The remote loop steps ``BudgetState`` over each call, so the grace window works on any server: past the cap
    thinking goes on until a sentence or line ends (at most ``cap_grace`` more tokens), then closes as a cap."""
    prompt = "Write a long story about a dragon who learns to count."
    hard, graced = remote.generate([Request(prompt, BudgetPolicy(max_thinking_tokens=10, max_answer_tokens=3), PLAIN),
                                    Request(prompt, BudgetPolicy(max_thinking_tokens=10, cap_grace=40,
                                                                 max_answer_tokens=3), PLAIN)])
    extra = graced.thinking_tokens - 10
    assert hard.thinking_tokens == 10 and 0 < extra <= 40 and graced.hit_cap, graced.thinking
    assert graced.token_ids[:10] == hard.token_ids[:10]
    last = remote.tokenizer.decode(graced.token_ids[graced.thinking_tokens - 1:graced.thinking_tokens])
    assert extra == 40 or last.rstrip(" \t\"')]*")[-1:] in (".", "!", "?") or last.endswith("\n"), last


def test_policies_the_remote_engine_lacks_are_refused_not_ignored(remote):
    from s1kit import S1KitError
    from s1kit.budget import EarlyExit

    for policy, message in ((BudgetPolicy(max_thinking_tokens=32, early_exit=EarlyExit(words=("Wait",))),
                             "stops on token ids"),
                            # llama-cpp-python's server, started without --logits_all, refuses logprobs (HTTP 500)
                            (BudgetPolicy(max_thinking_tokens=32, early_exit=EarlyExit(every=8, confidence=0.9)),
                             "logprobs")):
        with pytest.raises(S1KitError, match=message):
            remote.generate([Request("Write a long story about a dragon who learns to count.", policy, PLAIN)])