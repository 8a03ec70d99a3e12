"""Fused sibling projections (q/k/v, gate/up) give the model its own outputs, and leave it as it was."""

import torch
from torch import nn

from s1kit.engines.fused import FusedProjections, SharedInputLinear


def _tiny_qwen2():
    """A small random Qwen2 (q/k/v with biases, grouped-query heads): the bias path SmolLM2 lacks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for name, p in model.named_parameters():  # from_config zeroes the biases; give them values to fuse
        if name.endswith("bias"):
            nn.init.normal_(p, std=0.1)
    return model


def _groups(fp):
    return {id(stand_in.group): stand_in.group for *_, stand_in in fp.swaps}.values()


def _check(model, ids, layers):
    with torch.no_grad():
        ref = model(ids).logits
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    fp = FusedProjections(model)
    assert len(fp.swaps) == layers * 5  # q, k, v and gate, up in every layer
    with torch.no_grad(), fp.active():
        attn = model.model.layers[0].self_attn
        assert isinstance(attn.q_proj, SharedInputLinear) and isinstance(model.model.layers[-1].mlp.up_proj,
                                                                         SharedInputLinear)
        out = model(ids).logits
        # every sibling took its slice of the fused GEMM (one computing alone would leave the group pending)
        assert all(g.pending == 0 and g.input is None for g in _groups(fp))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # the model's own modules are back
    now = dict(model.named_parameters())
    assert now.keys() == params.keys() and all(torch.equal(now[n], p) for n, p in params.items())


def test_fused_projections_on_the_real_smollm2(engine, tokenizer):
    ids = tokenizer("Let x be the least prime above 20. Then", return_tensors="pt").input_ids
    _check(engine.model, ids, engine.model.config.num_hidden_layers)


def test_fused_projections_with_biases():
    _check(_tiny_qwen2(), torch.tensor([[5, 17, 200, 3, 9], [1, 2, 3, 4, 5]]), 2)


def test_a_sibling_called_on_another_input_computes_alone():
    """Out-of-order or cross-input calls (not the Llama pattern) fall back to each linear's own GEMM."""
    torch.manual_seed(0)
    parent = nn.Module()
    parent.gate_proj, parent.up_proj = nn.Linear(8, 5, bias=False), nn.Linear(8, 5, bias=False)
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    want_gate, want_up = parent.gate_proj(x), parent.up_proj(y)
    fp = FusedProjections(parent)
    with torch.no_grad(), fp.active():
        up_first = parent.up_proj(y)  # before gate: computes alone
        gate = parent.gate_proj(x)  # fused, pending its sibling's slice
        up = parent.up_proj(y)  # another input: alone, not x's slice
    torch.testing.assert_close(up_first, want_up)
    torch.testing.assert_close(gate, want_gate)
    torch.testing.assert_close(up, want_up)


def test_linears_that_differ_are_not_fused():
    parent = nn.Module()
    parent.gate_proj, parent.up_proj = nn.Linear(8, 5, bias=False), nn.Linear(8, 5, bias=True)
    assert FusedProjections(parent).swaps == []
