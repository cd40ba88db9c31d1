import pytest
import torch

from slimlm.pruning import masks as M


def test_topk_mask_per_layer_and_per_row():
    scores = torch.tensor([[1.0, 5.0, 3.0, 2.0], [9.0, 8.0, 7.0, 6.0]])
    layer = M.topk_mask(scores, 0.5)
    assert layer.tolist() == [[False, False, False, False], [True, True, True, True]]
    row = M.topk_mask(scores, 0.5, per_row=True)
    assert row.tolist() == [[False, True, True, False], [True, True, False, False]]


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_topk_mask_prunes_the_requested_fraction(sparsity):
    scores = torch.randn(16, 64)
    for per_row in (False, True):
        mask = M.topk_mask(scores, sparsity, per_row)
        assert abs((1 - mask.float().mean()) - sparsity) < 1 / 64
        # every kept score is at least every pruned one (in its row / the layer)
        if 0 < sparsity:
            if per_row:
                assert all((s[m].min() >= s[~m].max()) for s, m in zip(scores, mask))
            else:
                assert scores[mask].min() >= scores[~mask].max()


def test_global_masks_share_one_threshold():
    scores = {"a": torch.arange(8.0).view(2, 4), "b": torch.arange(8.0, 16.0).view(2, 4)}
    masks = M.global_masks(scores, 0.5)
    assert not masks["a"].any() and masks["b"].all()


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_exactly_n_of_every_m(n, m):
    scores = torch.randn(8, 32)
    mask = M.nm_mask(scores, n, m)
    groups = mask.view(8, 32 // m, m)
    assert (groups.sum(-1) == n).all()
    # the kept ones are the largest of their group
    g = scores.view(8, 32 // m, m)
    kept_min = torch.where(groups, g, torch.inf).amin(-1)
    dropped_max = torch.where(~groups, g, -torch.inf).amax(-1)
    assert (kept_min >= dropped_max).all()
    w = torch.randn(8, 32)
    assert M.is_nm_sparse(M.apply_mask_(w, mask), n, m)


def test_pattern_parsing_and_errors():
    assert M.parse_pattern("2:4") == (2, 4)
    for bad in ("4:2", "2-4", "0:4", "a:b"):
        with pytest.raises(ValueError):
            M.parse_pattern(bad)
    with pytest.raises(ValueError, match="multiple of 4"):
        M.nm_mask(torch.randn(2, 6), 2, 4)


def test_sparsity_counts_exact_zeros():
    assert M.sparsity(torch.tensor([0.0, 1.0, 0.0, -2.0])) == 0.5
