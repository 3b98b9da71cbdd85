"""Intervention hook factories against manual edits; steering inside generate."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.interventions import (
    add_direction,
    compose,
    mean_ablate,
    patch_from,
    project_out,
    zero_ablate,
)

NAME = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return interp.tiny("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(5))


def seen_after(model, ids, hook):
    out = {}
    with model.hooks(fwd=[(NAME, hook), (NAME, lambda t, h: out.setdefault("v", t))]):
        model(ids)
    return out["v"]


@pytest.fixture(scope="module")
def clean(model, ids):
    return interp.capture(model, ids, NAME)[NAME]


def test_add_direction_at_positions(model, ids, clean):
    v = torch.randn(model.cfg.d_model)
    got = seen_after(model, ids, add_direction(v, 3.0, positions=[1, -1]))
    want = clean.clone()
    want[:, [1, -1]] += 3.0 * v
    torch.testing.assert_close(got, want)


def test_project_out_leaves_no_component(model, ids, clean):
    v = torch.randn(model.cfg.d_model)
    got = seen_after(model, ids, project_out(v))
    assert (got @ (v / v.norm())).abs().max() < 1e-4
    torch.testing.assert_close(
        got + ((clean @ v) / v.dot(v))[..., None] * v, clean, atol=1e-5, rtol=1e-5
    )


def test_zero_and_mean_ablation(model, ids, clean):
    assert seen_after(model, ids, zero_ablate(positions=2))[:, 2].abs().sum() == 0
    mean = clean.mean((0, 1))
    got = seen_after(model, ids, mean_ablate(mean))
    torch.testing.assert_close(got, mean.expand_as(got))


def test_patch_from_another_run(model, ids):
    other = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(6))
    source = interp.capture(model, other, NAME)
    patched = model.run_with_hooks(ids, fwd_hooks=[(NAME, patch_from(source))])
    # Patching the whole residual at layer 1 reproduces the other run from there on.
    torch.testing.assert_close(patched, model(other), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        model.run_with_hooks(ids[:, :3], fwd_hooks=[(NAME, patch_from(source))])


def test_compose_applies_in_order(model, ids, clean):
    v = torch.randn(model.cfg.d_model)
    got = seen_after(model, ids, compose(add_direction(v, 2.0), project_out(v)))
    assert (got @ (v / v.norm())).abs().max() < 1e-4


def test_steering_inside_generate_changes_the_continuation(model):
    batch = model.tokenize(["hello there"])
    plain = model.generate(batch, max_new_tokens=6, do_sample=False)
    v = interp.capture(model, batch, NAME, positions=-1)[NAME][0]
    seen_lengths = []

    def record(t, h):
        seen_lengths.append(t.shape[1])

    with model.hooks(fwd=[(NAME, add_direction(-8 * v / v.norm() * 10)), (NAME, record)]):
        steered = model.generate(batch, max_new_tokens=6, do_sample=False)
    assert not torch.equal(plain, steered)
    assert len(seen_lengths) >= 6  # the hook ran at every generation step
    again = model.generate(batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(plain, again)  # and it was removed afterwards


def test_direction_must_be_one_dimensional():
    # Under the test run jaxtyping rejects the shape first; without it, our own check does.
    with pytest.raises((ValueError, TypeError), match=r"1-D|d_model"):
        add_direction(torch.zeros(2, 3))
