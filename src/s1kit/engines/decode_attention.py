"""Split-K decode attention over a slot cache, reading only the columns each slot has in use (Triton).

A decode step's query is one token per slot; the slot cache holds ``length`` columns, most of them unused early
in a generation. SDPA reads every column (the static shape a CUDA graph needs), so its cost grows with the cache
and not with the context. Here each slot's loop stops at its own last column, read from a tensor at run time,
so the launch shape stays fixed for graph capture while the bytes read follow the real context. The columns are
split in chunks across programs (flash-decoding), so a long context is read by many programs at once; a second
kernel merges the chunks' partial softmaxes. The G query heads of a KV group are the rows of one ``tl.dot``.

Runs on CUDA, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI tests it.
"""

from __future__ import annotations

import os

import torch

triton = None
if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":  # else not worth its import time
    try:
        import triton
        import triton.language as tl
    except ImportError:  # the CPU wheel of torch comes without Triton; callers fall back to SDPA
        triton = None

CHUNK = 256  # columns per program: one slot-head's context of 4K columns is 16 programs
BLOCK = 64  # columns per inner iteration


def _tileable(head_dim: int) -> bool:
    return head_dim >= 16 and not head_dim & (head_dim - 1)  # tl.dot tiles: a power of two, at least 16


def available(query: torch.Tensor) -> bool:
    """Whether the kernel can run for ``query``: Triton is importable, the tensor is on a GPU and the head size
    is a power of two >= 16 (other models decode through SDPA)."""
    return triton is not None and query.is_cuda and _tileable(query.shape[-1])


if triton is not None:

    @triton.jit
    def _partial(q_ptr, k_ptr, v_ptr, mask_ptr, last_ptr, acc_ptr, m_ptr, l_ptr, scale,
                 sq_b, sq_h, sq_g, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b,
                 HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                 CHUNK_: tl.constexpr, BLOCK_: tl.constexpr, PREC: tl.constexpr):
        bh = tl.program_id(0)
        s = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        n = tl.load(last_ptr + b) + 1  # columns [0, n) hold this slot's context
        start = s * CHUNK_
        if start < n:
            g = tl.arange(0, GP)
            d = tl.arange(0, D)
            q = tl.load(q_ptr + b * sq_b + h * sq_h + g[:, None] * sq_g + d[None, :], mask=g[:, None] < G, other=0.0)
            m_i = tl.full([GP], float("-inf"), tl.float32)
            l_i = tl.zeros([GP], tl.float32)
            acc = tl.zeros([GP, D], tl.float32)
            end = tl.minimum(start + CHUNK_, n)
            for off in range(start, end, BLOCK_):
                cols = off + tl.arange(0, BLOCK_)
                ok = cols < end
                k = tl.load(k_ptr + b * sk_b + h * sk_h + cols[:, None] * sk_n + d[None, :], mask=ok[:, None], other=0.0)
                v = tl.load(v_ptr + b * sv_b + h * sv_h + cols[:, None] * sv_n + d[None, :], mask=ok[:, None], other=0.0)
                # The additive mask (0 or the dtype's minimum) is finite, so a chunk of masked columns stays NaN-free.
                add = tl.load(mask_ptr + b * sm_b + cols, mask=ok, other=float("-inf")).to(tl.float32)
                # (inductor passes a float argument as fp64: cast, or the loop's carried types would change)
                sc = (tl.dot(q, tl.trans(k), input_precision=PREC) * scale).to(tl.float32) + add[None, :]
                m_new = tl.maximum(m_i, tl.max(sc, 1))
                p = tl.exp(sc - m_new[:, None])
                alpha = tl.exp(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
                m_i = m_new
            row = bh * SPLITS + s
            tl.store(acc_ptr + (row * GP + g[:, None]) * D + d[None, :], acc)
            tl.store(m_ptr + row * GP + g, m_i)
            tl.store(l_ptr + row * GP + g, l_i)

    @triton.jit
    def _merge(acc_ptr, m_ptr, l_ptr, last_ptr, out_ptr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
               D: tl.constexpr, SPLITS: tl.constexpr, CHUNK_: tl.constexpr):
        bh = tl.program_id(0)
        n = tl.load(last_ptr + bh // HKV) + 1
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        m = tl.full([GP], float("-inf"), tl.float32)
        l_sum = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for s in range(0, tl.cdiv(n, CHUNK_)):  # only the chunks that ran wrote partials
            row = bh * SPLITS + s
            m_s = tl.load(m_ptr + row * GP + g)
            m_new = tl.maximum(m, m_s)
            a = tl.exp(m - m_new)
            w = tl.exp(m_s - m_new)
            l_sum = l_sum * a + tl.load(l_ptr + row * GP + g) * w
            acc = acc * a[:, None] + tl.load(acc_ptr + (row * GP + g[:, None]) * D + d[None, :]) * w[:, None]
            m = m_new
        out = acc / l_sum[:, None]
        tl.store(out_ptr + (bh * G + g[:, None]) * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=g[:, None] < G)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                     last: torch.Tensor, scale: float, chunk: int = CHUNK, block: int = BLOCK,
                     warps: int = 4, stages: int = 3) -> torch.Tensor:
    """Attention of ``query`` [B, Hkv, G, D] over columns ``[0, last[b]]`` of ``key``/``value`` [B, Hkv, L, D].

    ``mask`` [B, L] is additive (0 = attend, a large negative = masked); returns [B, Hkv, G, D] in query's dtype.
    ``last`` must be < L (unchecked: checking would cost a device sync; the slot cache clamps its columns).
    """
    b, hkv, g, d = query.shape
    length = key.shape[2]
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1 or mask.stride(-1) != 1:
        raise ValueError("decode_attention needs the last dimension of query, key, value and mask contiguous")
    if not _tileable(d):
        raise ValueError(f"decode_attention needs a power-of-two head size >= 16, got {d}")
    gp = max(16, triton.next_power_of_2(g))  # tl.dot wants at least 16 rows
    splits = triton.cdiv(length, chunk)
    dev = query.device
    acc = torch.empty(b * hkv * splits * gp * d, dtype=torch.float32, device=dev)
    m = torch.empty(b * hkv * splits * gp, dtype=torch.float32, device=dev)
    l_ = torch.empty_like(m)
    out = torch.empty(b, hkv, g, d, dtype=query.dtype, device=dev)
    _partial[(b * hkv, splits)](query, key, value, mask, last, acc, m, l_, scale,
                                query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1),
                                key.stride(2), value.stride(0), value.stride(1), value.stride(2), mask.stride(0),
                                HKV=hkv, G=g, GP=gp, D=d, SPLITS=splits, CHUNK_=chunk, BLOCK_=block,
                                PREC="ieee" if query.dtype == torch.float32 else "tf32",  # fp32 stays fp32
                                num_warps=warps, num_stages=stages)
    _merge[(b * hkv,)](acc, m, l_, last, out, HKV=hkv, G=g, GP=gp, D=d, SPLITS=splits, CHUNK_=chunk)
    return out
