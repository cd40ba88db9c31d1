import pytest
import torch

import slimlm
from slimlm.core.files import folder_bytes
from slimlm.pruning.storage import pack_bitmask, unpack_bitmask
from slimlm.core.layers import weight_matrix as layer_weight
from slimlm.testing import tiny_model
from slimlm.testing.tiny import tiny_tokenizer

CALIB = torch.randint(1, 300, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("k", [8, 13, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitmask_round_trip_is_exact(k, dtype):
    w = torch.randn(5, k).to(dtype)
    w[torch.rand(5, k) < 0.6] = 0
    bitmask, values = pack_bitmask(w)
    assert bitmask.shape == (5, (k + 7) // 8) and values.numel() == int((w != 0).sum())
    assert torch.equal(unpack_bitmask(bitmask, values, k), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruned_model_is_stored_smaller_and_reloads_exactly(dtype, tmp_path):
    dense = tiny_model("llama", hidden=128).to(dtype)
    slimlm.save(dense, tmp_path / "dense", tiny_tokenizer())
    model = tiny_model("llama", hidden=128).to(dtype)
    slimlm.prune(model, "magnitude", sparsity=0.5)
    slimlm.save(model, tmp_path / "sparse", tiny_tokenizer())
    assert folder_bytes(tmp_path / "sparse") < 0.75 * folder_bytes(tmp_path / "dense")
    again, _ = slimlm.load(tmp_path / "sparse")
    assert again.config.slimlm_sparsity["storage"]["format"] == "bitmask"
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name
    if dtype == torch.float32:  # (a bf16 model cast in memory keeps bf16 RoPE buffers; a loaded one float32)
        with torch.no_grad():
            assert torch.equal(model(CALIB[:1]).logits, again(CALIB[:1]).logits)
    slimlm.save(again, tmp_path / "again", tiny_tokenizer())  # and it saves again the same way
    assert folder_bytes(tmp_path / "again") == folder_bytes(tmp_path / "sparse")


def test_pruned_then_quantized_model_round_trips(tmp_path):
    model = tiny_model("llama")
    slimlm.prune(model, "wanda", pattern="2:4", calibration=CALIB)
    slimlm.quantize(model, "rtn", bits=4, group_size=32)
    slimlm.save(model, tmp_path / "q", tiny_tokenizer())
    again, _ = slimlm.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(model(CALIB[:1]).logits, again(CALIB[:1]).logits)
    assert layer_weight(again.lm_head).abs().sum() > 0
