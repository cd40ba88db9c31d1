import pytest
import torch

from slimlm.core.calibrate import capture_block_inputs, find_blocks, run_blockwise, sample_windows
from slimlm.core.data import read_documents, split_range
from slimlm.core.errors import SlimError
from slimlm.core.targeting import select_linear
from slimlm.testing import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_are_found(family):
    model = tiny_model(family)
    path, blocks = find_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers


class Recorder:
    def __init__(self):
        self.seen = {}

    def observe(self, name, module, x):
        self.seen[name] = self.seen.get(name, 0) + x.reshape(-1, x.shape[-1]).shape[0]

    def compress(self, name, module):
        return None


@pytest.mark.parametrize("family", FAMILIES)
def test_driver_observes_every_target_once_per_token_and_keeps_outputs(family):
    model = tiny_model(family)
    samples = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(samples).logits
    targets = select_linear(model)
    rec = Recorder()
    run_blockwise(model, samples, targets, rec, batch_size=2)
    assert set(rec.seen) == set(targets) and set(rec.seen.values()) == {48}
    with torch.no_grad():
        assert torch.equal(model(samples).logits, before)


def test_block_inputs_replay_reproduces_the_model():
    """Feeding captured inputs through all blocks and the final norm/head gives the model's logits."""
    model = tiny_model("llama")
    samples = torch.randint(0, 300, (2, 12))
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], samples, batch_size=2)
    args, kwargs = inputs[0]
    with torch.no_grad():
        hidden = args[0]
        for block in blocks:
            out = block(hidden, *args[1:], **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        logits = model.lm_head(model.model.norm(hidden))
        torch.testing.assert_close(logits, model(samples).logits)


def test_sample_windows_are_seeded_and_checked():
    ids = torch.arange(1000)
    a, b = sample_windows(ids, 4, 50, seed=3), sample_windows(ids, 4, 50, seed=3)
    assert torch.equal(a, b) and a.shape == (4, 50)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 49, dtype=torch.long))
    with pytest.raises(SlimError, match="fewer than one"):
        sample_windows(torch.arange(10), 2, 50)


def test_document_ranges(tmp_path):
    (tmp_path / "a.txt").write_text("\n<|endoftext|>\n".join(f"doc {i}" for i in range(10)))
    assert read_documents(f"{tmp_path}/a.txt@2:4") == ["doc 2", "doc 3"]
    assert read_documents(f"{tmp_path}/a.txt@8:") == ["doc 8", "doc 9"]
    assert split_range("x.txt") == ("x.txt", slice(None))
    with pytest.raises(SlimError, match="is empty"):
        read_documents(f"{tmp_path}/a.txt@20:30")
    with pytest.raises(SlimError, match="must look like"):
        read_documents(f"{tmp_path}/a.txt@a:b")
