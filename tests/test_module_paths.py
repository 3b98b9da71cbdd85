"""Any module of a Hugging Face model by its ``named_modules()`` path: ``<path>.hook_in`` /
``<path>.hook_out``, with the semantics of canonical names."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.families import tiny_hf
from interp.hooks import HookNameError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    return interp.tiny("llama")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(0))


def n_torch_hooks(module: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in module.modules()
    )


def plain_torch(model, ids, path):
    """The module's first positional input / keyword input and its output, by plain hooks."""
    module = model.model.get_submodule(path)
    seen = {}

    def pre(_m, args, kwargs):
        seen["in"] = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))

    def post(_m, _a, output):
        seen["out"] = output

    handles = [
        module.register_forward_pre_hook(pre, with_kwargs=True),
        module.register_forward_hook(post),
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize(
    "path, first",
    [
        ("model.layers.1.mlp.down_proj", None),  # a Linear: tensor in, tensor out
        ("model.layers.1.self_attn", 0),  # returns (attn_output, attn_weights)
        ("model.layers.0", None),  # a decoder layer
        ("model.embed_tokens", None),  # integer input ids in
        ("model", "last_hidden_state"),  # kwargs only in, a ModelOutput out
        ("model.rotary_emb", 0),  # (cos, sin) out
    ],
)
def test_capture_equals_the_modules_own_input_and_output(llama, ids, path, first):
    ref = plain_torch(llama, ids, path)
    out = ref["out"] if first is None else ref["out"][first]
    cache = interp.capture(llama, ids, [f"{path}.hook_in", f"{path}.hook_out"])
    assert torch.equal(cache[f"{path}.hook_in"], ref["in"])
    assert torch.equal(cache[f"{path}.hook_out"], out)


def test_edits_take_effect_and_match_the_canonical_name(llama, ids):
    clean = llama(ids)

    def zero(t, h):
        return torch.zeros_like(t)

    by_path = llama.run_with_hooks(ids, fwd_hooks=[("model.layers.1.mlp.hook_out", zero)])
    canonical = llama.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_mlp_out", zero)])
    assert (by_path - clean).abs().max() > 1e-3
    torch.testing.assert_close(by_path, canonical, atol=0, rtol=0)
    # an input edit: down_proj's input is mlp.hook_post
    a = llama.run_with_hooks(ids, fwd_hooks=[("model.layers.0.mlp.down_proj.hook_in", zero)])
    b = llama.run_with_hooks(ids, fwd_hooks=[("blocks.0.mlp.hook_post", zero)])
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - clean).abs().max() > 1e-3

    def halve_(t, h):
        t.mul_(0.5)  # in place, returning None

    c = llama.run_with_hooks(ids, fwd_hooks=[("model.layers.1.self_attn.hook_out", halve_)])
    d = llama.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_attn_out", lambda t, h: t * 0.5)])
    torch.testing.assert_close(c, d, atol=0, rtol=0)
    # a kwargs-only input (the decoder stack gets input_ids=...) and a ModelOutput
    e = llama.run_with_hooks(ids, fwd_hooks=[("model.hook_in", lambda t, h: t.flip(-1))])
    torch.testing.assert_close(e, llama(ids.flip(-1)), atol=0, rtol=0)
    g = llama.run_with_hooks(ids, fwd_hooks=[("model.hook_out", lambda t, h: t * 0.0)])
    assert g.abs().max() == 0


def test_globs_expand_over_module_paths_but_star_does_not(llama):
    names = llama.resolve("model.layers.*.mlp.down_proj.hook_in")
    assert names == [f"model.layers.{i}.mlp.down_proj.hook_in" for i in range(3)]
    assert llama.resolve(["blocks.0.hook_resid_post", "model.norm.hook_out"]) == [
        "blocks.0.hook_resid_post",
        "model.norm.hook_out",
    ]
    everything = llama.resolve("*")
    assert list(everything) == list(llama.hook_names)
    assert not any(n.endswith((".hook_in", ".hook_out")) for n in llama.hook_names)
    assert len(llama.resolve("*.hook_out")) > 20  # every module, by explicit request
    # containers have no forward: no names for them
    with pytest.raises(HookNameError):
        llama.resolve("model.layers.hook_out")


