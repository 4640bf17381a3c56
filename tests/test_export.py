"""Converted and folded models through torch.export (dynamic batch), torch.export.save / load (in a
fresh process: loading needs ``import bnnops``, which registers the ops) and torch.compile
(fullgraph). Each against the eager model on fresh random inputs, bit for bit: the graphs call the
same ops on the same tensors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import randomize_batch_norms
from torch import nn

import bnnops
from bnnops.folded_layers import FoldedBinaryConv2d, FoldedBinaryLinear
from bnnops.folding import fold_for_inference
from bnnops.scaled import ScaledBinaryLinear

REPO = Path(__file__).resolve().parent.parent


def trained_like(model: nn.Module) -> nn.Module:
    return randomize_batch_norms(model, torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def binarynet_pair():
    """(converted, folded) BinaryNet with ragged widths (12 filters, 40 dense units) on 12x12 images."""
    torch.manual_seed(0)
    latent = bnnops.models.binarynet(input_shape=(3, 12, 12), filters=12, dense_units=40, weight_quantizer="ste_sign")
    converted = bnnops.convert(trained_like(latent))
    return converted, fold_for_inference(converted)


def images(batch: int, seed: int, size: int = 12) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tiny_folded() -> nn.Module:
    """A small converted-then-folded model with every folded module kind: a W1A16 scaled first conv
    writing words, a packed max pool, a W1A1 conv, a repacked flatten (12 channels), a real-output
    linear reading words."""
    torch.manual_seed(3)
    latent = nn.Sequential(
        bnnops.nn.BinaryConv2d(3, 8, 3, padding=1, input_quantizer=None, weight_quantizer="magnitude_aware_sign"),
        nn.MaxPool2d(2),
        nn.BatchNorm2d(8),
        bnnops.nn.BinaryConv2d(8, 12, 3, weight_quantizer="ste_sign"),
        nn.BatchNorm2d(12),
        nn.Flatten(),
        bnnops.nn.BinaryLinear(12 * 4, 5, weight_quantizer="ste_sign"),
    )
    return fold_for_inference(bnnops.convert(trained_like(latent)))


@pytest.mark.slow  # ~10-16 s of fixed cost: a fresh interpreter importing torch, export.load, a dynamic export
def test_export_save_load_in_a_fresh_process(tmp_path):
    # The folded program (its layers read and write packed words) with a dynamic batch, saved, then
    # loaded and run by a fresh interpreter that imports bnnops and nothing of this test.
    folded = tiny_folded()
    kinds = {type(m).__name__ for m in folded.modules()}
    assert {"FoldedBinaryConv2d", "FoldedBinaryLinear", "PackedMaxPool2d", "PackedFlatten"} <= kinds
    program = torch.export.export(folded, (images(4, 1, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    x = images(7, 2, 8)  # another batch size than the traced one
    with torch.no_grad():
        want = folded(x)
        assert torch.equal(program.module()(x), want)
    torch.export.save(program, tmp_path / "folded.pt2")
    torch.save({"x": x, "want": want}, tmp_path / "io.pt")
    code = (
        "import sys, torch\n"
        "import bnnops  # registers torch.ops.bnnops.*: loading the program needs it\n"
        "program = torch.export.load(sys.argv[1] + '/folded.pt2')\n"
        "io = torch.load(sys.argv[1] + '/io.pt', weights_only=True)\n"
        "assert torch.equal(program.module()(io['x']), io['want'])\n"
        "print('ok')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


@pytest.mark.parametrize("variant", ["converted", "folded"])
def test_compile_fullgraph(binarynet_pair, variant):
    model = dict(zip(("converted", "folded"), binarynet_pair))[variant]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = images(5, 3).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))


def test_export_converted_with_scaled_layers():
    # magnitude_aware_sign layers convert to bnnops.scaled layers: their scale buffer enters the graph.
    torch.manual_seed(1)
    latent = nn.Sequential(
        bnnops.nn.BinaryConv2d(3, 20, 3, padding=1, input_quantizer=None, weight_quantizer="magnitude_aware_sign"),
        nn.BatchNorm2d(20),
        nn.Flatten(),
        bnnops.nn.BinaryLinear(20 * 144, 7, weight_quantizer="magnitude_aware_sign"),
    )
    converted = bnnops.convert(trained_like(latent))
    assert isinstance(converted[3], ScaledBinaryLinear)
    program = torch.export.export(converted, (images(2, 4),))
    x = images(2, 5)
    with torch.no_grad():
        assert torch.equal(program.module()(x), converted(x))


def test_folded_magnitude_aware_binarynet_keeps_the_converted_output():
    # Converted magnitude_aware_sign layers carry a scale (bnnops.scaled): folding must keep it.
    torch.manual_seed(2)
    latent = bnnops.models.binarynet(
        input_shape=(3, 12, 12), filters=8, dense_units=16, weight_quantizer="magnitude_aware_sign"
    )
    converted = bnnops.convert(trained_like(latent))
    folded = fold_for_inference(converted)
    kinds = [type(m) for m in folded.modules()]
    # Every (scaled) binary layer folds: all but the classifier write packed words, which it reads.
    assert kinds.count(FoldedBinaryConv2d) == 6 and kinds.count(FoldedBinaryLinear) == 3
    layers = [m for m in folded.modules() if isinstance(m, FoldedBinaryConv2d | FoldedBinaryLinear)]
    assert [m.threshold is not None for m in layers] == [True] * 8 + [False]
    x = images(16, 6)
    with torch.no_grad():
        assert torch.equal(folded(x), converted(x))
