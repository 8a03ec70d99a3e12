"""The in-process llama.cpp engine (``--engine llamacpp``) on the bundled SmolLM2-135M GGUF, its Q4_1 weights as
shipped: exact budgets with rows of different policies decoding together, no cross-talk between sequences that
share the KV pool, and greedy tokens equal to the s1 stop-and-continue loop run on llama.cpp (the loop the remote
engine's llama.cpp-server test holds it to, so the two engines agree on the same GGUF)."""

import json
import os
import subprocess
import sys

import pytest

from s1kit import BUNDLED, BudgetPolicy, Request, SamplingParams, ThinkingFormat
from s1kit.budget import EarlyExit
from s1kit.models import bundled_files

from reference import llama_cpp_requests, stop_and_continue

pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by `make test`")

THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
PLAIN = ThinkingFormat("plain", think_open="", stop_tokens=("<|im_end|>",), answer_open="<|im_start|>answer\n",
                       end_tokens=("<|im_end|>",))


def exact(n, answer=6):
    return BudgetPolicy(min_thinking_tokens=n, max_thinking_tokens=n, max_answer_tokens=answer)


@pytest.fixture(scope="module")
def llama():
    from s1kit.engines.llamacpp import LlamaCppEngine

    e = LlamaCppEngine.load("smollm2-135m", batch_size=4, threads=THREADS, max_model_len=1024)
    yield e
    e.close()


def test_budgets_are_exact_with_different_policies_decoding_together(llama):
    ee = EarlyExit(every=8, agree=2, probe_tokens=6)
    reqs = [
        Request("Explain why the sky is blue.", exact(37), PLAIN),
        Request("What is 17*23?", BudgetPolicy(num_waits=2, max_thinking_tokens=48, max_answer_tokens=8), PLAIN),
        Request("Name a prime.", BudgetPolicy(max_thinking_tokens=0, max_answer_tokens=5)),
        Request("Tell me about cats.", BudgetPolicy(max_thinking_tokens=12, cap_grace=24, max_answer_tokens=4), PLAIN),
        Request("What is 2+2?", BudgetPolicy(max_thinking_tokens=64, early_exit=ee, max_answer_tokens=6), PLAIN),
        Request("Hi", exact(5), sampling=SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=3, n=2)),
    ]
    out = llama.generate(reqs)
    assert [(c.request_index, c.sample_index) for c in out] == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (5, 1)]
    assert out[0].thinking_tokens == 37 and out[0].hit_cap
    assert out[1].waits_used == 2 and out[1].thinking_tokens <= 48
    assert out[2].thinking_tokens == 0 and out[2].hit_cap and out[2].answer.startswith("Final Answer:")
    assert 12 <= out[3].thinking_tokens <= 36  # the sentence may end within the grace window
    assert out[4].probe_tokens > 0 and out[4].thinking_tokens <= 64
    assert all(c.thinking_tokens == 5 for c in out[5:]) and out[5].token_ids != out[6].token_ids
    assert all(c.answer_tokens <= r.policy.max_answer_tokens for c, r in zip(out, reqs + reqs[-1:]))
    again = llama.generate(reqs)  # a rerun repeats (seeded samples too: llama.cpp's numbers depend on the batch)
    assert [c.token_ids for c in again] == [c.token_ids for c in out]
    assert llama.used_cells == 0 and not llama._rows  # every sequence's cells were freed


def test_stop_thinking_and_abort_through_the_core(llama):
    a = llama.add(Request("Tell me about dogs.", BudgetPolicy(max_thinking_tokens=200, max_answer_tokens=4), PLAIN))
    b = llama.add(Request("Tell me about birds.", exact(150), PLAIN))
    while len(a.rows[0].trace.thinking_ids) < 10:
        llama.step()
    llama.stop_thinking(a)
    llama.abort(b)
    while llama.has_work:
        llama.step()
    [ca], [cb] = a.completions(), b.completions()
    assert 10 <= ca.thinking_tokens <= 11 and ca.hit_cap and ca.answer.startswith("Final Answer:")
    assert cb.finish_reason == "cancelled" and cb.thinking_tokens < 150
    assert llama.used_cells == 0


def test_a_probe_leaves_no_trace_in_its_sequence(llama):
    """Early-exit probes decode on the row's own sequence and then remove those cells: with a rule that never
    settles, the row's tokens are those of the same request without early exit."""
    never = EarlyExit(every=8, agree=1000, probe_tokens=4)
    plain = Request("Explain why the sky is blue.", BudgetPolicy(max_thinking_tokens=40, max_answer_tokens=6), PLAIN)
    probed = Request("Explain why the sky is blue.", BudgetPolicy(max_thinking_tokens=40, max_answer_tokens=6,
                                                                  early_exit=never), PLAIN)
    [a], [b] = llama.generate([plain]), llama.generate([probed])
    assert b.probe_tokens > 0  # probes ran (at 8, 16, 24 and 32 thinking tokens)
    assert a.token_ids == b.token_ids and not b.early_exit


