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
