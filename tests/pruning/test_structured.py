import pytest
import torch

import slimlm
from slimlm.core.errors import SlimError
from slimlm.engine.engine import Engine
from slimlm.engine.generate import SamplingParams, generate_ids
from slimlm.testing import tiny_model
from slimlm.testing.tiny import tiny_tokenizer

CALIB = torch.randint(1, 300, (4, 32), generator=torch.Generator().manual_seed(0))
IMPORTANCE = ["magnitude", "activation", "gradient"]


def reload(model, tmp_path):
    """Save, then load with plain transformers: the config alone must describe the new shapes."""
    from transformers import AutoModelForCausalLM

    slimlm.save(model, tmp_path / "m")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()


def same_logits(a, b):
    with torch.no_grad():
        torch.testing.assert_close(a(CALIB[:1]).logits, b(CALIB[:1]).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("importance", IMPORTANCE)
def test_channels_shrink_the_mlp_and_reload_in_transformers(importance, tmp_path):
    model = tiny_model("llama")  # intermediate 128
    slimlm.prune(model, "channels", sparsity=0.25, importance=importance, calibration=CALIB)
    assert model.config.intermediate_size == 96
    assert all(b.mlp.down_proj.in_features == 96 and b.mlp.up_proj.out_features == 96 for b in model.model.layers)
    same_logits(model, reload(model, tmp_path))


def test_channel_removal_is_exact_for_a_dead_channel():
    """Channels whose down-projection column is zero contribute nothing: removing them changes nothing."""
    model = tiny_model("llama")
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.down_proj.weight[:, :32] = 0
    before = model(CALIB[:1]).logits
    slimlm.prune(model, "channels", sparsity=0.25)  # magnitude: the 32 dead channels score 0
    torch.testing.assert_close(model(CALIB[:1]).logits, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("importance", IMPORTANCE)
def test_heads_respect_gqa_groups(family, importance, tmp_path):
    """8 query heads over 2 kv heads (groups of 4): 25% removes one query head from each group."""
    model = tiny_model(family, num_attention_heads=8, num_key_value_heads=2)  # groups of 4
    slimlm.prune(model, "heads", sparsity=0.25, importance=importance, calibration=CALIB)
    assert model.config.num_attention_heads == 6 and model.config.num_key_value_heads == 2
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 6 * attn.head_dim and attn.k_proj.out_features == 2 * attn.head_dim
    slimlm.save(model, tmp_path / "h", tiny_tokenizer())
    again, _ = slimlm.load(tmp_path / "h")  # transformers 5.24 refuses 6 heads over hidden 64; slimlm.load restores it
    same_logits(model, again)
    # the engine runs the pruned model and agrees with transformers
    prompt = CALIB[:1, :8]
    ours = generate_ids(again, prompt, SamplingParams(max_new_tokens=8), engine=True)
    theirs = again.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours[0], theirs[0, 8:])


def test_heads_without_gqa_remove_keys_and_values_too():
    model = tiny_model("llama", num_key_value_heads=4)  # 4 heads, no grouping
    slimlm.prune(model, "heads", sparsity=0.5)
    attn = model.model.layers[0].self_attn
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 2
    assert attn.k_proj.out_features == 2 * attn.head_dim
    assert torch.isfinite(model(CALIB[:1]).logits).all()


def test_blocks_remove_the_most_input_like_block(tmp_path):
    model = tiny_model("llama", layers=5)
    with torch.no_grad():  # block 3 barely changes its input: its output projections are tiny
        model.model.layers[3].self_attn.o_proj.weight.mul_(1e-3)
        model.model.layers[3].mlp.down_proj.weight.mul_(1e-3)
    kept = [model.model.layers[i] for i in (0, 1, 2, 4)]
    slimlm.prune(model, "blocks", sparsity=0.2, calibration=CALIB)
    assert list(model.model.layers) == kept and model.config.num_hidden_layers == 4
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2, 3]
    again = reload(model, tmp_path)
    same_logits(model, again)
    Engine(again, slots=1, max_len=32).prefill(0, CALIB[0, :8])  # cache indexed by the new layer numbers


def test_structured_errors():
    with pytest.raises(SlimError, match="layout"):
        slimlm.prune(tiny_model("gpt2"), "channels", sparsity=0.25)
    with pytest.raises(SlimError, match="removes none"):
        slimlm.prune(tiny_model("llama"), "blocks", sparsity=0.1, calibration=CALIB)  # 2 blocks * 0.1 rounds to 0
    with pytest.raises(SlimError, match="importance"):
        slimlm.prune(tiny_model("llama"), "channels", sparsity=0.25, importance="nope")
    with pytest.raises(SlimError, match="calibration"):
        slimlm.prune(tiny_model("llama"), "channels", sparsity=0.25, importance="activation")


def test_global_channel_pruning_leaves_layers_of_different_sizes_that_reload(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():  # 40 of layer 1's channels are dead: a global ranking takes them first
        model.model.layers[1].mlp.down_proj.weight[:, :40] = 0
    slimlm.prune(model, "channels", sparsity=0.25, scope="global")
    sizes = [b.mlp.up_proj.out_features for b in model.model.layers]
    assert sizes[0] > sizes[1] and sizes[1] <= 128 - 40 and sum(sizes) == 2 * 96
    slimlm.save(model, tmp_path / "g", tiny_tokenizer())
    again, _ = slimlm.load(tmp_path / "g")
    assert [b.mlp.up_proj.out_features for b in again.model.layers] == sizes
    same_logits(model, again)
    prompt = CALIB[:1, :8]
    ours = generate_ids(again, prompt, SamplingParams(max_new_tokens=6), engine=True)
    theirs = again.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours[0], theirs[0, 8:])
