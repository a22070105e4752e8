"""int8 weight-only quantization: the layer equals its dequantized float reference, the quantized model
stays close to the float one (and is self-consistent under prefill + decode), and misuse fails clearly."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import random_owl3
from hyperowl.errors import CheckpointError
from hyperowl.quantize import Int8Linear, is_quantized, quantize_int8


@torch.no_grad()
def test_int8_linear_matches_its_dequantized_weight_and_bounds_the_rounding_error():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    q = Int8Linear.from_weight(lin.weight, lin.bias)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.shape == (40, 96)
    # rounding to the nearest of 255 levels: at most half a step per weight
    assert ((q.dequantized() - lin.weight).abs() <= q.scales[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 7, 96)
    ref = F.linear(x, q.dequantized(), lin.bias)
    assert (q(x) - ref).abs().max() <= 1e-4
    assert (q(x) - lin(x)).abs().max() <= 0.02 * lin(x).abs().max()


@pytest.mark.parametrize("variant", ["240728", "241101"])
@torch.no_grad()
def test_quantized_model_is_close_to_float_and_decodes_consistently(variant):
    model = random_owl3(variant)
    qmodel = copy.deepcopy(model)
    stats = quantize_int8(qmodel)
    assert stats["layers"] > 0 and stats["bytes_after"] < stats["bytes_before"] / 3
    assert not any(isinstance(m, torch.nn.Linear) for n, m in qmodel.decoder.named_modules())
    assert any(isinstance(m, torch.nn.Linear) for m in qmodel.vision.modules())  # the tower stays float by default
    torch.manual_seed(1)
    ids = torch.randint(10, 1000, (1, 20))
    pv = torch.randn(2, 3, model.config.vision.image_size, model.config.vision.image_size)
    pos = torch.tensor([[2, 9]])
    ref = model(ids, pixel_values=pv, image_positions=pos).logits
    full = qmodel(ids, pixel_values=pv, image_positions=pos).logits
    rel = (full - ref).norm() / ref.norm()
    assert rel < 0.05, rel
    # prefill + decode of the quantized model equals its own full forward
    cache = qmodel.new_cache(4)
    got = [qmodel(ids[:, :15], pixel_values=pv, image_positions=pos, cache=cache).logits]
    for j in range(15, 20):
        got.append(qmodel(ids[:, j : j + 1], cache=cache).logits)
    assert (torch.cat(got, 1) - full).abs().max() <= 1e-4


def test_quantized_model_cannot_be_saved(tmp_path):
    from hyperowl.checkpoint import save_owl3

    model = random_owl3("240728")
    quantize_int8(model)
    with pytest.raises(CheckpointError, match="quantized"):
        save_owl3(model, tmp_path / "out")


def test_load_with_int8_and_an_unknown_option(owl3_fixture_dir):
    import hyperowl

    m = hyperowl.load(owl3_fixture_dir, device="cpu", quantize="int8")
    assert is_quantized(m.model)
    with pytest.raises(ValueError, match="int8"):
        hyperowl.load(owl3_fixture_dir, device="cpu", quantize="int4")
