"""elmkit.decode_attention's Triton kernels equal the reference attention: on a GPU compiled, on a
CPU in Triton's interpreter (conftest sets TRITON_INTERPRET=1 there; its bf16 is not numpy's, so
the CPU checks fp32 and fp16)."""

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from elmkit.decode_attention import attention_reference, decode_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _case(B, H, G, D, L, dtype, seed=0, cache=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, G, D, generator=g).to(DEVICE, dtype)
    # keys and values as the Decoder passes them: a slot of a longer static cache (strided along L)
    kv = torch.randn(2, B, H, cache or L, D, generator=g).to(DEVICE, dtype)[:, :, :, :L]
    mask = torch.rand(B, 1, 1, L, generator=g) > 0.3
    return q, kv[0], kv[1], mask.to(DEVICE)


@pytest.mark.parametrize("B, H, G, D, L", [
    (1, 2, 6, 128, 640),  # one row, many splits: the 1.5B shape at batch 1, the decode this is for
    (1, 3, 3, 64, 4000),  # SmolLM2's heads, more key blocks than chunks (pass 2's cap)
    (3, 2, 2, 8, 37),  # a head dimension below tl.dot's 16, keys fewer than a block
    (8, 8, 1, 128, 640),  # several key blocks per split, a last split that runs past L
    (2, 3, 4, 16, 130),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_equals_reference(B, H, G, D, L, dtype):
    q, k, v, mask = _case(B, H, G, D, L, dtype, cache=L + 11)
    mask[-1, ..., : L // 2] = False  # a row with its first half masked (left padding)
    out = decode_attention(q, k, v, mask, D ** -0.5)
    ref = attention_reference(q, k, v, mask, D ** -0.5)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_masked_row_gives_zeros_and_bad_strides_are_refused():
    q, k, v, mask = _case(2, 2, 3, 16, 70, torch.float32)
    mask[0] = False
    out = decode_attention(q, k, v, mask, 0.25)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # no NaN from an empty softmax
    torch.testing.assert_close(out[1], attention_reference(q, k, v, mask, 0.25)[1])
    strided = torch.stack([mask, ~mask], -1).flatten(-2)[..., ::2]  # the same mask, stride 2 along L
    assert strided.stride(-1) == 2
    torch.testing.assert_close(decode_attention(q, k, v, strided, 0.25), out)
    with pytest.raises(ValueError, match="unit stride"):
        decode_attention(q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, mask, 0.25)
