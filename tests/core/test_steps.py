"""The one plug-in table: compression steps keyed by config class with string aliases, registries
with explicit built-in lists, kernels chosen through the same table."""

import subprocess
import sys

import pytest
import torch

import slimlm
from slimlm.core.errors import SlimError
from slimlm.core.registry import Registry
from slimlm.core.steps import STEPS
from slimlm.testing import tiny_model, tiny_tokenizer


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_config_object_and_a_name_reach_the_same_step():
    by_name = slimlm.quantize(tiny_model("llama"), "rtn", bits=4, group_size=32)
    by_config = slimlm.quantize(tiny_model("llama"), slimlm.RTNConfig(bits=4, group_size=32))
    a, b = weights(by_name), weights(by_config)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert by_config.slimlm_recipe == by_name.slimlm_recipe
    pruned = slimlm.prune(tiny_model("llama"), slimlm.WandaConfig(sparsity=0.5, n_samples=4, seq_len=16),
                          tokenizer=tiny_tokenizer())
    assert pruned.config.slimlm_sparsity["method"] == "wanda"


def test_each_step_is_found_by_its_config_class_and_its_name():
    for step in STEPS.steps():
        config = step.config_cls()
        assert STEPS.for_config(config) is step and STEPS.get(step.name) is step


def test_a_subclass_of_a_config_dispatches_to_its_base_step():
    class MyGPTQ(slimlm.GPTQConfig):
        pass

    assert STEPS.for_config(MyGPTQ()).name == "gptq"


def test_wrong_verb_and_mixed_arguments_are_clear_errors():
    model = tiny_model("llama")
    with pytest.raises(SlimError, match="'wanda' is a prune method; use slimlm.prune"):
        slimlm.quantize(model, "wanda")
    with pytest.raises(SlimError, match="'gptq' is a quantize method"):
        slimlm.prune(model, slimlm.GPTQConfig())
    with pytest.raises(SlimError, match="inside RTNConfig"):
        slimlm.quantize(model, slimlm.RTNConfig(), bits=4)
    with pytest.raises(SlimError, match="unknown quantization method 'nope'; valid: cast, rtn, gptq"):
        slimlm.quantize(model, "nope")


def test_a_recipe_dispatches_each_step_by_its_type():
    """Pruning then quantization in one recipe, as dicts or as configs, give the same model."""
    tok = tiny_tokenizer()
    steps = [{"method": "wanda", "sparsity": 0.5, "n_samples": 4, "seq_len": 16}, {"method": "rtn", "bits": 4}]
    a = slimlm.apply(tiny_model("llama"), steps, tok)
    b = slimlm.apply(tiny_model("llama"), [slimlm.WandaConfig(sparsity=0.5, n_samples=4, seq_len=16),
                                           slimlm.RTNConfig(bits=4)], tok)
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [s["method"] for s in a.slimlm_recipe] == ["wanda", "rtn"]


def test_tables_are_complete_before_any_lookup():
    """Listing a table in a fresh process loads its built-ins (no lookup needed first)."""
    code = ("from slimlm.core.steps import STEPS; from slimlm.quant.kernels import KERNELS;"
            "print(sorted(STEPS.names('prune'))); print(len(KERNELS.names()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split("\n")
    assert out[0] == str(sorted(["magnitude", "random", "taylor", "wanda", "sparsegpt", "heads", "channels", "blocks"]))
    assert int(out[1]) >= 11


def test_a_user_kernel_registered_first_does_not_hide_the_built_ins():
    """Registered before the first forward, a user's kernel runs the layers it supports, and the
    built-in kernels still run the others (it used to stop them registering at all)."""
    code = """
import torch
from slimlm.quant.kernels import KERNELS, KernelBase
from slimlm.quant.linear import QuantizedLinear
from slimlm.quant.scheme import QuantScheme

class Mine(KernelBase):
    name = "mine"
    def supports(self, layer, device): return layer.scheme.bits == 3
    def prepare(self, layer, dtype): return None
    def run(self, x, layer, state): return layer.reference_matmul(x)

KERNELS.register("mine", Mine())
for bits in (3, 8):
    lin = torch.nn.Linear(64, 32)
    layer = QuantizedLinear.from_float(lin, QuantScheme(bits=bits, group_size=32 if bits == 3 else None))
    layer(torch.randn(2, 64))
    print(layer.kernel)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    kernels = out.stdout.split()
    assert kernels[0] == "mine" and kernels[1] != "mine" and kernels[1] != "reference", out.stderr


def test_registry_refuses_a_second_entry_under_one_name():
    registry: Registry[int] = Registry("thing", {"one": "math:pi"})
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("one", 1)
    registry.register("two", 2)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("two", 3)
    assert registry.names() == ["one", "two"] and registry.get("one") == pytest.approx(3.14159, abs=1e-5)
    with pytest.raises(SlimError, match="unknown thing 'three'; valid: one, two"):
        registry.get("three")


def test_w8a8_layers_run_through_the_kernel_table():
    model = tiny_model("llama")
    slimlm.quantize(model, "smoothquant", calibration=torch.randint(0, 300, (2, 16)))
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    fast = layer(x)
    assert layer.kernel == "w8a8_int_mm"
    torch.testing.assert_close(fast, layer.set_kernel_("reference")(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(SlimError, match="kernel 'cpu_int4' cannot run"):
        layer.set_kernel_("cpu_int4")(x)
