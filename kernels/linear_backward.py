"""Backward launchers of a binary linear layer that saved its input packed (sign and pass-mask words,
:mod:`bnnops.kernels.saved_activations`): no dense x, no dense +-1 weight.

- :func:`grad_weight`: grad_W (N, K) = grad_out^T (N, M) @ sign(x) (M, K), sign(x) given as words
  (M, ceil(K/32)). This is :func:`bnnops.kernels.gemm.grad_input` (y = g @ W, W read packed along
  its output dimension) with g = grad_out^T (a strided view, no copy) and W = sign(x): the GEMM
  reduces over the batch.
- :func:`grad_input`: grad_x (M, K) = grad_out (M, N) @ W (N, K), then 0 wherever the pass mask
  (words (M, ceil(K/32)), bit 1 = pass) is 0: ``gemm.grad_input(..., mask_words=...)``, whose
  epilogue applies the mask where it writes grad_x (no second pass).

Numerics: ``gemm.grad_input``'s (docs/design.md 4.2): fp32 accumulation, 16-bit products exact,
fp32 grad_out as two TF32 products (error about 2^-20 |g| each), one rounding to the output dtype.
The mask is a select, exact (a blocked position is 0 even where the product is inf or NaN).
References: :mod:`bnnops.ops.backward_reference`.
"""

import torch
import triton

from bnnops.kernels import gemm


def _check_words(what: str, words: torch.Tensor, rows: int, K: int) -> None:
    expected = (rows, -(-K // 32))
    if words.dtype != torch.int32 or tuple(words.shape) != expected or not words.is_contiguous():
        raise ValueError(
            f"{what} must be contiguous int32 words of shape {expected} (rows, ceil(K/32)) for K={K}, "
            f"got {words.dtype} {tuple(words.shape)}"
        )


def grad_weight(
    grad_out: torch.Tensor,
    sign_words: torch.Tensor,
    K: int,
    *,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """grad_W (N, K) = grad_out^T @ sign(x): the weight gradient of a binary linear layer.

    Args:
        grad_out: (M, N) float32 / bfloat16 / float16, any strides.
        sign_words: int32 (M, ceil(K/32)) contiguous, x's sign words (bit 1: x < 0).
        K: in_features.
        out_dtype: dtype of a new grad_W (None: grad_out's); ``out``: an (N, K) float buffer to
            write instead (any strides).
        config: a ``gemm_configs`` tensor-core config for ``gemm.grad_input`` (None: its table's).

    Returns:
        (N, K) dense gradient, fp32 accumulation, one rounding to its dtype.

    Raises:
        ValueError: sign_words not (M, ceil(K/32)) contiguous int32.
    """
    M, N = grad_out.shape
    _check_words("sign_words", sign_words, M, K)
    if out is None:
        out = torch.empty(N, K, dtype=out_dtype or grad_out.dtype, device=grad_out.device)
    return gemm.grad_input(grad_out.t(), sign_words, K, out=out, config=config)


def grad_input(
    grad_out: torch.Tensor,
    words: torch.Tensor,
    mask_words: torch.Tensor | None,
    K: int,
    *,
    out: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """grad_x (M, K) = grad_out @ W where the pass mask is 1, else 0: the input gradient of a binary
    linear layer with the ``ste_sign`` quantizer, W and the mask read packed.

    Args:
        grad_out: (M, N) float32 / bfloat16 / float16, any strides. fp32 must be finite (TF32 split).
        words: int32 (N, ceil(K/32)) contiguous, the packed weight.
        mask_words: int32 (M, ceil(K/32)) contiguous, bit 1 where |x| <= clip; None: no mask
            (grad_out @ W alone).
        K: in_features.
        out: an (M, K) buffer of grad_out's dtype to write instead (any strides).
        config: a ``gemm_configs`` tensor-core config for ``gemm.grad_input`` (None: its table's).

    Returns:
        (M, K) in grad_out's dtype (``out`` when given).

    Raises:
        ValueError: words or mask_words of the wrong shape, dtype or layout.
    """
    M, N = grad_out.shape
    _check_words("words", words, N, K)
    if mask_words is not None:
        _check_words("mask_words", mask_words, M, K)
    return gemm.grad_input(grad_out, words, K, mask_words=mask_words, out=out, config=config)
