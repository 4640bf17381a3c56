import pytest
import torch
from torch import nn

import bnnops
from bnnops import models
from bnnops.nn import BinaryConv2d, BinaryLinear


def tiny_model(weight_quantizer=None):
    return nn.Sequential(
        BinaryConv2d(3, 4, 3, padding=1, bias=False, input_quantizer=None, weight_quantizer=weight_quantizer),
        nn.BatchNorm2d(4),
        BinaryConv2d(4, 8, 3, stride=2, padding=1, weight_quantizer=weight_quantizer),
        nn.Flatten(),
        BinaryLinear(32, 5, weight_quantizer=weight_quantizer),
        nn.Linear(5, 3),
    )


# Counted by hand for input (3, 4, 4):
# conv0: weight 4*3*3*3 = 108 binary, words (4, 3, 3, ceil(3/32)=1) = 36 -> 144 B; real input,
#        so 108 * (4*4 outputs) = 1728 real MACs.
# bn1:   weight, bias, running mean, running var: 4 each = 16 real -> 64 B.
# conv2: weight 8*4*3*3 = 288 binary, words (8, 3, 3, 1) = 72 -> 288 B; bias 8 -> 32 B;
#        output 8x2x2: 288 * 4 = 1152 binary MACs.
# fc4:   weight 5*32 = 160 binary, words (5, 1) -> 20 B; bias 5 -> 20 B; 160 binary MACs.
# fc5:   nn.Linear 15 + 3 = 18 real -> 72 B; 15 real MACs.
EXPECTED = {
    "0": (108, 0, 144, 0, 1728, (4, 4, 4)),
    "1": (0, 16, 64, 0, 0, (4, 4, 4)),
    "2": (288, 8, 320, 1152, 0, (8, 2, 2)),
    "3": (0, 0, 0, 0, 0, (32,)),
    "4": (160, 5, 40, 160, 0, (5,)),
    "5": (0, 18, 72, 0, 15, (3,)),
}


@pytest.mark.parametrize("weight_quantizer", [None, "ste_sign"])
def test_counts_by_hand(weight_quantizer, capsys):
    model = tiny_model(weight_quantizer)
    model.train()
    s = bnnops.summary(model, (3, 4, 4))
    assert model.training  # mode restored
    rows = {layer.name: layer for layer in s.layers}
    assert list(rows) == list(EXPECTED)
    for name, (binary, real, memory, bmacs, rmacs, shape) in EXPECTED.items():
        r = rows[name]
        assert (r.binary_params, r.real_params, r.memory_bytes, r.binary_macs, r.real_macs, r.output_shape) == (
            binary,
            real,
            memory,
            bmacs,
            rmacs,
            shape,
        ), name
    assert rows["2"].input_binary and not rows["0"].input_binary
    assert (s.binary_params, s.real_params) == (556, 47)
    assert s.memory_bytes == 640 and s.float32_bytes == 4 * 603
    assert s.compression == pytest.approx(2412 / 640)
    assert (s.binary_macs, s.real_macs) == (1312, 1743)
    assert s.binary_mac_ratio == pytest.approx(1312 / 3055)
    printed = capsys.readouterr().out
    assert printed == str(s) + "\n" and "compression 3.77x" in printed
    d = s.to_dict()
    assert d["totals"]["memory_bytes"] == 640 and d["layers"][2]["binary_macs"] == 1152


def test_model_input_shape_and_errors():
    model = models.small_bnn(filters=4, dense_units=8)
    s = bnnops.summary(model, print_table=False)  # the model carries its input shape
    assert s.input_shape == (1, 8, 8)
    assert s.binary_params == 1 * 4 * 9 + 4 * 4 * 9 + 8 * 4 * 9 + 8 * 2 * 2 * 8 + 8 * 10
    with pytest.raises(ValueError, match="shape of one input sample"):
        bnnops.summary(tiny_model(), print_table=False)


def test_binarynet_totals():
    # BinaryNet's binary weights, layer by layer: 3*128*9 + 128*128*9 + 128*256*9 + 256*256*9
    # + 256*512*9 + 512*512*9 (convs), 4608*1024 + 1024*1024 + 1024*10 (dense).
    s = bnnops.summary(models.binarynet(), print_table=False)
    convs = 9 * (3 * 128 + 128 * 128 + 128 * 256 + 256 * 256 + 256 * 512 + 512 * 512)
    assert s.binary_params == convs + 4608 * 1024 + 1024 * 1024 + 1024 * 10
    # All but the first conv's MACs are binary (the first sees the real image, 30x30 outputs).
    assert s.real_macs == 3 * 128 * 9 * 30 * 30


def test_memory_report_counts_saved_bytes_and_training_state():
    """Bytes kept for backward by tiny_model, counted by hand for input (3, 4, 4), float32:

    conv "0" (W1A16, real input): x, 3*4*4*4 = 192 B/sample. bn "1": its input (the conv's
    output, 4*4*4*4 = 256 B/sample) and 2 vectors of 4 fp32 batch statistics (fixed 32 B).
    conv "2" (ste_sign): sign and mask words, one word per pixel each: 2*16*4 = 128 B/sample.
    fc "4" (ste_sign): 32 inputs, one word each for sign and mask: 8 B/sample. nn.Linear "5": its
    input, 5*4 = 20 B/sample.
    """
    from bnnops.memory import memory_report

    model = tiny_model()
    report = memory_report(model, (3, 4, 4), batch=3)
    rows = {layer.name: layer for layer in report.layers}
    assert {name: rows[name].per_sample for name in ("0", "2", "4", "5")} == {"0": 192, "2": 128, "4": 8, "5": 20}
    assert rows["1"].per_sample == 256 and rows["1"].fixed == 32
    assert rows["2"].saved_bytes == 3 * 128 and rows["2"].fixed == 0
    assert report.saved_bytes == sum(layer.saved_bytes for layer in report.layers)
    # Training state: packed words + fp32 dense grad + fp32 m, against 16 B a weight.
    states = {w.name: w for w in report.weights}
    assert (states["2.weight"].weight_bytes, states["2.weight"].grad_bytes, states["2.weight"].optimizer_bytes) == (
        288,
        4 * 288,
        4 * 288,
    )
    assert report.latent_adam_bytes == 16 * 556
    assert "per weight" in str(report)
    bf16_state = memory_report(model, (3, 4, 4), batch=1, state_dtype=torch.bfloat16, second_order=True)
    assert {w.name: w.optimizer_bytes for w in bf16_state.weights}["4.weight"] == 2 * 2 * 160
