"""bench/stubbed_launches.py: CPU tensors through the CUDA code path with every Triton launch a
counted no-op. It must count the launches each layer call makes, and leave nothing switched after
it: the ops give their references again, no kernel registration stays, also after an exception."""

import os

import pytest
import torch
import torch.nn.functional as F

import bnnops
import bnnops.layer_common
from bench.cases.host_cost import _layer_pair, layer_call
from bench.stubbed_launches import STAND_IN_DEVICE, cuda_path_on_cpu
from bnnops import BinaryTensor
from bnnops.ops import library

pytest.importorskip("triton")

# The interpreter's conv backward config never splits the reduction; the SM90 table with the
# stand-in's 132 SMs splits this tiny grad_weight, which adds the kernel that sums the shares.
_SPLIT_SUM = {} if os.environ.get("TRITON_INTERPRET") == "1" else {"_sum_shares_kernel": 1}
EXPECTED = {
    ("linear", False): {"gemm_kernel": 1},
    # pack x once (sign and mask words); W1A1 forward on the sign words, grad_input, grad_weight.
    ("linear", True): {"_pack_sign_and_mask_kernel": 1, "gemm_kernel": 3},
    ("conv2d", False): {"_prepare_kernel": 1, "_conv2d_kernel": 1},
    ("conv2d", True): {
        "_pack_sign_and_mask_kernel": 1,
        "_prepare_kernel": 1,
        "_conv2d_kernel": 1,
        "_grad_input_kernel": 1,
        "_grad_weight_kernel": 1,
        **_SPLIT_SUM,
    },
}


def _dispatch_tables():
    return {op.name(): torch._C._dispatch_dump(op.name()) for op in library.KERNELS}


@pytest.mark.parametrize("layer,training", list(EXPECTED))
def test_counts_the_launches_of_a_layer_call(layer, training):
    torch.manual_seed(0)
    ours, _, x = _layer_pair(layer, "cpu")
    x.requires_grad_(training)
    call = layer_call(ours, x, training)
    with cuda_path_on_cpu() as launches:
        call()
        assert dict(launches) == EXPECTED[layer, training]
        launches.clear()
        call()
        assert dict(launches) == EXPECTED[layer, training]
    if training:
        assert ours.weight.grad is not None and x.grad is not None
    call()  # the CPU path again: no launch counted
    assert dict(launches) == EXPECTED[layer, training]


def test_functional_calls_and_f_linear():
    w = BinaryTensor.from_float(torch.randn(64, 64))
    wc = BinaryTensor.from_float(torch.randn(32, 32, 3, 3))
    x, xc = torch.randn(4, 64), torch.randn(1, 32, 8, 8)
    with cuda_path_on_cpu() as launches:
        for run, expected in (
            (lambda: F.linear(x, w), {"gemm_kernel": 1}),
            (lambda: bnnops.binary_linear(x, w), {"gemm_kernel": 1}),
            (lambda: bnnops.binary_conv2d(xc, wc, padding=1), {"_prepare_kernel": 1, "_conv2d_kernel": 1}),
        ):
            launches.clear()
            y = run()
            assert dict(launches) == expected
            assert y.device.type == "cpu"


def test_switches_and_answers_the_device_query():
    with cuda_path_on_cpu():
        assert torch.cuda.get_device_properties(torch.device("cpu")) == STAND_IN_DEVICE
        assert all(by_device["cpu"] is by_device["cuda"] for by_device in library.KERNELS.values())
        assert bnnops.layer_common.runs_kernels(torch.zeros(1))
        assert bnnops.layer_common.packs_before_product(torch.zeros(1))
    assert not any(by_device["cpu"] is by_device["cuda"] for by_device in library.KERNELS.values())
    assert not bnnops.layer_common.runs_kernels(torch.zeros(1))
    assert not bnnops.layer_common.packs_before_product(torch.zeros(1))


def _reference_results():
    """Fresh random inputs through the ops' CPU path, and the results the pure-PyTorch reference
    gives them."""
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())))
    x, dense = torch.randn(5, 70, generator=g), torch.randn(9, 70, generator=g)
    words = bnnops.packing.pack_weight(dense)
    signs = torch.where(dense < 0, -1.0, 1.0)
    got = (
        torch.ops.bnnops.binary_linear_w1a16(x, words, None, None, None),
        library.call(torch.ops.bnnops.binary_linear_w1a1.default, x, words, 70, None, None, torch.float32),
        bnnops.binary_linear(x, BinaryTensor.from_float(dense), input_quantizer=None),
    )
    expected = (x @ signs.T, torch.where(x < 0, -1.0, 1.0) @ signs.T, x @ signs.T)
    return got, expected


def _assert_reference_path():
    for got, expected in zip(*_reference_results()):
        torch.testing.assert_close(got, expected)


def test_restores_the_ops():
    tables = _dispatch_tables()
    _assert_reference_path()
    with cuda_path_on_cpu() as launches:
        assert _dispatch_tables() != tables  # the override is registered meanwhile
        _reference_results()
        assert launches  # the ops launched (no reference ran)
    assert _dispatch_tables() == tables
    _assert_reference_path()


def test_restores_on_an_exception():
    tables = _dispatch_tables()
    from triton.runtime.jit import JITFunction

    run, properties = JITFunction.run, torch.cuda.get_device_properties
    with pytest.raises(RuntimeError, match="the body failed"), cuda_path_on_cpu():
        raise RuntimeError("the body failed")
    assert _dispatch_tables() == tables
    assert JITFunction.run is run
    assert not any(by_device["cpu"] is by_device["cuda"] for by_device in library.KERNELS.values())
    assert torch.cuda.get_device_properties is properties
    _assert_reference_path()
    # A bad input inside it still gets the op's error (the CUDA kernel's check), and exits cleanly.
    with pytest.raises(bnnops.ShapeError), cuda_path_on_cpu():
        torch.ops.bnnops.binary_linear_w1a16(torch.randn(2, 3), torch.zeros(4, 2, dtype=torch.int32), None, None, None)
    assert _dispatch_tables() == tables


def test_layer_host_cost_stubbed_shapes_run():
    """The benchmark's "..., CUDA path stubbed" shapes: ours runs STUBBED_CALLS layer calls under
    the stub (every launch counted, none run) and leaves the stub off afterwards."""
    from bench.cases import host_cost

    tables = _dispatch_tables()
    for layer, training in (("linear", True), ("conv2d", False)):
        workload = host_cost.layer_host_cost("cpu", layer, training, stubbed=True)
        workload.ours()
        for baseline in workload.baselines.values():
            baseline()
    assert _dispatch_tables() == tables
    _assert_reference_path()
    with pytest.raises(ValueError, match="CPU tensors"):
        host_cost.layer_host_cost("meta", "linear", True, stubbed=True)
