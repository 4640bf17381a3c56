import pytest
import torch
from torch import nn

from bnnops import BinaryTensor, data, memory_report, models
from bnnops.nn import BinaryConv1d, BinaryConv2d, BinaryLinear, MaxPool2d

# name -> (number of classes, builder at a tiny width)
TINY = {
    "binarynet": (10, lambda wq: models.binarynet(10, (3, 32, 32), filters=4, dense_units=8, weight_quantizer=wq)),
    "birealnet18": (7, lambda wq: models.birealnet18(7, (3, 32, 32), filters=4, weight_quantizer=wq)),
    "small_bnn": (10, lambda wq: models.small_bnn(10, (1, 8, 8), filters=4, dense_units=8, weight_quantizer=wq)),
    "binary_mlp": (5, lambda wq: models.binary_mlp(5, (12,), hidden=(6, 7), weight_quantizer=wq)),
    "mnist1d_cnn": (10, lambda wq: models.mnist1d_cnn(10, (1, 40), width=5, dense_units=(7,), weight_quantizer=wq)),
    "mnist1d_mlp": (10, lambda wq: models.mnist1d_mlp(10, (1, 40), width=9, weight_quantizer=wq)),
}


def binary_layers(model):
    return [m for m in model.modules() if isinstance(m, (BinaryConv1d, BinaryConv2d, BinaryLinear))]


@pytest.mark.parametrize("weight_quantizer", [None, "ste_sign"])
@pytest.mark.parametrize("name", list(TINY))
def test_forward_backward(name, weight_quantizer):
    torch.manual_seed(0)
    classes, build = TINY[name]
    model = build(weight_quantizer)
    out = model(torch.randn(3, *model.input_shape))
    assert out.shape == (3, classes)
    out.logsumexp(1).sum().backward()
    layers = binary_layers(model)
    assert layers
    for layer in layers:
        w = layer.weight
        assert isinstance(w, BinaryTensor) == (weight_quantizer is None)
        assert w.grad is not None and w.grad.shape == w.shape and torch.isfinite(w.grad).all()
        assert w.grad.abs().sum() > 0
    for p in model.parameters():
        if p.requires_grad:
            assert p.grad is not None


def test_binarynet_is_the_papers():
    model = models.binarynet()
    convs = [m for m in model if isinstance(m, BinaryConv2d)]
    dense = [m for m in model if isinstance(m, BinaryLinear)]
    assert [c.out_channels for c in convs] == [128, 128, 256, 256, 512, 512]
    assert [(d.in_features, d.out_features) for d in dense] == [(512 * 3 * 3, 1024), (1024, 1024), (1024, 10)]
    # First layer: real input, no padding; all others binarize their input; no biases.
    assert convs[0].input_quantizer is None and convs[0].padding in (0, (0, 0))
    assert all(m.input_quantizer is not None for m in convs[1:] + dense)
    assert all(m.bias is None for m in convs + dense)
    # Batch norm after every binary layer, scale frozen at 1 (Keras scale=False), last one included.
    bns = [m for m in model if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 9 and not any(bn.weight.requires_grad for bn in bns)
    assert isinstance(model[-1], nn.BatchNorm1d) and model[-1].num_features == 10
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["binarynet", "small_bnn"])
def test_vgg_pools_keep_one_byte_per_output(name):
    """BinaryNet-style models pool with bnnops.nn.MaxPool2d: one uint8 per pooled output kept for
    backward, and no state (checkpoints are those of torch's pool)."""
    model = TINY[name][1](None)
    pools = {n: m for n, m in model.named_modules() if isinstance(m, nn.MaxPool2d)}
    assert pools and all(type(m) is MaxPool2d for m in pools.values())
    assert not any(key.startswith(tuple(pools)) for key in model.state_dict())
    names = {m: n for n, m in pools.items()}
    outputs = {}

    def record(module, args, out):  # pooled outputs per sample
        outputs[names[module]] = out[0].numel()

    hooks = [m.register_forward_hook(record) for m in pools.values()]
    report = memory_report(model, batch=2)
    for hook in hooks:
        hook.remove()
    kept = {layer.name: layer.per_sample for layer in report.layers if layer.name in pools}
    assert kept == outputs


