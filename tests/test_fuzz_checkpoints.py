"""Property-based tests: a corrupted checkpoint of a BinaryLinear or BinaryConv2d weight is refused
with an error that says what was wrong, or loads exactly the bits it holds.

Hypothesis draws a layer (linear or conv, ragged K) and one corruption of its saved weight: the
packed words (shape, 0-d, dtype, non-contiguous, padding bits, random values), the metadata a
pickled BinaryTensor is rebuilt from (logical shape, dtype, strides), its pickled attributes, or
a dense entry in its place (shape, dtype, NaN / inf). The checkpoint is loaded from memory or
through ``torch.save`` / ``torch.load(weights_only=True)`` (a forged wrapper only through a file),
with ``assign`` False or True. An independent oracle says whether it is valid: a valid one must
load exactly its bits (a dense entry: its signs); any other must raise TypeError, ValueError or
RuntimeError naming the entry ('weight'; ``torch.load`` itself, which does not know the entry,
names the BinaryTensor) and leave the layer's bits as they were. A wrong device is not drawn (one
device here; test_binary_tensor.py checks words on another device than their BinaryTensor).

The example count is small so CI stays fast (a few seconds); set BNNOPS_FUZZ_EXAMPLES (e.g.
2000) for a longer run by hand.
"""

import io
import os

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import bnnops
from bnnops import BinaryTensor
from bnnops.packing import packed_weight_shape

EXAMPLES = int(os.environ.get("BNNOPS_FUZZ_EXAMPLES", 200))
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OTHER_DTYPES = (torch.float64, torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool)


def make_layer(spec):
    kind, in_features, out_features, kernel = spec
    if kind == "linear":
        return bnnops.nn.BinaryLinear(in_features, out_features, bias=False)
    return bnnops.nn.BinaryConv2d(in_features, out_features, kernel, bias=False)


class ForgedBinaryTensor:
    """Pickles as a BinaryTensor rebuilt from the given wrapper metadata and attributes."""

    def __init__(self, dtype, shape, stride, state):
        self.args = (BinaryTensor, dtype, shape, stride, 0, torch.strided, torch.device("cpu"), False)
        self.state = state

    def __reduce_ex__(self, protocol):
        rebuild = torch._utils._rebuild_wrapper_subclass
        return torch._tensor._rebuild_from_type_v2, (rebuild, BinaryTensor, self.args, self.state)


def contiguous_strides(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def padding_clear(words, K):
    """Whether the padding bits (K % 32 .. 31 of each row's last word) of int32 ``words`` are 0."""
    return K % 32 == 0 or not (words[..., -1] & -(1 << (K % 32))).any()


@st.composite
def layer_specs(draw):
    kind = draw(st.sampled_from(["linear", "conv"]))
    return kind, draw(st.integers(1, 70)), draw(st.integers(1, 3)), draw(st.integers(1, 2)) if kind == "conv" else 1


@st.composite
def random_words(draw, shape, dtype):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 2**20).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, generator=g, dtype=torch.int64).to(
        dtype
    )


