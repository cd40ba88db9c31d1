import torch

import slimlm
from slimlm.distillation.lora import LoRALinear, add_lora_, merge_lora_
from slimlm.distillation.trainer import TrainConfig, train
from slimlm.testing import tiny_model

BLOCKS = torch.randint(1, 300, (16, 33), generator=torch.Generator().manual_seed(0))
CONFIG = TrainConfig(steps=12, batch_size=4, seq_len=33, warmup_steps=2, bf16=False, lr=1e-2)


def logits(model):
    with torch.no_grad():
        return model(BLOCKS[:2]).logits


def test_adapters_start_at_the_base_model_and_only_they_train():
    model = tiny_model("llama")
    before = logits(model)
    frozen = {n: p.clone() for n, p in model.named_parameters()}
    add_lora_(model, rank=4, targets=("*.q_proj", "*.v_proj", "*.mlp.*"))
    assert torch.equal(logits(model), before)  # B = 0
    history = train(model, BLOCKS, None, CONFIG)
    assert history[-1]["loss"] < history[0]["loss"]
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, frozen[name.replace(".base", "")]), name
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    assert not isinstance(model.model.layers[0].self_attn.k_proj, LoRALinear)


def test_merging_into_float_weights_is_exact():
    model = tiny_model("llama")
    add_lora_(model, rank=4)
    train(model, BLOCKS, None, CONFIG)
    with_adapters = logits(model)
    merge_lora_(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(logits(model), with_adapters, rtol=1e-4, atol=1e-4)


def test_lora_on_a_quantized_model_trains_and_merges_by_requantizing():
    model = tiny_model("llama")
    slimlm.quantize(model, "rtn", bits=4, group_size=32)
    add_lora_(model, rank=4)
    history = train(model, BLOCKS, None, CONFIG)
    assert history[-1]["loss"] < history[0]["loss"]
    with_adapters = logits(model)
    merge_lora_(model)
    layers = [m for m in model.modules() if hasattr(m, "scheme")]
    assert layers and all(m.scheme.bits == 4 for m in layers)
    merged = logits(model)
    def per_token_kl(p, q):
        return float(torch.nn.functional.kl_div(p.flatten(0, 1).log_softmax(-1), q.flatten(0, 1).log_softmax(-1),
                                                log_target=True, reduction="batchmean"))

    rtn_cost = per_token_kl(logits(tiny_model("llama")), logits(slimlm.quantize(tiny_model("llama"), "rtn", bits=4,
                                                                                 group_size=32)))
    # lossy (codes move) but no worse than quantizing a float model in the first place
    assert per_token_kl(merged, with_adapters) < max(rtn_cost, 1e-3)
