"""SFTLoss(exclude_key=...): cross-entropy on the response tokens outside a span."""

from __future__ import annotations

import pytest
import torch

from interp.losses import sft_loss
from interp.positions import Batch
from interp.train import SFTLoss


def _batch() -> tuple[torch.Tensor, Batch]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (2, 7), generator=gen)
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    span_s = torch.tensor([[0, 0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    batch = Batch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        masks={"loss_mask": loss_mask, "span_s": span_s},
    )
    return torch.randn(2, 7, 11, generator=gen), batch


def test_exclude_key_drops_the_span_from_the_loss():
    logits, batch = _batch()
    outside = batch.masks["loss_mask"] & ~batch.masks["span_s"]
    got = SFTLoss(exclude_key="span_s")(logits, batch)
    torch.testing.assert_close(got, sft_loss(logits, batch.input_ids, outside))
    # Not the loss over the whole response (the span's tokens are left out).
    assert not torch.allclose(got, SFTLoss()(logits, batch))
    # A dict batch reads the same masks.
    as_dict = {"input_ids": batch.input_ids, **batch.masks}
    torch.testing.assert_close(SFTLoss(exclude_key="span_s")(logits, as_dict), got)


def test_a_missing_exclude_mask_is_an_error():
    logits, batch = _batch()
    with pytest.raises(KeyError, match="span_o"):
        SFTLoss(exclude_key="span_o")(logits, batch)