def test_a_sequence_does_not_hear_its_neighbours(llama):
    """The same request beside two different neighbours of the same length gives the same tokens: sequences share
    the KV pool and every batch, never each other's cells. (llama.cpp's numbers do depend on the batch's shape, so
    the neighbours keep the same shape while it decodes: they outlive it by construction.)"""
    mine = Request("A train travels 60 km in 45 minutes. What is its average speed?", exact(30), PLAIN)
    ids_b = llama.prepare(Request("Tell me a story about a dragon and a knight.", exact(60), PLAIN)).prompt_ids
    zebra = llama.tokenizer.encode(" zebra")[0]
    ids_c = ids_b[:20] + [zebra] * 10 + ids_b[30:]

    def beside(ids):
        h = llama.add(mine)
        other = llama.add(Request("", exact(60), PLAIN), prepared=llama.prepare(
            Request("x", exact(60), PLAIN))._replace(prompt_ids=ids))
        while llama.has_work:
            llama.step()
        return h.completions()[0].token_ids, other.completions()[0].token_ids

    (t1, o1), (t2, o2) = beside(ids_b), beside(ids_c)
    assert t1 == t2 and o1 != o2


def test_greedy_one_at_a_time_equals_the_s1_loop_on_llama_cpp():
    """The requests of the remote engine's llama.cpp test (caps, minimums, 0-2 Waits, a wait string that ends the
    turn, cap 0, no forcing), greedy, one at a time: the same tokens and counts as the stop-and-continue loop on
    llama.cpp in this process, whose every call re-reads its prefix."""
    import llama_cpp

    from s1kit.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine.load("smollm2-135m", batch_size=1, threads=THREADS, max_model_len=2048)
    llm = llama_cpp.Llama(model_path=str(bundled_files(BUNDLED["smollm2-135m"])[0]), n_ctx=2048, n_threads=THREADS,
                          verbose=False)

    def complete(ids, max_new, stop):
        out = []
        for tok in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if tok in stop or len(out) >= max_new:
                break
        return out

    requests = llama_cpp_requests(PLAIN)
    try:
        for req in requests:
            [c] = engine.generate([req])
            ids, tokens, cap = engine.prepare(req)
            ref = stop_and_continue(ids, req.policy, tokens, complete, cap)
            assert c.token_ids == ref.token_ids, f"mismatch for {req.policy} / {req.format.name}"
            assert (c.thinking_tokens, c.waits_used, c.hit_cap, c.finish_reason) == (
                len(ref.thinking_ids), ref.waits_used, ref.hit_cap, ref.finish_reason)
    finally:
        llm.close()
        engine.close()


def test_cli_generate_on_llamacpp_and_its_refusals():
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}

    def s1kit(*args):
        return subprocess.run([sys.executable, "-m", "s1kit.cli", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    r = s1kit("generate", "--engine", "llamacpp", "--json", "--min-thinking", "40", "--max-thinking", "40",
              "--max-answer", "8", "What is 17*23?")
    assert r.returncode == 0, r.stderr
    [c] = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert c["thinking_tokens"] == 40 and c["hit_cap"]
    for args, message in [(["--dtype", "float32"], "--dtype is only used with --engine hf"),
                          (["--device", "cuda"], "runs on the CPU"),
                          (["--model", "HuggingFaceTB/SmolLM2-135M"], "runs GGUF files")]:
        r = s1kit("generate", "--engine", "llamacpp", *args, "Hi")
        assert r.returncode == 2 and r.stderr.count("error:") == 1 and message in r.stderr, r.stderr


def test_chat_picks_llamacpp_for_a_gguf_model_on_the_cpu():
    """``s1kit chat --engine auto`` (its default): llama.cpp for a bundled or .gguf model on the CPU, else hf."""
    from s1kit.cli.engine import auto_engine

    assert auto_engine("smollm2-135m", None, None)[0] == ("hf" if __import__("torch").cuda.is_available() else "llamacpp")
    assert auto_engine("smollm2-135m", "cpu", None) == ("llamacpp", "a GGUF model on the CPU")
    assert auto_engine("smollm2-135m", "cpu", "float32")[0] == "hf"
    assert auto_engine("HuggingFaceTB/SmolLM2-135M", "cpu", None) == ("hf", "not a GGUF model")
