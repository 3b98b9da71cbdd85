"""capture_grads equals torch.autograd.grad on the same activations; no parameter grads kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import interp
from interp.chat import encode


def next_token_loss(logits, batch):
    """Per-example mean next-token cross-entropy over real tokens."""
    ids, mask = batch.input_ids, batch.attention_mask
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:].float()
    return (ce * m).sum(1) / m.sum(1)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "mixtral"])
def test_capture_grads_equals_autograd_grad(family):
    model = interp.tiny(family)
    batch = encode(
        model.tokenizer,
        [
            [{"role": "user", "content": "two plus two"}, {"role": "assistant", "content": "FOUR"}],
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HELLO THERE"}],
        ],
    )
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_mid", "blocks.2.hook_resid_pre"]
    got = interp.capture_grads(model, batch, next_token_loss, names, positions="pre_assistant")

    # Reference: keep the graph tensors with plain hooks and differentiate by hand.
    kept = {}
    keep = [(n, lambda t, h: kept.setdefault(h.name, t)) for n in names[:1] + names[2:]]
    with model.hooks(fwd=keep):
        logits = model(batch)
    loss = next_token_loss(logits, batch)
    refs = torch.autograd.grad(loss.sum(), [kept[names[0]], kept[names[2]]])
    rows = torch.arange(2)
    pos = batch.positions["pre_assistant"]
    torch.testing.assert_close(got.grads[names[0]], refs[0][rows, pos])
    torch.testing.assert_close(got.grads[names[2]], refs[1][rows, pos])
    torch.testing.assert_close(got.loss, loss.detach())
    # resid_mid's gradient: resid_post = mid + mlp(mid); pre-mid is resid_pre + attn.
    assert got.grads[names[1]].shape == (2, model.cfg.d_model)
    assert all(p.grad is None for p in model.model.parameters())


def test_a_list_of_named_positions_stacks_the_single_ones():
    model = interp.tiny("qwen2")
    batch = encode(
        model.tokenizer,
        [[{"role": "user", "content": "two plus two"}], [{"role": "user", "content": "hi"}]],
    )
    names = ["user_end", "pre_assistant"]
    both = interp.capture_grads(model, batch, next_token_loss, "blocks.*.hook_resid_post", names)
    for hook, grad in both.grads.items():
        assert grad.shape == (2, 2, model.cfg.d_model)
        for i, name in enumerate(names):
            one = interp.capture_grads(model, batch, next_token_loss, hook, positions=name)
            torch.testing.assert_close(grad[:, i], one.grads[hook])


def test_per_example_grad_is_the_grad_of_its_own_loss():
    model = interp.tiny("llama")
    ids = torch.randint(0, 250, (3, 8), generator=torch.Generator().manual_seed(3))
    batched = interp.capture_grads(
        model, ids, next_token_loss, "blocks.1.hook_resid_post", positions=-1
    )
    for row in range(3):
        alone = interp.capture_grads(
            model, ids[row : row + 1], next_token_loss, "blocks.1.hook_resid_post", positions=-1
        )
        torch.testing.assert_close(
            batched.grads["blocks.1.hook_resid_post"][row],
            alone.grads["blocks.1.hook_resid_post"][0],
            atol=1e-6,
            rtol=1e-5,
        )


def test_frozen_weights_and_activations_returned():
    model = interp.tiny("qwen3")
    for p in model.model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 250, (2, 6), generator=torch.Generator().manual_seed(4))
    got = interp.capture_grads(
        model, ids, next_token_loss, "blocks.*.hook_resid_post", return_activations=True
    )
    assert got.grads["blocks.2.hook_resid_post"].shape == (2, 6, model.cfg.d_model)
    assert got.grads["blocks.0.hook_resid_post"].abs().sum() > 0
    cache = interp.capture(model, ids, "blocks.*.hook_resid_post")
    for k in cache:
        assert torch.equal(got.activations[k], cache[k])


def test_loss_fn_must_return_a_differentiable_tensor():
    model = interp.tiny("llama")
    with pytest.raises(ValueError, match="loss_fn"):
        interp.capture_grads(model, "hi", lambda logits, b: 1.0, "blocks.0.hook_resid_post")