def test_unknown_paths_raise_with_the_closest_names(llama):
    with pytest.raises(HookNameError) as err:
        llama.resolve("model.layers.0.mlp.down_prj.hook_in")
    assert "model.layers.0.mlp.down_proj.hook_in" in str(err.value)
    with pytest.raises(HookNameError) as err:
        with llama.hooks(fwd=[("model.layers.9.mlp.hook_out", lambda t, h: None)]):
            pass
    assert "model.layers.2.mlp.hook_out" in str(err.value)
    with pytest.raises(HookNameError, match=r"model\.layers\.0\.mlp\.hook_out"):
        llama.resolve("model.layers.0.mlp")  # a path without .hook_in / .hook_out
    # typos of canonical names still get canonical suggestions
    with pytest.raises(HookNameError, match=r"blocks\.1\.hook_resid_post"):
        llama.resolve("blocks.1.hook_resid_pots")


def test_hooks_are_removed_after_exceptions(llama, ids):
    before = n_torch_hooks(llama.model)

    def boom(t, h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with llama.hooks(
            fwd=[("model.layers.*.mlp.hook_in", lambda t, h: None)],
            bwd=[("model.layers.*.self_attn.hook_out", lambda g, h: None)],
        ):
            with llama.hooks(fwd=[("model.layers.1.mlp.down_proj.hook_out", boom)]):
                llama(ids)
    assert n_torch_hooks(llama.model) == before


def test_backward_hooks_give_gradients_of_the_module_boundaries(llama, ids):
    def loss_fn(logits, batch):
        return logits[:, -1].logsumexp(-1).sum()

    grads = interp.capture_grads(
        llama,
        ids,
        loss_fn,
        [
            "model.layers.1.mlp.hook_out",
            "blocks.1.hook_mlp_out",
            "model.layers.1.mlp.down_proj.hook_in",
            "blocks.1.mlp.hook_post",
            "model.layers.1.hook_in",
            "blocks.1.hook_resid_pre",
        ],
    ).grads
    assert grads["model.layers.1.mlp.hook_out"].abs().sum() > 0
    torch.testing.assert_close(grads["model.layers.1.mlp.hook_out"], grads["blocks.1.hook_mlp_out"])
    torch.testing.assert_close(
        grads["model.layers.1.mlp.down_proj.hook_in"], grads["blocks.1.mlp.hook_post"]
    )
    torch.testing.assert_close(grads["model.layers.1.hook_in"], grads["blocks.1.hook_resid_pre"])


def test_peft_models_use_the_paths_of_the_wrapped_transformers_model(ids):
    peft = pytest.importorskip("peft")
    base, tok = tiny_hf("llama", seed=0)
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    wrapped = peft.get_peft_model(base, config)
    model = interp.load(wrapped, tokenizer=tok)
    name = "model.layers.1.mlp.down_proj.hook_out"
    clean, cache = interp.capture(model, ids, name, return_logits=True)
    assert cache[name].shape == (2, 7, 64)
    lora = interp.capture(model, ids, "model.layers.1.mlp.down_proj.lora_B.default.hook_out")
    assert lora["model.layers.1.mlp.down_proj.lora_B.default.hook_out"].abs().sum() > 0
    edited = model.run_with_hooks(ids, fwd_hooks=[(name, lambda t, h: t * 0.0)])
    assert (edited - clean).abs().max() > 1e-3
    with pytest.raises(HookNameError, match=r"model\.layers\.1\.mlp\.down_proj\.hook_out"):
        model.resolve("base_model.model.model.layers.1.mlp.down_proj.hook_out")
