"""interp.losses.sft_loss_per_example: one mean cross-entropy per row over its own targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from interp.losses import sft_loss, sft_loss_per_example


def test_each_row_is_its_own_mean_over_its_targets():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=gen)
    ids = torch.randint(0, 11, (3, 6), generator=gen)
    mask = torch.tensor(
        [[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool
    )
    got = sft_loss_per_example(logits, ids, mask)
    for b in range(3):
        t = mask[b].nonzero().flatten()
        want = F.cross_entropy(logits[b, t - 1], ids[b, t])
        torch.testing.assert_close(got[b], want)
    # one row alone gives the batch loss of that row
    torch.testing.assert_close(got[1], sft_loss(logits[1:2], ids[1:2], mask[1:2]))


def test_rows_do_not_share_gradients_and_bf16_is_upcast():
    logits = torch.randn(2, 5, 7, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss = sft_loss_per_example(logits, ids, mask)
    assert loss.dtype == torch.float32 and loss.shape == (2,)
    (g,) = torch.autograd.grad(loss[0], logits)
    assert g[1].abs().sum() == 0 and g[0].abs().sum() > 0


def test_a_row_without_targets_is_an_error():
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        sft_loss_per_example(
            torch.zeros(2, 3, 4),
            torch.zeros(2, 3, dtype=torch.long),
            torch.tensor([[0, 1, 1], [1, 0, 0]]),
        )
