"""One query token's attention over a static KV cache, split along the keys (Triton).

At decode time each KV head serves g query heads with one query token each, so the work of a
(batch row, KV head) pair is a (g, D) x (D, L) product, a softmax over L keys and a (g, L) x (L, D)
product: a few tens of KB to read, too little for one kernel to keep a GPU busy, and PyTorch's SDPA
spends about 17 us per layer on it (cuDNN on an H200, Qwen2.5-1.5B's heads, batch 1, 576 keys:
benchmarks/results/decode_speed/profile_1.5b_b1_fused.txt), far above the time to read the keys.
As in flash-decoding, the keys are split into S chunks and

  pass 1, grid (B * H_kv, S):  for chunk s, over its keys n (masked keys excluded)
      m_s = max_n q.k_n * scale,  l_s = sum_n exp(q.k_n * scale - m_s),
      o_s = sum_n exp(q.k_n * scale - m_s) v_n                       (g rows at once, fp32)
  pass 2, grid (B * H_kv,):    m = max_s m_s,  w_s = exp(m_s - m),
      o = sum_s w_s o_s / sum_s w_s l_s

so the g query heads of a KV head read its keys once (no K/V replication), the scores and the
softmax are fp32 (as SDPA's math), and a row whose keys are all masked gives zeros, not NaN.

``decode_attention`` needs Triton: on a GPU it runs the compiled kernels; on a CPU only under
Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is imported), which is how the
tests check it against the reference ``attention_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

BLOCK_N = 64  # keys per inner block (a tl.dot needs 16 or more along every side)
PROGRAMS = 256  # pass 1 aims for about this many programs: two per SM on an H100 or H200
MAX_SPLITS = 32  # pass 2 unrolls its loop over the chunks


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """q (B, H_kv, g, D), k/v (B, H_kv, L, D), mask (B, 1, 1, L) bool -> (B, H_kv, g, D); fp32
    scores and softmax, as the Decoder's "math" attention."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H_kv, g, L)
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return (p @ v.float()).to(q.dtype)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """q (B, H_kv, g, D), k/v (B, H_kv, L, D) (any strides with a unit last one), mask
    (B, 1, 1, L) bool -> (B, H_kv, g, D) in q's dtype."""
    B, H, G, D = q.shape
    L = k.shape[2]
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("decode_attention needs keys and values with a unit stride along D")
    q = q.contiguous()
    mask = mask.reshape(B, L)
    block_g = max(16, triton.next_power_of_2(G))
    block_d = max(16, triton.next_power_of_2(D))
    blocks = triton.cdiv(L, BLOCK_N)
    # key blocks per chunk: about PROGRAMS programs in pass 1, at most MAX_SPLITS chunks to combine
    per_split = max(triton.cdiv(blocks * B * H, PROGRAMS), triton.cdiv(blocks, MAX_SPLITS))
    S = triton.cdiv(blocks, per_split)
    # fp32 partials of pass 1: (B * H_kv, S, g, D) and (B * H_kv, S, g)
    o_part = torch.empty(B * H, S, G, D, device=q.device, dtype=torch.float32)
    m_part = torch.empty(B * H, S, G, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    out = torch.empty_like(q)
    ieee = q.dtype == torch.float32  # fp32 models compute in fp32 (no TF32), as the other paths
    _partials[(B * H, S)](
        q, k, v, mask, o_part, m_part, l_part, scale, L, H, G, D,
        *k.stride()[:3], *v.stride()[:3], *mask.stride(),
        SPLIT=per_split * BLOCK_N, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=BLOCK_N, IEEE=ieee,
        num_stages=2)  # one or a few key blocks per program: deeper pipelining only costs shared memory
    _combine[(B * H,)](o_part, m_part, l_part, out, G, D, S=S, BLOCK_G=block_g, BLOCK_D=block_d)
    return out


@triton.jit
def _partials(q, k, v, mask, o_part, m_part, l_part, scale, L, H, G, D,
              skb, skh, skn, svb, svh, svn, smb, smn, SPLIT: tl.constexpr,
              BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    bh, s = tl.program_id(0).to(tl.int64), tl.program_id(1)  # int64 offsets: a cache may pass 2^31
    b, h = bh // H, bh % H
    S = tl.num_programs(1)  # noqa: N806 (the formula's name)
    rg, rd = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    gd = (rg[:, None] < G) & (rd[None, :] < D)
    qt = tl.load(q + (bh * G + rg[:, None]) * D + rd[None, :], mask=gd, other=0.0)  # (BG, BD)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for i in range(0, SPLIT, BLOCK_N):  # the last chunk may run past L: those keys are masked
        n = s * SPLIT + i + tl.arange(0, BLOCK_N)
        keep = (n < L) & (tl.load(mask + b * smb + n * smn, mask=n < L, other=0) != 0)  # (BN,)
        nd = (n[:, None] < L) & (rd[None, :] < D)
        kt = tl.load(k + b * skb + h * skh + n[:, None] * skn + rd[None, :], mask=nd, other=0.0)
        vt = tl.load(v + b * svb + h * svh + n[:, None] * svn + rd[None, :], mask=nd, other=0.0)
        if IEEE:
            sc = tl.dot(qt, tl.trans(kt), input_precision="ieee")
        else:
            sc = tl.dot(qt, tl.trans(kt))
        # inside torch.compile a Python float reaches the kernel as fp64: the scores stay fp32
        sc = tl.where(keep[None, :], (sc * scale).to(tl.float32), float("-inf"))  # (BG, BN)
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key kept yet: exp(-inf) = 0
        p = tl.exp(sc - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    row = bh * S + s
    tl.store(o_part + (row * G + rg[:, None]) * D + rd[None, :], acc, mask=gd)
    tl.store(m_part + row * G + rg, m_i, mask=rg < G)
    tl.store(l_part + row * G + rg, l_i, mask=rg < G)


@triton.jit
def _combine(o_part, m_part, l_part, out, G, D, S: tl.constexpr, BLOCK_G: tl.constexpr,
             BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    rg, rd = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    gd = (rg[:, None] < G) & (rd[None, :] < D)
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for s in tl.static_range(S):  # unrolled, so the chunks' loads need not wait on each other
        row = bh * S + s
        m_s = tl.load(m_part + row * G + rg, mask=rg < G, other=float("-inf"))
        l_s = tl.load(l_part + row * G + rg, mask=rg < G, other=0.0)
        o_s = tl.load(o_part + (row * G + rg[:, None]) * D + rd[None, :], mask=gd, other=0.0)
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a, w = tl.exp(m - m_safe), tl.exp(m_s - m_safe)  # rescale what is summed, weigh chunk s
        l = l * a + w * l_s
        acc = acc * a[:, None] + w[:, None] * o_s
        m = m_new
    o = acc / tl.where(l > 0, l, 1.0)[:, None]  # every key masked: zeros
    tl.store(out + (bh * G + rg[:, None]) * D + rd[None, :], o.to(out.dtype.element_ty), mask=gd)
