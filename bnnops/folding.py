"""``bnnops.fold_for_inference(model)``: batch norm and sign folded into per-channel thresholds, so that
binary layers pass packed sign words to each other.

A chain ``binary layer -> [max pool] -> batch norm -> [max pool] -> [flatten] -> binary layer with an
input quantizer`` computes, per output channel, sign(BN(pool(v))) of the first layer's
pre-activation v, and only that sign reaches the second layer. Batch norm in eval mode and the
layer's epilogue are monotone per channel, so that sign is ``(v < t) XOR flip`` for a threshold t
and a flip (gamma < 0, or a negative scale, reverses the order; gamma == 0 or a zero scale gives a
constant). The
folded model (:mod:`bnnops.folded_layers`) writes those bits packed (1 bit per activation instead of
16 or 32), pools on the bits, and the second layer reads them packed.

**Exactness.** Thresholds are found by running the unfolded model's own float operations (the
layer's fp32 epilogue, rounding to its dtype, the batch norm's eval-mode ``F.batch_norm`` on this CPU, ``< 0`` as
``bnnops.quantizers.sign`` binarizes: sign(0) = +1, NaN -> +1) on every value v can take:

- W1A1 layers (binarized or packed input): v is an integer sum in [-K, K] (K the reduction
  length); all 2K + 1 are evaluated through the op's epilogue ``v * scale + bias`` (fp32, a
  multiply then an add, one rounding to the layer's dtype), so t is an int32 and the folded bits
  equal the unfolded model's for every input, ties (BN output exactly 0) included. Scale and bias
  are folded into t, whatever their sign (a zero scale gives a constant channel). The grid is
  evaluated a slice of channels at a time (``_GRID_VALUES`` values per slice), so a wide layer
  (a 25088 x 4096 classifier) needs bounded memory.
- W1A16 layers (real input, e.g. the first conv): v is a value of the layer's dtype; t is found
  by bisection over the dtype's finite values in order, and the op compares v rounded to that
  dtype, as the unfolded layer rounds its output (after its scale and bias, which the sign op
  applies as the layer's op does). Exact for finite v; a v that overflows to +-inf gets the
  limit's bit (torch's batch norm can give NaN -> +1 there when gamma == 0).

The remaining differences, both on CUDA: the unfolded model's batch norm on another device
(cuDNN) may round a value within an ulp of the threshold differently from this CPU's; and a W1A16
*linear* producer computes v with another kernel than the unfolded layer (the unfolded W1A16 op
runs a GEMV at M <= 2 and split-K SWAP_AB tiles at small M, the sign op always the tensor-core
kernel without split-K), so v may differ by fp32 summation order and a bit whose v lies within
that rounding of the threshold can flip. Layers that feed real-valued consumers (the last layer's
batch norm -> logits, Bi-Real Net's shortcuts) keep real outputs.

**Which layers fold.** Producers and consumers are modules of exactly the types
:class:`bnnops.nn.BinaryLinear`, :class:`bnnops.nn.BinaryConv2d`,
:class:`bnnops.scaled.ScaledBinaryLinear` and :class:`bnnops.scaled.ScaledBinaryConv2d` (their
forward is the op with the layer's scale, or none, and bias). Any other subclass has its own
forward, which the folded op would not run: it is left as it is (real-valued), and a chain that
would need it as producer or consumer is not folded.

A folded model computes in the dtype it was folded in: fold after the final ``.to(dtype)``
(the folded layers refuse a later dtype change).

Max pooling (``nn.MaxPool2d`` and :class:`bnnops.nn.MaxPool2d`) is done on the bits
(:class:`bnnops.folded_layers.PackedMaxPool2d`); a flatten between a conv and a linear layer passes
the words through and permutes the linear weight's columns when the channels are a multiple of 32,
else repacks the bits (:class:`bnnops.folded_layers.PackedFlatten`).
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from bnnops.binary_tensor import BinaryTensor
from bnnops.conv import conv_padding
from bnnops.folded_layers import FoldedBinaryConv2d, FoldedBinaryLinear, PackedFlatten, PackedMaxPool2d
from bnnops.nn import BinaryConv2d, BinaryLinear
from bnnops.packing import pack_bits, pack_weight, unpack_weight
from bnnops.scaled import ScaledBinaryConv2d, ScaledBinaryLinear

__all__ = ["FoldError", "fold_for_inference", "thresholds"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
# Exact types (module docstring): a subclass with its own forward is not folded.
_LINEAR_TYPES = (BinaryLinear, ScaledBinaryLinear)
_CONV_TYPES = (BinaryConv2d, ScaledBinaryConv2d)
# Modules that are the identity in eval mode, allowed anywhere in a chain (they become nn.Identity).
_PASSTHROUGH = (nn.Identity, nn.Dropout)


class FoldError(ValueError):
    """A chain of layers that :func:`fold_for_inference` cannot fold (the message says why)."""


def _foldable(m: nn.Module) -> bool:
    return type(m) in _LINEAR_TYPES + _CONV_TYPES


def _scale(layer: nn.Module) -> torch.Tensor | None:
    """The per-output-channel scale the layer's op applies (a scaled layer's buffer), else None."""
    return layer.scale.detach() if isinstance(layer, ScaledBinaryLinear | ScaledBinaryConv2d) else None


def _epilogue(
    v: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The binary ops' epilogue on fp32 sums v (R, C): * scale, then + bias, in fp32, rounded once to
    ``dtype`` (:mod:`bnnops.ops.reference`)."""
    if scale is not None:
        v = v * scale.float()
    if bias is not None:
        v = v + bias.float()
    return v.to(dtype)


