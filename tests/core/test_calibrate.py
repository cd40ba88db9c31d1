import pytest
import torch

from slimlm.core.calibrate import capture_block_inputs, run_blockwise, sample_windows
from slimlm.core.layers import find_blocks
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


def test_sequential_stages_follow_execution_order():
    from slimlm.core.calibrate import sequential_stages

    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], torch.randint(0, 300, (1, 8)))
    local = {n: m for n, m in select_linear(model).items() if n.startswith("model.layers.0.")}
    stages = sequential_stages(blocks[0], list(local), local, inputs)
    short = [[n.rsplit(".", 1)[-1] for n in stage] for stage in stages]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


class Compressor(Recorder):
    """Replaces each layer by a perturbed copy, so later stages must see the change."""

    def __init__(self):
        super().__init__()
        self.inputs = {}

    def observe(self, name, module, x):
        super().observe(name, module, x)
        self.inputs.setdefault(name, x.clone())

    def compress(self, name, module):
        new = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        new.load_state_dict(module.state_dict())
        with torch.no_grad():
            new.weight.mul_(1.5)
        return new


def test_sequential_driver_shows_later_stages_the_compressed_earlier_ones():
    samples = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    seen = {}
    for sequential in (False, True):
        model = tiny_model("llama")
        step = Compressor()
        run_blockwise(model, samples, select_linear(model), step, batch_size=2, sequential=sequential)
        assert set(step.seen.values()) == {32}
        seen[sequential] = step.inputs
    first = "model.layers.0.self_attn.q_proj"
    assert torch.equal(seen[True][first], seen[False][first])  # the first stage sees the same inputs
    o_proj = "model.layers.0.self_attn.o_proj"
    assert not torch.allclose(seen[True][o_proj], seen[False][o_proj])  # o_proj sees the perturbed v_proj
