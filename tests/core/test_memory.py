import sys

import pytest
import torch

from slimlm.core.memory import HUGE_PAGE, hugepage_empty


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding `address` (Linux /proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError("no mapping holds the address")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_large_tensors_get_memory_advised_for_huge_pages(monkeypatch):
    t = hugepage_empty((3, HUGE_PAGE), torch.uint8)
    t.fill_(7)
    assert t.shape == (3, HUGE_PAGE) and t.is_contiguous() and int(t.sum()) == 7 * 3 * HUGE_PAGE
    assert "hg" in vm_flags(t.data_ptr())  # MADV_HUGEPAGE on its own mapping
    u = hugepage_empty((3, HUGE_PAGE), torch.uint8)
    assert u.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()  # one storage each (safetensors saves it)
    small = hugepage_empty((4, 4), torch.float32)
    assert "hg" not in vm_flags(small.data_ptr())
    monkeypatch.setenv("SLIMLM_HUGEPAGES", "0")
    plain = hugepage_empty((3, HUGE_PAGE), torch.uint8)
    assert "hg" not in vm_flags(plain.data_ptr())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_loaded_weights_sit_in_huge_page_memory_and_save_again(tmp_path):
    import slimlm
    from slimlm.testing import tiny_model
    from slimlm.testing.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab=len(tok), hidden=512, layers=1, intermediate_size=4096)
    slimlm.quantize(model, "rtn", bits=8, group_size=None)
    slimlm.save(model, tmp_path / "q", tok, format="slimlm")
    loaded, _ = slimlm.load(tmp_path / "q")
    big = loaded.model.layers[0].mlp.up_proj.qweight  # 4096 x 512 int8: 2 MiB
    embed = loaded.model.embed_tokens.weight
    assert big.nbytes == HUGE_PAGE and "hg" in vm_flags(big.data_ptr())
    x = torch.randint(0, len(tok), (1, 9))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)
    slimlm.save(loaded, tmp_path / "again", tok, format="slimlm")  # views of no shared storage: saves as usual
    again, _ = slimlm.load(tmp_path / "again")
    torch.testing.assert_close(again(x).logits, model(x).logits)
    assert embed.dtype == torch.float32


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_a_model_made_in_memory_moves_into_huge_pages_with_the_same_values_and_ties(monkeypatch):
    from slimlm.core.memory import in_hugepages, move_to_hugepages
    from slimlm.testing import tiny_model

    model = tiny_model("llama", vocab=1024, hidden=512, layers=1, intermediate_size=4096, tie_word_embeddings=True)
    model.register_buffer("window", torch.arange(3 * HUGE_PAGE, dtype=torch.uint8)[HUGE_PAGE:])  # a view: left alone
    up, embed = model.model.layers[0].mlp.up_proj.weight, model.model.embed_tokens.weight  # 8 MiB, 2 MiB (tied)
    assert model.lm_head.weight is embed and not in_hugepages(up)
    x = torch.randint(0, 1024, (1, 7))
    before = model(x).logits
    monkeypatch.setenv("SLIMLM_HUGEPAGES", "0")
    assert move_to_hugepages(model) == 0 and not in_hugepages(up)
    monkeypatch.delenv("SLIMLM_HUGEPAGES")
    moved = move_to_hugepages(model)
    assert moved == up.nbytes * 3 + embed.nbytes  # up, gate, down and the one embedding (tied: once)
    assert in_hugepages(up) and "hg" in vm_flags(up.data_ptr()) and model.model.layers[0].mlp.up_proj.weight is up
    assert in_hugepages(embed) and model.lm_head.weight.data_ptr() == embed.data_ptr()
    assert not in_hugepages(model.window) and model.window.storage_offset() == HUGE_PAGE
    assert not in_hugepages(model.model.layers[0].self_attn.q_proj.weight)  # 1 MiB: below a huge page
    torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)
    assert move_to_hugepages(model) == 0  # nothing left to move


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_the_engine_decodes_a_model_quantized_in_memory_from_huge_pages():
    import slimlm
    from slimlm.core.memory import in_hugepages
    from slimlm.engine.engine import Engine
    from slimlm.testing import tiny_model

    model = tiny_model("llama", vocab=256, hidden=512, layers=1, intermediate_size=4096)
    slimlm.quantize(model, "rtn", bits=8, group_size=None)
    qweight = model.model.layers[0].mlp.up_proj.qweight  # int8 4096 x 512: 2 MiB, a buffer
    assert not in_hugepages(qweight)
    ids = torch.randint(0, 256, (9,))
    reference = model(ids[None]).logits[0, -1]
    engine = Engine(model, slots=1, max_len=32)
    assert in_hugepages(model.model.layers[0].mlp.up_proj.qweight)
    torch.testing.assert_close(engine.prefill(0, ids), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_a_large_kv_cache_on_the_host_sits_in_huge_pages_and_starts_at_zero():
    from slimlm.core.memory import in_hugepages
    from slimlm.engine.kv_cache import KVCache

    cache = KVCache(2, 257, 16, 8, 64, 4096, torch.float32)  # 257 blocks x 8 heads x 16 x 64 x 4 bytes: 8 MiB a layer
    assert all(in_hugepages(t) and not t.any() for t in cache.tensors())
    small = KVCache(2, 3, 16, 8, 64, 32, torch.float32)
    assert not any(in_hugepages(t) for t in small.tensors()) and not any(t.any() for t in small.tensors())