# Values per batch norm call while deriving thresholds (64 MB of fp32): a wide layer's grid is
# evaluated a slice of channels at a time.
_GRID_VALUES = 2**24


def _negative(bn: nn.Module, y: torch.Tensor, first: int = 0) -> torch.Tensor:
    """bool (R, C): sign(bn(y)) == -1 for rows of values y (R, C) contiguous of bn's channels
    ``first`` .. ``first + C - 1``, by the call an eval-mode ``nn.BatchNorm1d`` / ``2d`` makes
    (``F.batch_norm`` on its running statistics), on slices of channels."""
    rows, channels = y.shape
    step = max(1, _GRID_VALUES // max(rows, 1))
    neg = torch.empty(rows, channels, dtype=torch.bool)
    for c in range(0, channels, step):
        here = slice(c, c + step)
        part = slice(first + c, first + min(c + step, channels))
        z = F.batch_norm(
            y[:, here].contiguous() if isinstance(bn, nn.BatchNorm1d) else y[:, here, None, None].contiguous(),
            bn.running_mean[part],
            bn.running_var[part],
            None if bn.weight is None else bn.weight[part],
            None if bn.bias is None else bn.bias[part],
            False,
            0.0,
            bn.eps,
        )
        neg[:, here] = (z < 0).reshape(rows, -1)
    return neg


def _from_grid(neg: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, flip) per channel of a bool grid neg (R, C) over ascending values: neg == (i < index)
    XOR flip for every row i. Raises FoldError where a channel's neg is not monotone."""
    rows = torch.arange(neg.shape[0])[:, None]
    count = neg.sum(0)
    below = neg[0] | ~neg[-1]  # negative at the low end, or constant
    index = torch.where(below, count, neg.shape[0] - count)
    flip = ~below
    if not torch.equal((rows < index) ^ flip, neg):
        raise FoldError(f"{name}: sign(batch norm) is not monotone in the layer's output; cannot fold it")
    return index, flip


def _integer_thresholds(K: int, scale, bias, dtype, bn, name) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 t and bool flip (C,) with sign(bn(epilogue(v))) == -1 iff (v < t) XOR flip for every
    integer v in [-K, K], a slice of channels (``_GRID_VALUES`` values) at a time."""
    values = torch.arange(-K, K + 1, dtype=torch.float32)
    channels = bn.num_features
    step = max(1, _GRID_VALUES // values.numel())
    t = torch.empty(channels, dtype=torch.int32)
    flip = torch.empty(channels, dtype=torch.bool)
    for c in range(0, channels, step):
        part = slice(c, min(c + step, channels))
        width = part.stop - part.start
        # Contiguous, as the model's activations: torch's CPU batch norm rounds an expanded
        # (stride-0) input differently (a value at the threshold came out on the other side).
        y = _epilogue(
            values[:, None].expand(-1, width),
            None if scale is None else scale[part],
            None if bias is None else bias[part],
            dtype,
        ).contiguous()
        index, flip[part] = _from_grid(_negative(bn, y, part.start), name)
        t[part] = (index - K).to(torch.int32)
    return t, flip


def _ordered(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float values of ``dtype`` at order keys (int64): key 2^(w-1) is +0.0, larger keys are larger
    positive values, key 2^(w-1) - 1 is -0.0 and smaller keys more negative ones (w the bit width)."""
    width = torch.finfo(dtype).bits
    half = 1 << (width - 1)
    pattern = torch.where(keys >= half, keys - half, (1 << width) - 1 - keys)
    signed = torch.where(pattern >= half, pattern - (1 << width), pattern)
    return signed.to(torch.int16 if width == 16 else torch.int32).view(dtype)


def _key(value: float, dtype: torch.dtype) -> int:
    width = torch.finfo(dtype).bits
    pattern = torch.tensor([value], dtype=dtype).view(torch.int16 if width == 16 else torch.int32).item()
    pattern %= 1 << width
    half = 1 << (width - 1)
    return pattern + half if pattern < half else (1 << width) - 1 - pattern


def _real_thresholds(channels: int, dtype, bn, name) -> tuple[torch.Tensor, torch.Tensor]:
    """t (of ``dtype``) and bool flip (C,) with sign(bn(y)) == -1 iff (y < t) XOR flip for every
    finite y of ``dtype``, by bisection over the values in order."""
    big = torch.finfo(dtype).max
    lo = torch.full((channels,), _key(-big, dtype), dtype=torch.int64)
    hi = torch.full((channels,), _key(big, dtype), dtype=torch.int64)

    def neg_at(keys):
        return _negative(bn, _ordered(keys, dtype)[None])[0]

    low, high = neg_at(lo), neg_at(hi)
    constant = low == high
    flip = ~low & high  # negative above the threshold
    # Invariant: neg(lo) == low, neg(hi) == high; find the first key where neg changes.
    while True:
        open_ = ~constant & (hi - lo > 1)
        if not open_.any():
            break
        mid = torch.where(open_, (lo + hi) // 2, lo)
        at_mid = neg_at(mid)
        same_as_low = at_mid == low
        lo = torch.where(open_ & same_as_low, mid, lo)
        hi = torch.where(open_ & ~same_as_low, mid, hi)
    t = _ordered(hi, dtype)
    # A constant channel: v < -inf never holds, so neg is ``flip`` = its constant value.
    t = torch.where(constant, torch.tensor(float("-inf"), dtype=dtype), t)
    flip = torch.where(constant, low, flip)
    # Check the found step on the whole order at a few points: neg is monotone (float ops are).
    probe = torch.stack([lo, hi, torch.full_like(lo, _key(-big, dtype)), torch.full_like(lo, _key(big, dtype))])
    probe_values = _ordered(probe, dtype)
    got = (probe_values < t) ^ flip
    want = torch.stack([neg_at(k) for k in probe])
    if not torch.equal(got, want):
        raise FoldError(f"{name}: sign(batch norm) is not monotone in the layer's output; cannot fold it")
    return t, flip


def thresholds(layer: nn.Module, bn: nn.Module, name: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """(threshold, flip) of a binary ``layer`` followed by batch norm ``bn`` (eval statistics) and a
    sign: sign(bn(layer(x))) == -1 exactly where ``(v < threshold) XOR flip``, v the layer's
    pre-activation (module docstring). W1A1 layers give an int32 threshold of the integer sum
    (a scaled layer's scale and the bias folded in), W1A16 layers one of the layer's dtype (scale
    and bias applied by the op).

    Raises:
        FoldError: a latent-weight layer, a batch norm without running statistics or of another
            width, or a non-monotone result.
    """
    weight = layer.weight
    if not isinstance(weight, BinaryTensor):
        raise FoldError(
            f"{name}: fold_for_inference needs a packed BinaryTensor weight, got a latent weight "
            f"(weight_quantizer={layer.weight_quantizer}); convert the model first (bnnops.convert)"
        )
    channels = weight.shape[0]
    if not bn.track_running_stats or bn.running_mean is None:
        raise FoldError(f"{name}: the batch norm after it has no running statistics to fold")
    if bn.num_features != channels:
        raise FoldError(f"{name}: batch norm over {bn.num_features} channels after {channels} output channels")
    bn = copy.deepcopy(bn).cpu().eval()
    bias = None if layer.bias is None else layer.bias.detach().cpu()
    if layer.input_quantizer is None:
        t, flip = _real_thresholds(channels, weight.dtype, bn, name)
    else:
        K = weight.shape[1] * (weight.shape[2] * weight.shape[3] if weight.dim() == 4 else 1)
        scale = _scale(layer)
        t, flip = _integer_thresholds(K, None if scale is None else scale.cpu(), bias, weight.dtype, bn, name)
    return t.to(weight.device), flip.to(weight.device)


def _items(seq: nn.Sequential) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, module) of the modules a Sequential runs in order, nested Sequentials opened."""
    out = []
    for name, module in seq.named_children():
        if type(module) is nn.Sequential:
            out.extend(_items(module))
        else:
            out.append((seq, name, module))
    return out


def _is_pool(m: nn.Module) -> bool:
    return isinstance(m, nn.MaxPool2d) and not m.return_indices


def _is_flatten(m: nn.Module) -> bool:
    return type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _chain(items, i):
    """The chain starting at items[i] if it folds: dict of the indices of pool_before, bn, pool_after,
    flatten, consumer, and a list of the eval-mode identities between them (``passthrough``); else None."""
    layer = items[i][2]
    conv = type(layer) in _CONV_TYPES
    found, j = {"passthrough": []}, i + 1

    def take(key, test):
        nonlocal j
        while j < len(items) and type(items[j][2]) in _PASSTHROUGH:
            found["passthrough"].append(j)
            j += 1
        if j < len(items) and test(items[j][2]):
            found[key] = j
            j += 1

    if conv:
        take("pool_before", _is_pool)
    take("bn", lambda m: type(m) is (nn.BatchNorm2d if conv else nn.BatchNorm1d))
    if "bn" not in found:
        return None
    if conv:
        if "pool_before" not in found:
            take("pool_after", _is_pool)
        take("flatten", _is_flatten)
    want = _LINEAR_TYPES if "flatten" in found or not conv else _CONV_TYPES
    take("consumer", lambda m: type(m) in want and m.input_quantizer is not None)
    return found if "consumer" in found else None


def _pool(pool: nn.MaxPool2d, and_mask: torch.Tensor) -> PackedMaxPool2d:
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return PackedMaxPool2d(
        and_mask,
        _pair(pool.kernel_size),
        _pair(stride),
        _pair(pool.padding),
        _pair(pool.dilation),
        pool.ceil_mode,
    )


def _folded_layer(layer, packed_input, threshold, flip, out_groups):
    words = layer.weight.words.detach().clone()
    dtype = layer.weight.dtype
    binarize = layer.input_quantizer is not None or packed_input
    # W1A1 sign output: scale and bias are inside the integer threshold; otherwise the op applies them.
    bias = None if layer.bias is None else layer.bias.detach().clone()
    scale = _scale(layer)
    scale = None if scale is None else scale.clone()
    if threshold is not None and binarize:
        bias = scale = None
    if type(layer) in _LINEAR_TYPES:
        return FoldedBinaryLinear(
            words, layer.in_features, bias, dtype, packed_input, binarize, threshold, flip, scale=scale
        )
    padding = conv_padding(layer.padding, layer.kernel_size, layer.stride, layer.dilation)
    return FoldedBinaryConv2d(
        words,
        layer.in_channels,
        layer.stride,
        padding,
        layer.dilation,
        layer.groups,
        layer.pad_value,
        bias,
        dtype,
        packed_input,
        binarize,
        threshold,
        flip,
        out_groups,
        scale=scale,
    )


def _permute_columns(linear: BinaryLinear, channels: int) -> torch.Tensor:
    """The words of ``linear``'s weight with columns in (h, w, c) order instead of nn.Flatten's (c, h, w)."""
    out, K = linear.weight.shape
    dense = unpack_weight(linear.weight.words, (out, K), torch.float32)
    dense = dense.reshape(out, channels, K // channels).transpose(1, 2).reshape(out, K)
    return pack_weight(dense)


def _fold_sequential(seq: nn.Sequential) -> None:
    """Fold the chains of ``seq`` (nested Sequentials opened) in place: first find every chain and
    the layers that will read packed words, then replace the modules of each."""
    items = _items(seq)
    packed_inputs: set[int] = set()
    plans = {}
    for i, (_, _, layer) in enumerate(items):
        if _foldable(layer):
            chain = _chain(items, i)
            if chain is not None:
                for k in (i, chain["consumer"]):
                    if not isinstance(items[k][2].weight, BinaryTensor):
                        raise FoldError(
                            f"{items[k][1]}: fold_for_inference needs packed BinaryTensor weights, got a latent "
                            f"weight (weight_quantizer={items[k][2].weight_quantizer}); convert the model first "
                            f"(bnnops.convert)"
                        )
                plans[i] = chain
                packed_inputs.add(chain["consumer"])
    replace = {}
    for i, (_, name, layer) in enumerate(items):
        if not _foldable(layer) or (i not in plans and i not in packed_inputs):
            continue
        chain = plans.get(i)
        threshold = flip = None
        out_groups = 1
        if chain is not None:
            threshold, flip = thresholds(layer, items[chain["bn"]][2], name)
            consumer = items[chain["consumer"]][2]
            out_groups = consumer.groups if isinstance(consumer, BinaryConv2d) else 1
            for k in (chain["bn"], *chain["passthrough"]):
                replace[k] = nn.Identity()
            if "pool_before" in chain or "pool_after" in chain:
                # Before the batch norm: AND where neg holds below the threshold; after it: neg(max) = AND.
                and_bits = ~flip if "pool_before" in chain else torch.ones_like(flip)
                and_mask = pack_bits(and_bits.reshape(out_groups, -1)).flatten()
                key = chain.get("pool_before", chain.get("pool_after"))
                replace[key] = _pool(items[key][2], and_mask)
            if "flatten" in chain:
                channels = layer.out_channels
                repack = channels % 32 != 0
                replace[chain["flatten"]] = PackedFlatten(channels, repack)
                if not repack:
                    consumer.weight.words.copy_(_permute_columns(consumer, channels))
        replace[i] = (layer, i in packed_inputs, threshold, flip, out_groups)
    for i, what in replace.items():
        parent, name, _ = items[i]
        module = _folded_layer(*what) if isinstance(what, tuple) else what
        setattr(parent, name, module)


def _fold(module: nn.Module) -> None:
    """Fold the chains of every Sequential in ``module`` (nested Sequentials as one sequence)."""
    if type(module) is nn.Sequential:
        _fold_sequential(module)
        children = [child for _, _, child in _items(module)]
    else:
        children = list(module.children())
    for child in children:
        _fold(child)


@torch.no_grad()
def fold_for_inference(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` in which binary layers write packed sign words for the next one.

    Folds every chain ``BinaryConv2d / BinaryLinear -> [MaxPool2d] -> BatchNorm (eval statistics)
    -> [MaxPool2d] -> [Flatten] -> binary layer with an input quantizer`` (the binary layers of
    exactly these types or the scaled ones of :mod:`bnnops.scaled`; ``nn.Identity`` and
    ``nn.Dropout``, the identity in eval mode, may stand anywhere between) found in an
    ``nn.Sequential`` (nested Sequentials are opened; other modules are searched for Sequentials
    inside, but their own forward is kept): the first layer becomes a
    :class:`~bnnops.folded_layers.FoldedBinaryConv2d` / ``FoldedBinaryLinear`` with a threshold
    (module docstring), the pool a ``PackedMaxPool2d``, the batch norm ``nn.Identity``, the
    flatten a ``PackedFlatten``, and the consumer a folded layer reading packed words (with real
    output unless it starts a chain itself). Everything else is kept as it is, real-valued.
    The model is not changed; the copy is in eval mode, on the model's device, and computes in the
    model's dtypes: fold after the final ``.to(dtype)`` (the folded layers refuse a dtype change).

    Returns:
        The folded copy. Its output equals ``model.eval()``'s for every input up to the batch
        norms' rounding on the device (module docstring: exactness).

    Raises:
        FoldError (a ValueError): a layer of a chain with a latent (float) weight (convert it
            first: ``bnnops.convert``), a batch norm without running statistics, a non-monotone
            batch norm result.
    """
    folded = copy.deepcopy(model).eval()
    _fold(folded)
    return folded
