"""Per-layer sensitivity on a tiny model: `keep` costs nothing, fewer bits cost more, the model is
left as it was, and the bytes each treatment is charged are what slimlm stores for it."""

import pytest
import torch

import slimlm
from slimlm.planner.sensitivity import measure_sensitivity, treatments
from slimlm.quant.linear import QuantizedLinear
from slimlm.testing import tiny_model


def test_sensitivity_orders_treatments_and_restores_the_model():
    model = tiny_model("llama", vocab=320, hidden=64)
    tokens = torch.randint(0, 320, (2, 32))
    with torch.no_grad():
        before = model(tokens).logits
    result = measure_sensitivity(model, tokens, names=["keep", "int8", "int4 g32", "int2 g32", "2:4"])
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, before)
    assert len(result.layers) == 14 and result.treatments[0] == "keep"
    total = {t: sum(row[j] for row in result.kl) for j, t in enumerate(result.treatments)}
    assert total["keep"] == 0 and 0 < total["int8"] < total["int4 g32"] < total["int2 g32"]
    assert all(len(layer) == 5 for layer in result.options())


def test_bytes_charged_are_what_slimlm_stores():
    table = treatments()
    for name, settings in [("int8", dict(bits=8, group_size=None, symmetric=True)),
                           ("int4 g32", dict(bits=4, group_size=32, symmetric=False)),
                           ("int4 g128", dict(bits=4, group_size=128, symmetric=False))]:
        model = tiny_model("llama", vocab=320, hidden=64)
        slimlm.quantize(model, "rtn", **settings)
        layer = model.model.layers[0].mlp.down_proj  # (64, 128)
        assert isinstance(layer, QuantizedLinear)
        stored = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.scale, layer.zero) if t is not None)
        assert table[name].stored("x", 64, 128, 4) == stored, name


def test_a_compressed_copy_is_a_treatment():
    from slimlm.planner.sensitivity import from_model

    model = tiny_model("llama", vocab=320, hidden=64)
    copy = slimlm.quantize(tiny_model("llama", vocab=320, hidden=64), "rtn", bits=4, group_size=32)
    tokens = torch.randint(0, 320, (2, 16))
    result = measure_sensitivity(model, tokens, names=["int4 g32"], extra={"copied int4 g32": from_model(copy)})
    # the copy holds the same RTN codes the built-in treatment makes: same KL, same bytes
    for row_kl, row_bytes in zip(result.kl, result.bytes):
        assert row_kl[0] == row_kl[1] and row_bytes[0] == row_bytes[1]


@pytest.mark.parametrize("method", ["fisher", "direct"])
def test_an_interrupted_measurement_resumes_with_the_same_result(tmp_path, method):
    model = tiny_model("llama", vocab=320, hidden=64)
    tokens = torch.randint(0, 320, (2, 16))
    names = ["keep", "int8", "int4 g32"]
    whole = measure_sensitivity(model, tokens, names=names, method=method)
    state = tmp_path / "state.json"
    seen = []

    def stop_after_five(done, total):
        seen.append(done)
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        measure_sensitivity(model, tokens, names=names, state=state, on_layer=stop_after_five, method=method)
    measured = []
    resumed = measure_sensitivity(model, tokens, names=names, state=state, method=method,
                                  on_layer=lambda done, total: measured.append(done))
    assert resumed.kl == whole.kl and resumed.bytes == whole.bytes
    # the saved rows are read, not measured again: a marked row comes back as saved
    import json

    saved = json.loads(state.read_text())
    first = resumed.layers[0]
    saved["rows"][first]["kl"][1] = 123.0
    state.write_text(json.dumps(saved))
    assert measure_sensitivity(model, tokens, names=names, state=state, method=method).kl[0][1] == 123.0
    # other tokens, or the other method: the saved rows do not apply, and the run starts afresh
    other = measure_sensitivity(model, torch.randint(0, 320, (2, 16)), names=names, state=state, method=method)
    assert other.kl != whole.kl
    other_method = "direct" if method == "fisher" else "fisher"
    assert measure_sensitivity(model, tokens, names=names, state=state, method=other_method).kl[0][1] != 123.0


def _ranks(values):
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0] * len(values)
    for r, i in enumerate(order):
        ranks[i] = r
    return ranks


def test_the_blockwise_second_order_estimate_ranks_like_the_direct_kl():
    """The `fisher` method (one block forward per candidate) against the oracle (one whole forward
    per candidate): the same ranking of the (layer, treatment) pairs, and sizes within 2x."""
    torch.manual_seed(0)
    model = tiny_model("llama", vocab=320, hidden=64, layers=3)
    tokens = torch.randint(0, 320, (4, 32))
    names = ["int8", "int4 g128", "int4 g32", "int3 g32", "int2 g32"]
    direct = measure_sensitivity(model, tokens, names=names, method="direct")
    fisher = measure_sensitivity(model, tokens, names=names, method="fisher", fisher_samples=8)
    a = [v for row in direct.kl for v in row]
    b = [v for row in fisher.kl for v in row]
    ra, rb = _ranks(a), _ranks(b)
    n = len(a)
    spearman = 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))
    assert spearman > 0.95, spearman
    assert 0.5 < sum(b) / sum(a) < 2.0, (sum(a), sum(b))


def test_an_unknown_method_or_treatment_is_a_clear_error():
    from slimlm.core.errors import SlimError

    model = tiny_model("llama", vocab=320, hidden=64)
    tokens = torch.randint(0, 320, (1, 8))
    with pytest.raises(SlimError, match="method"):
        measure_sensitivity(model, tokens, method="exact")
    with pytest.raises(SlimError, match="int5"):
        measure_sensitivity(model, tokens, names=["int5"])


def test_sensitivity_cli_writes_json_and_heatmap(tiny_folder, tmp_path, capsys):
    import json

    from tests.cli_helpers import one_line_error, run

    out = tmp_path / "s.json"
    code, text, err = run(capsys, "sensitivity", tiny_folder("llama"), "--windows", 2, "--seq-len", 32, "-o", out,
                          "--heatmap", tmp_path / "s.png", "--treatments", "keep", "--treatments", "int8",
                          "--treatments", "int4 g32")
    assert code == 0, err
    table = json.loads(out.read_text())
    assert table["treatments"] == ["keep", "int8", "int4 g32"] and len(table["kl"]) == 14
    assert all(row[0] == 0 and 0 < row[1] < row[2] * 10 for row in table["kl"])
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / ".s.json.partial.json").exists()
    one_line_error(*run(capsys, "sensitivity", tiny_folder("llama"), "--windows", 2, "--seq-len", 32, "-o", out)[::2],
                   "already exists")
    one_line_error(*run(capsys, "sensitivity", tiny_folder("llama"), "--windows", 2, "--seq-len", 32, "-o",
                        tmp_path / "t.json", "--treatments", "int5")[::2], "unknown treatment")