@st.composite
def corruptions(draw, spec):
    """(what, entry, valid, words): ``entry`` stands in for the saved weight; ``valid`` is the
    oracle; ``words`` are the bits a valid entry must load."""
    shape = tuple(make_layer(spec).weight.shape)
    K = shape[1]
    expected = packed_weight_shape(shape)
    what = draw(st.sampled_from(["words", "metadata", "attributes", "dense"]))
    if what == "words":
        words_shape = draw(st.one_of(st.just(expected), st.lists(st.integers(0, 4), max_size=4).map(tuple)))
        dtype = draw(st.sampled_from((torch.int32,) * 9 + OTHER_DTYPES + FLOAT_DTYPES))
        words = draw(random_words(words_shape, dtype))
        if dtype == torch.int32 and words_shape == expected and draw(st.booleans()) and K % 32:
            words[..., -1] &= (1 << (K % 32)) - 1  # clear the padding
        if draw(st.booleans()) and words.dim() >= 2 and words.shape[-1] > 1 and words.shape[-2] > 1:
            words = words.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, not contiguous
        entry = BinaryTensor.from_float(torch.ones(shape))
        entry.words = words
        valid = dtype == torch.int32 and words_shape == expected and words.is_contiguous() and padding_clear(words, K)
        return what, entry, valid, words
    words = torch.zeros(expected, dtype=torch.int32)
    if what == "metadata":
        dtype = draw(st.sampled_from(FLOAT_DTYPES + OTHER_DTYPES))
        logical = draw(st.one_of(st.just(shape), st.lists(st.integers(1, 40), min_size=1, max_size=4).map(tuple)))
        strides = contiguous_strides(logical) if draw(st.booleans()) else tuple(reversed(contiguous_strides(logical)))
        words = draw(random_words(packed_weight_shape(logical), torch.int32))
        if logical[1 if len(logical) > 1 else 0] % 32:
            words[..., -1] &= (1 << (logical[1 if len(logical) > 1 else 0] % 32)) - 1  # clear the padding
        valid = dtype in FLOAT_DTYPES and logical == shape and torch.empty_strided(shape, strides).is_contiguous()
        return what, ForgedBinaryTensor(dtype, logical, strides, {"words": words}), valid, words
    if what == "attributes":
        state = draw(
            st.sampled_from(
                [
                    None,
                    {},
                    {"words": words, "_is_param": True},
                    {"words": words, "_is_param": 1},
                    {"words": words, "tag": "ema"},  # a plain instance attribute
                    {"words": words, "grad": None},  # names the tensor class defines
                    {"words": words, "requires_grad": True},
                    {"words": words, "data": words},
                    ({"words": words}, {"extra": 1}),
                    {"words": words.tolist()},
                ]
            )
        )
        valid = (
            isinstance(state, dict)
            and isinstance(state.get("words"), torch.Tensor)
            and not {"grad", "requires_grad", "data"} & set(state)
            and state.get("_is_param", True) is True
        )
        return what, ForgedBinaryTensor(torch.float32, shape, contiguous_strides(shape), state), valid, words
    dense_shape = draw(st.one_of(st.just(shape), st.lists(st.integers(1, 40), min_size=1, max_size=4).map(tuple)))
    dtype = draw(st.sampled_from(FLOAT_DTYPES * 2 + OTHER_DTYPES))
    dense = draw(random_words(dense_shape, dtype))
    special = draw(st.sampled_from([None] * 3 + [float("nan"), float("inf"), float("-inf")]))
    if special is not None and dtype.is_floating_point:
        dense.view(-1)[draw(st.integers(0, dense.numel() - 1))] = special
    valid = dtype in FLOAT_DTYPES and dense_shape == shape and bool(torch.isfinite(dense).all())
    return what, dense, valid, BinaryTensor.from_float(dense).words if valid else None


def load(layer, entry, through_file, assign):
    """Load {'weight': entry} into ``layer``: (the stage that raised, its error), or (None, None)."""
    state = {"weight": entry}
    if through_file:
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        try:
            state = torch.load(buf, weights_only=True)
        except (TypeError, ValueError, RuntimeError) as e:
            return "torch.load", e
    try:
        layer.load_state_dict(state, assign=assign)
    except (TypeError, ValueError, RuntimeError) as e:
        return "load_state_dict", e
    return None, None


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), spec=layer_specs(), through_file=st.booleans(), assign=st.booleans())
def test_corrupted_checkpoint_is_refused_or_loads_exactly(data, spec, through_file, assign):
    what, entry, valid, words = data.draw(corruptions(spec))
    if isinstance(entry, ForgedBinaryTensor):
        through_file = True  # a forged wrapper exists only in a file
    layer = make_layer(spec)
    before = layer.weight.words.clone()
    stage, error = load(layer, entry, through_file, assign)
    event(f"{what}: {'loaded' if stage is None else 'refused at ' + stage}")
    if stage is None:
        assert valid, f"a corrupted checkpoint ({what}) loaded"
        assert isinstance(layer.weight, BinaryTensor) and layer.weight.requires_grad
        assert layer.weight.words.dtype == torch.int32 and torch.equal(layer.weight.words, words)
        return
    assert not valid, f"a valid checkpoint ({what}) was refused at {stage}: {error}"
    message = str(error)
    assert (
        ("BinaryTensor" in message)
        if stage == "torch.load"
        else ("'weight'" in message or '"weight"' in message or "weight:" in message)
    ), message
    assert isinstance(layer.weight, BinaryTensor) and torch.equal(layer.weight.words, before)
