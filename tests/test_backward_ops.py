"""The backward ops of :mod:`bnnops.ops.backward`: registration (opcheck: schema, fake, dynamic
shapes), their CUDA bodies against their references (the Triton launchers, under the interpreter
on CPU tensors), their checks, and torch.compile of a training step: the captured backward graph
holds the ops (so a compiled step runs the kernels on CUDA) and gives eager's gradients."""

import pytest
import torch
from functorch.compile import make_boxed_func
from helpers import DEVICE
from torch import nn
from torch._dynamo.backends.common import aot_autograd

import bnnops.ops.backward  # noqa: F401  (registers the ops)
from bnnops.nn import BinaryConv2d, BinaryLinear
from bnnops.ops.backward_reference import pack_sign_and_mask_conv_reference, pack_sign_and_mask_reference
from bnnops.ops.checks import DeviceError, DtypeError, ShapeError
from bnnops.ops.library import CUDA_IMPLEMENTATIONS
from bnnops.packing import pack_weight

OPS = (
    "binary_linear_grad_weight",
    "binary_linear_grad_input_masked",
    "binary_conv2d_grad_weight",
    "binary_conv2d_grad_input",
)


def _dyadic(shape, seed, dtype):
    """Multiples of 1/8 in [-3, 3], exact in every float dtype: each fp32 sum of them here is exact,
    so the launchers (another summation order, TF32 halves for fp32) equal the references bit for bit."""
    return (torch.randint(-24, 25, shape, generator=torch.Generator().manual_seed(seed)).float() / 8).to(dtype)


def _linear_calls(dtype, device):
    M, N, K = 7, 5, 45  # ragged: two words a row, the second partial
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    sign_words, mask_words = pack_sign_and_mask_reference(x, 0.8)
    weight = pack_weight(torch.randn(N, K, generator=g))
    grad = _dyadic((N, M), 1, dtype).t()  # a transposed view
    on = lambda *ts: [t.to(device) if isinstance(t, torch.Tensor) else t for t in ts]
    return [
        ("binary_linear_grad_weight", on(grad, sign_words, K, None)),
        ("binary_linear_grad_weight", on(grad, sign_words, K, torch.float32)),
        ("binary_linear_grad_input_masked", on(grad, weight, mask_words, K)),
    ]


