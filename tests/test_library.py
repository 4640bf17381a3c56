"""The op registration (bnnops/ops/library.py): every op checks its input on every path, and refuses
to be differentiated through directly with a clear error."""

import pytest
import torch

import bnnops
from bnnops.ops.checks import DeviceError, DtypeError, ShapeError
from bnnops.ops.library import CUDA_IMPLEMENTATIONS
from bnnops.packing import pack_weight


def _calls(device):
    """(name, call) for every torch.ops.bnnops op, on fresh random inputs whose float input requires grad."""
    x = torch.randn(3, 40, device=device, requires_grad=True)
    words = bnnops.pack_signs(torch.randn(5, 40, device=device))
    image = torch.randn(2, 3, 5, 5, device=device, requires_grad=True)
    conv_words = pack_weight(torch.randn(4, 3, 3, 3, device=device))
    grad = torch.randn(3, 5, device=device, requires_grad=True)
    ops = torch.ops.bnnops
    return [
        ("binary_linear_w1a1", lambda: ops.binary_linear_w1a1(x, words, 40, None, None, torch.float32)),
        ("binary_linear_w1a16", lambda: ops.binary_linear_w1a16(x, words, None, None)),
        ("binary_linear_grad_input", lambda: ops.binary_linear_grad_input(grad, words, 40)),
        (
            "binary_conv2d",
            lambda: ops.binary_conv2d(image, conv_words, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, 0.0, True),
        ),
    ]


@pytest.mark.parametrize("index", range(4))
def test_backward_through_a_raw_op_raises(device, index):
    """With grad on and an input that requires grad, a float op's result refuses backward (no formula)."""
    name, call = _calls(device)[index]
    y = call()
    assert y.requires_grad
    with pytest.raises(RuntimeError, match=f"bnnops::{name} has no derivative of its own"):
        y.sum().backward()
    with torch.no_grad():
        assert torch.equal(call(), y.detach())


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_create_graph_through_a_layer(device, kind):
    """First derivatives with create_graph=True work; a second derivative through the layer's
    backward (a gradient penalty) raises instead of silently missing the weight's terms."""
    if kind == "linear":
        layer, x = bnnops.nn.BinaryLinear(40, 6), torch.randn(3, 40)
    else:
        layer, x = bnnops.nn.BinaryConv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5)
    layer, x = layer.to(device), x.to(device).requires_grad_()
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    (expected,) = torch.autograd.grad(layer(x).square().sum(), x)
    assert torch.equal(grad.detach(), expected)
    with pytest.raises(RuntimeError, match="has no derivative of its own"):
        grad.square().sum().backward()
    y = torch.ops.bnnops.binary_linear_w1a16(
        torch.randn(2, 40, device=device, requires_grad=True),
        bnnops.pack_signs(torch.randn(5, 40, device=device)),
        None,
        None,
    )
    y.relu_()  # an in-place op on a marked result is fine; only its backward raises


def test_raw_op_with_grad_under_compile_raises():
    """Under torch.compile the marking node would not enter the graph: the op refuses at trace time."""
    words = bnnops.pack_signs(torch.randn(5, 40))
    x = torch.randn(2, 40, requires_grad=True)
    f = torch.compile(
        lambda x: torch.ops.bnnops.binary_linear_w1a16(x * 2, words, None, None), backend="aot_eager", fullgraph=True
    )
    with pytest.raises(Exception, match="has no derivative of its own"):
        f(x).sum().backward()


def test_integer_outputs_need_no_derivative(device):
    """pack_signs of a tensor that requires grad (e.g. a latent weight) works under grad mode."""
    w = torch.randn(4, 33, device=device, requires_grad=True)
    words = bnnops.pack_signs(w)
    assert words.dtype == torch.int32 and not words.requires_grad
    assert torch.equal(words, bnnops.pack_signs(w.detach()))


def test_bad_input_checked_on_every_path(device):
    """The check runs before the CPU, CUDA and fake implementations alike."""
    words = torch.zeros(5, 2, dtype=torch.int32, device=device)
    for x in (torch.randn(3, 70, device=device), torch.randn(3, 70, device="meta")):
        with pytest.raises(ShapeError, match=r"\(N, 3\) for K=70, got \(5, 2\)"):
            torch.ops.bnnops.binary_linear_w1a16(x, words.to(x.device), None, None)


@pytest.mark.parametrize("path", ["device", "fake"])
def test_bad_input_errors_are_runtime_errors(device, path):
    """Each op's shape, dtype and device errors are ShapeError, DtypeError and DeviceError: a
    ValueError or TypeError as documented and a RuntimeError as torch's own ops raise, on the
    CPU, CUDA and fake paths alike."""
    ops = torch.ops.bnnops
    where = device if path == "device" else "meta"
    x = torch.randn(3, 40, device=where)
    words = bnnops.pack_signs(torch.randn(5, 40)).to(where)
    image = torch.randn(2, 4, 5, 5, device=where)
    conv_words = pack_weight(torch.randn(6, 4, 3, 3)).to(where)
    geometry = ([1, 1], [0, 0, 0, 0], [1, 1], 1, 0.0, True)
    w1a1, w1a16, grad_input, conv = (
        ops.binary_linear_w1a1,
        ops.binary_linear_w1a16,
        ops.binary_linear_grad_input,
        ops.binary_conv2d,
    )
    fp32 = torch.float32
    mistakes = [
        (ShapeError, "last dimension is 41", w1a1, (x[:, :1].expand(3, 41), words, 40, None, None, fp32)),
        (DtypeError, "int32 words", w1a16, (x, words.float(), None, None)),
        (DtypeError, "input must be float32", w1a16, (x.double(), words, None, None)),
        (DtypeError, "out_dtype must be float32", w1a16, (x, words, None, None, torch.int64)),
        (ShapeError, r"bias must have shape \(5,\)", w1a16, (x, words, None, x[0, :4])),
        (DtypeError, "scale must be a float32", w1a1, (x, words, 40, words[:, 0], None, fp32)),
        (ShapeError, "grad must have shape", grad_input, (x, words, 40)),
        (DtypeError, "grad must be float32", grad_input, (x[:, :5].long(), words, 40)),
        (
            ShapeError,
            "has 4 channels",
            conv,
            (image, pack_weight(torch.randn(6, 40, 3, 3)).to(where), None, None, *geometry),
        ),
        (ShapeError, "rank 4", conv, (image[0], conv_words, None, None, *geometry)),
        (DtypeError, "float32, bfloat16 or float16", conv, (image.double(), conv_words, None, None, *geometry)),
        (ShapeError, r"bias must have shape \(6,\)", conv, (image, conv_words, image[0, 0, 0], None, *geometry)),
    ]
    if path == "device":
        elsewhere = torch.randn(6, device="meta")
        mistakes += [
            (DeviceError, "weight is on meta", w1a16, (x, words.to("meta"), None, None)),
            (DeviceError, "bias is on meta", conv, (image, conv_words, elsewhere, None, *geometry)),
        ]
    for error, match, op, args in mistakes:
        with pytest.raises(error, match=match) as raised:
            op(*args)
        assert isinstance(raised.value, RuntimeError), match


