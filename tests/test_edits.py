"""Edits count at every hook name: an in-place edit (returned, or not returned) changes the
model's computation exactly as the same edit returned as a new tensor does.

Parametrized over ``model.hook_names`` at run time, so every name an adapter adds is
covered, derived ones (``resid_mid`` on Hugging Face models, router outputs) included.
"""

from __future__ import annotations

import pytest
import torch

import interp

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(11))


def _edit_in_place(act: torch.Tensor) -> None:
    if act.is_floating_point():
        act.mul_(0.5).add_(0.25)
    else:  # expert indices: route every token to expert 0
        act.zero_()


def _edit_out_of_place(act: torch.Tensor) -> torch.Tensor:
    return act * 0.5 + 0.25 if act.is_floating_point() else torch.zeros_like(act)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma2", "mixtral"])
def test_in_place_edits_equal_replacements_at_every_name(family):
    model = interp.tiny(family)
    with torch.no_grad():
        clean = model(IDS)
        unchanged = []
        for name in model.hook_names:
            replaced = model.run_with_hooks(
                IDS, fwd_hooks=[(name, lambda a, h: _edit_out_of_place(a))]
            )

            def returned(a, h):
                _edit_in_place(a)
                return a

            def not_returned(a, h):
                _edit_in_place(a)

            for fn in (returned, not_returned):
                got = model.run_with_hooks(IDS, fwd_hooks=[(name, fn)])
                torch.testing.assert_close(got, replaced, msg=f"{family} {name} {fn.__name__}")
            if torch.equal(replaced, clean):
                unchanged.append(name)
    # An edit that changes nothing would make the comparison vacuous; only names whose
    # edit cannot reach the logits may be left (none today).
    assert not unchanged, f"{family}: edits at {unchanged} left the logits unchanged"