def test_birealnet18_structure():
    model = models.birealnet18(10, (3, 64, 64), filters=8)
    binary = binary_layers(model)
    assert len(binary) == 16 and all(isinstance(m, BinaryConv2d) for m in binary)
    # real stem and classifier, real shortcuts
    assert type(model.stem) is nn.Conv2d and type(model.fc) is nn.Linear
    assert type(model.stem_pool) is nn.MaxPool2d  # overlapping 3x3/2 windows: torch's pool
    downsampling = [b for b in model if isinstance(b, models._BiRealBlock) and not isinstance(b.shortcut, nn.Identity)]
    assert len(downsampling) == 3
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_mlp_represents_the_teacher_exactly():
    d = data.teacher_student(seed=1, n_train=64, n_test=500, in_features=20, hidden=24, num_classes=6)
    model = models.binary_mlp(6, (20,), hidden=(24,))
    with torch.no_grad():
        model.fc1.weight.copy_(d.info["teacher"]["w1"])
        model.fc2.weight.copy_(d.info["teacher"]["w2"])
    model.eval()  # batch norms at their initial running statistics (mean 0, var 1): near identity
    assert (model(d.x_test).argmax(1) == d.y_test).all()


def test_build():
    model = models.build("small_bnn", (1, 8, 8), 10)
    assert model.input_shape == (1, 8, 8)
    # One name per model: its function's, in Python and on the command line alike.
    assert set(models.MODELS) == set(TINY) and all(f.__name__ == name for name, f in models.MODELS.items())
    with pytest.raises(ValueError, match="unknown model 'small-bnn'"):
        models.build("small-bnn", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="unknown model 'vgg'.*binarynet"):
        models.build("vgg", (1, 8, 8), 10)


def test_mnist1d_models():
    """The binary CNN: a real first conv, three binary 1-D convs (W1A1), pools to 10 positions, a
    binary classifier, the documented weight counts; the float baselines are the MNIST-1D
    paper's (ConvBase: 5,210 parameters at width 25; MLPBase: 15,210 at width 100)."""
    cnn = models.mnist1d_cnn(width=16)
    convs = [m for m in cnn.modules() if isinstance(m, BinaryConv1d)]
    assert type(cnn.conv1) is nn.Conv1d and cnn.conv1.weight.shape == (16, 1, 5)
    assert len(convs) == 3 and all(c.input_quantizer for c in convs)
    assert cnn.fc5.in_features == 16 * 10
    assert sum(layer.weight.numel() for layer in binary_layers(cnn)) == 9 * 16**2 + 10 * 16 * 10
    assert cnn(torch.randn(2, 1, 40)).shape == (2, 10)
    for model, params in ((models.mnist1d_float_cnn(), 5210), (models.mnist1d_float_mlp(), 15210)):
        assert not binary_layers(model) and sum(p.numel() for p in model.parameters()) == params
        assert model(torch.randn(3, 1, 40)).shape == (3, 10)
    assert models.mnist1d_float_cnn(width=8)(torch.randn(2, 1, 40)).shape == (2, 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_inference_replays_in_a_cuda_graph():
    """Small-batch inference is bound by host time; a CUDA graph removes it. The layers' kernels
    must capture (no host sync, no allocation outside the graph's pool) and a replay on new input
    must give the eager output bit for bit (the same kernels run)."""
    torch.manual_seed(0)
    model = models.binarynet(10, (3, 32, 32), filters=32, dense_units=64).to("cuda", torch.bfloat16).eval()
    static_x = torch.randn(2, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):  # compiles the kernels and fills the caches outside the capture
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = model(static_x)
    x = torch.randn_like(static_x)
    static_x.copy_(x)
    graph.replay()
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(static_y, expected)