def _integers(shape, device, dtype=torch.float32):
    """Random small integers as floats (never all zero): every sum of them is exact in fp32."""
    return torch.randint(-4, 5, shape, device=device).to(dtype)


def test_cuda_implementations_match_the_references(device):
    """The exact code each op registers for CUDA (its glue: contiguity, reshapes, the launcher), run
    here on non-contiguous, ragged inputs (on a CPU by the Triton interpreter), equals the op's
    pure-PyTorch reference bit for bit. Integer-valued inputs make every float sum exact."""
    cpu = lambda *ts: [t.cpu() if isinstance(t, torch.Tensor) else t for t in ts]
    words = torch.randint(-(2**31), 2**31 - 1, (7, 4), dtype=torch.int32, device=device)[:, ::2]  # K = 45
    x3 = _integers((3, 2, 90), device)[..., ::2]  # (3, 2, 45), strided
    vec = _integers((14,), device)[::2]  # (7,) strided
    image = _integers((2, 5, 6, 6), device).to(memory_format=torch.channels_last)
    conv_words = torch.randint(-(2**31), 2**31 - 1, (4, 3, 3, 2), dtype=torch.int32, device=device)[..., :1]
    image_words = torch.randint(-(2**31), 2**31 - 1, (2, 6, 6, 2), dtype=torch.int32, device=device)[..., 1:]
    conv_grad = _integers((2, 3, 4, 4), device).permute(0, 3, 1, 2)  # (2, 4, 3, 4), channels_last
    conv_geometry = ([1, 2], [1, 0, 2, 1], [2, 1], 1)
    signs = (vec[:4].int(), vec[:4] > 0)  # binary_conv2d_sign's integer thresholds and flips
    calls = {
        "pack_signs": (_integers((45, 5), device, torch.float16).t(),),
        "unpack_signs": (words, 45, torch.bfloat16),
        "binary_linear_w1a1": (x3, words, 45, vec, vec, torch.float32),
        "binary_linear_w1a16": (x3, words, vec, None),
        "binary_linear_grad_input": (_integers((3, 14), device)[:, ::2], words, 45),
        "binary_conv2d": (image, conv_words, vec[:4], None, [1, 2], [1, 0, 2, 1], [2, 1], 1, -1.0, True),
        # image's sign words (garbage in the padding bits), strided; a 3x4 output of 4 channels.
        "binary_conv2d_packed": (
            image_words,
            conv_words,
            5,
            vec[:4],
            None,
            [1, 2],
            [1, 0, 2, 1],
            [2, 1],
            1,
            -1.0,
            True,
            torch.float32,
        ),
        "binary_linear_grad_weight": (_integers((3, 14), device)[:, ::2], words[:3], 45, None),
        "binary_linear_grad_input_masked": (_integers((3, 14), device)[:, ::2], words, words[:3], 45),
        "binary_conv2d_grad_weight": (conv_grad, image_words, [4, 5, 3, 3], *conv_geometry, -1.0, None, True),
        "binary_conv2d_grad_input": (conv_grad, conv_words, image_words, [2, 5, 6, 6], *conv_geometry, None, False),
        # The sign epilogues of folded inference (bnnops.ops.threshold): integer thresholds, random flips.
        "binary_linear_w1a1_sign": (x3, words, 45, vec.to(torch.int32), vec > 0),
        "binary_linear_w1a16_sign": (x3, words, vec, vec, vec, vec > 0),
        "binary_conv2d_sign": (image_words, conv_words, 5, vec[:4], None, *conv_geometry, -1.0, True, *signs, 1),
    }
    assert set(calls) == set(CUDA_IMPLEMENTATIONS)
    # out_dtype: fp32 results of 16-bit inputs (a layer with a learnable scale asks for them).
    out_dtype_calls = [
        ("binary_linear_w1a16", (x3.bfloat16(), words, vec, vec, torch.float32)),
        (
            "binary_conv2d",
            (image.half(), conv_words, vec[:4], vec[:4], [1, 1], [1, 1, 1, 1], [1, 1], 1, 1.0, False, torch.float32),
        ),
    ]
    for name, args in [*calls.items(), *out_dtype_calls]:
        got = CUDA_IMPLEMENTATIONS[name](*args)
        expected = getattr(torch.ops.bnnops, name)(*cpu(*args))
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert torch.equal(got.cpu(), expected), name