def _conv_calls(dtype, device, channels_last):
    N, C, H, W, O, groups = 2, 70, 6, 5, 4, 2  # 35 channels a group: two words each
    kernel, stride, padding, dilation = (3, 2), [2, 1], [1, 0, 2, 1], [1, 2]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, C, H, W, generator=g)
    sign_words, mask_words = pack_sign_and_mask_conv_reference(x, 0.8, groups)
    weight = pack_weight(torch.randn(O, C // groups, *kernel, generator=g))
    OH = (H + 1 - 3) // 2 + 1
    OW = (W + 3 - 2 * 1 - 1) // 1 + 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grad = _dyadic((N, O, OH, OW), 3, dtype).contiguous(memory_format=fmt)
    geometry = [stride, padding, dilation, groups]
    on = lambda *ts: [t.to(device) if isinstance(t, torch.Tensor) else t for t in ts]
    weight_shape = [O, C // groups, *kernel]
    return [
        ("binary_conv2d_grad_weight", on(grad, sign_words, weight_shape, *geometry, -1.0, None, channels_last)),
        ("binary_conv2d_grad_weight", on(grad, sign_words, weight_shape, *geometry, 0.0, torch.float32, False)),
        ("binary_conv2d_grad_input", on(grad, weight, mask_words, [N, C, H, W], *geometry, None, channels_last)),
        ("binary_conv2d_grad_input", on(grad, weight, None, [N, C, H, W], *geometry, torch.float32, False)),
    ]


def test_ops_are_registered_with_cuda_bodies():
    for name in OPS:
        assert hasattr(torch.ops.bnnops, name) and name in CUDA_IMPLEMENTATIONS
        assert torch.Tag.pt2_compliant_tag in getattr(torch.ops.bnnops, name).default.tags


@pytest.mark.parametrize("dtype, channels_last", [(torch.float32, False), (torch.bfloat16, True)], ids=str)
def test_cuda_bodies_equal_the_references(dtype, channels_last, device):
    """Each op's CUDA body (launcher glue included) against its CPU reference, bit for bit, with
    the dtype, shape and memory format the fake gives. (fp16 and the kernels' own configs:
    tests/test_backward_kernels.py.)"""
    for name, args in [*_linear_calls(dtype, device), *_conv_calls(dtype, device, channels_last)]:
        cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
        meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
        expected = getattr(torch.ops.bnnops, name)(*cpu)
        got = CUDA_IMPLEMENTATIONS[name](*args)
        fake = getattr(torch.ops.bnnops, name)(*meta)
        assert got.dtype == expected.dtype == fake.dtype and got.shape == expected.shape == fake.shape, name
        assert got.stride() == expected.stride() == fake.stride(), name
        assert torch.equal(got.cpu(), expected), name


def test_opcheck():
    for name, args in [*_linear_calls(torch.float16, DEVICE), *_conv_calls(torch.float32, DEVICE, True)]:
        torch.library.opcheck(getattr(torch.ops.bnnops, name).default, args)


def test_checks():
    (_, (grad, sign_words, K, _)), _, (_, (_, weight, mask_words, _)) = _linear_calls(torch.float32, "cpu")
    op = torch.ops.bnnops
    with pytest.raises(DtypeError, match="grad must be float"):
        op.binary_linear_grad_weight(grad.int(), sign_words, K)
    with pytest.raises(DtypeError, match="sign_words must be int32"):
        op.binary_linear_grad_weight(grad, sign_words.float(), K)
    with pytest.raises(ShapeError, match=r"sign_words must have shape \(7, 3\)"):
        op.binary_linear_grad_weight(grad, sign_words, 70)
    with pytest.raises(DeviceError, match="sign_words is on meta"):
        op.binary_linear_grad_weight(grad, sign_words.to("meta"), K)
    with pytest.raises(ShapeError, match="mask_words must have shape"):
        op.binary_linear_grad_input_masked(grad, weight, mask_words[:3], K)
    with pytest.raises(ShapeError, match="weight must have shape"):
        op.binary_linear_grad_input_masked(grad, weight[:2], mask_words, K)
    (_, wargs), _, (_, iargs), _ = _conv_calls(torch.float32, "cpu", False)
    with pytest.raises(ShapeError, match="is not the output"):
        op.binary_conv2d_grad_weight(wargs[0][:, :, 1:], *wargs[1:])
    with pytest.raises(ShapeError, match="sign_words must have shape"):
        op.binary_conv2d_grad_weight(wargs[0], wargs[1][..., :1], *wargs[2:])
    with pytest.raises(ValueError, match="pad_value"):
        op.binary_conv2d_grad_weight(*wargs[:7], 0.5, *wargs[8:])
    with pytest.raises(ShapeError, match="must divide"):
        op.binary_conv2d_grad_weight(*wargs[:6], 3, *wargs[7:])
    with pytest.raises(ShapeError, match="weight must have shape"):
        op.binary_conv2d_grad_input(iargs[0], iargs[1][..., :1], *iargs[2:])
    with pytest.raises(ShapeError, match="mask_words must have shape"):
        op.binary_conv2d_grad_input(iargs[0], iargs[1], iargs[2][:1], *iargs[3:])
    with pytest.raises(DtypeError, match="out_dtype"):
        op.binary_conv2d_grad_input(*iargs[:8], torch.int32, False)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        BinaryConv2d(3, 8, 3, padding=1, input_quantizer=None),
        nn.BatchNorm2d(8),
        BinaryConv2d(8, 36, 3, padding=1, pad_value=1.0, groups=2),
        nn.Flatten(),
        BinaryLinear(36 * 9, 5),
    ).to(DEVICE)


def test_compiled_training_step_runs_the_ops_and_matches_eager():
    model = _net()
    x = torch.randn(2, 3, 3, 3, device=DEVICE)
    model(x).square().sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    model.zero_grad()
    compiled(x).square().sum().backward()
    forward, backward = graphs
    # The training forward convolves x's sign words (x is packed once), and the backward reads them.
    assert "bnnops.binary_conv2d_packed" in forward and "bnnops.binary_linear_w1a1" in forward
    for name in OPS:
        assert f"bnnops.{name}" in backward, name
    for p, e in zip(model.parameters(), eager):
        # Eager and compiled run the same ops on CPU; the rest (BatchNorm) may reorder fp32 sums.
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)
