import torch

import slimlm
from slimlm.distillation.qat import FakeQuantLinear, convert_qat_, prepare_qat_
from slimlm.quant.primitives import fake_quantize
from slimlm.distillation.trainer import TrainConfig, train
from slimlm.quant.linear import QuantizedLinear
from slimlm.testing import tiny_model

BLOCKS = torch.randint(1, 300, (16, 33), generator=torch.Generator().manual_seed(0))


def test_fake_quant_forward_is_rtn_and_gradients_pass_straight_through():
    model = tiny_model("llama")
    slimlm.quantize(model, "rtn", bits=4, group_size=32)
    prepare_qat_(model)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, FakeQuantLinear)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
        plain.weight.copy_(layer.weight)
        rtn = QuantizedLinear.from_float(plain, layer.scheme)
        rtn.set_kernel_("reference")
    torch.testing.assert_close(layer(x), rtn(x), rtol=1e-5, atol=1e-5)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, torch.ones(3, layer.out_features).t() @ x)  # STE: d/dW as if unquantized


def test_qat_trains_and_converts_back_to_the_real_format():
    model = tiny_model("llama")
    slimlm.quantize(model, "rtn", bits=4, group_size=32)
    prepare_qat_(model)
    history = train(model, BLOCKS, None, TrainConfig(steps=10, batch_size=4, seq_len=33, warmup_steps=2, bf16=False, lr=3e-3))
    assert history[-1]["loss"] < history[0]["loss"]
    trained = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    convert_qat_(model)
    for name, w in trained.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantizedLinear)
        torch.testing.assert_close(layer.dequantize(torch.float32), fake_quantize(w, layer.scheme), rtol=1e-3, atol=1e-4)
