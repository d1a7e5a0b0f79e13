"""The DSA top-k selection: ties at the cut go to the earliest positions, whatever the row's length, its
padding or the order topk returns — so prefill chunks, padded decode rows and the full forward agree."""

from __future__ import annotations

import torch

from dsv32.model.indexer import select_topk, select_topk_visible


def _sets(idx: torch.Tensor) -> list[set[int]]:
    return [set(r.tolist()) for r in idx.reshape(-1, idx.shape[-1])]


def test_tied_keys_at_the_cut_are_taken_earliest_first():
    # 3 keys above the cut, then six keys tied at exactly 0 (what the ReLU makes), then negatives
    row = torch.tensor([0.0, 0.5, 0.0, -1.0, 0.0, 0.9, 0.0, 0.7, 0.0, -0.2, 0.0])
    idx, valid = select_topk_visible(row[None], torch.ones(1, 11, dtype=torch.bool), 5)
    assert _sets(idx) == [{1, 5, 7, 0, 2}] and valid.all()


def test_selection_does_not_depend_on_padding_or_row_length():
    g = torch.Generator().manual_seed(0)
    S, k = 40, 16
    scores = torch.randn(8, S, generator=g).relu_()  # about half the keys score exactly 0
    visible = torch.ones(8, S, dtype=torch.bool)
    want, _ = select_topk_visible(scores, visible, k)
    padded = torch.cat([scores, torch.randn(8, 100, generator=g)], dim=-1)  # invisible keys past the row
    vis_padded = torch.cat([visible, torch.zeros(8, 100, dtype=torch.bool)], dim=-1)
    got, valid = select_topk_visible(padded, vis_padded, k)
    assert _sets(got) == _sets(want) and valid.all()
    # and each row alone
    for r in range(8):
        alone, _ = select_topk_visible(scores[r : r + 1], visible[r : r + 1], k)
        assert _sets(alone) == _sets(want[r : r + 1])
    # the chosen tied keys are the earliest ones
    for r in range(8):
        chosen = set(want[r].tolist())
        cut = scores[r, list(chosen)].min()
        tied = (scores[r] == cut).nonzero().squeeze(1).tolist()
        taken = [t for t in tied if t in chosen]
        assert taken == tied[: len(taken)]


def test_causal_rows_short_of_k_keys_report_invalid_slots():
    scores = torch.zeros(1, 4, 6)  # every visible key ties
    idx, valid = select_topk(scores, torch.arange(4), 3)
    assert valid.sum(-1).tolist() == [[1, 2, 3, 3]]
    for t in range(4):
        kept = idx[0, t][valid[0, t]].tolist()
        assert sorted(kept) == list(range(min(t + 1, 3)))


def test_sort_form_selects_the_same_keys():
    """The sort form (GPUs: no host sync, so CUDA graphs can capture it) picks the same set as the top-k form,
    ties, padding and rows short of k keys included."""
    from dsv32.model.indexer import select_topk_visible_sorted

    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 6, 50, generator=g).relu_()  # about half of them tie at 0
    scores[0, 0, :20] = 0.25  # a long run of equal scores straddling the cut
    visible = torch.rand(2, 6, 50, generator=g) < 0.7
    visible[1, 2] = False
    visible[1, 2, :5] = True  # a row with fewer visible keys than k
    for k in (1, 8, 16, 50, 64):
        want, want_valid = select_topk_visible(scores, visible, k)
        got, got_valid = select_topk_visible_sorted(scores, visible, k)
        assert got.shape == want.shape
        kept_want = [
            set(i[v].tolist()) for i, v in zip(want.flatten(0, 1), want_valid.flatten(0, 1), strict=True)
        ]
        kept_got = [
            set(i[v].tolist()) for i, v in zip(got.flatten(0, 1), got_valid.flatten(0, 1), strict=True)
        ]
        assert kept_got == kept_want, k
