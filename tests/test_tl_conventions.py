"""TransformerLens's keyword arguments, honoured or refused on every backend.

The same calls on the Hugging Face adapter, on a ``TransformerBridge`` of the same
weights and on a ``HookedTransformer`` (TransformerLens 3 only), each checked against an
independent reference: ``F.cross_entropy`` for the loss, a full forward's captures for
``stop_at_layer``, TransformerLens's own ``HookedTransformer`` where it exists.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import interp
from interp.cache import ActivationCache, get_act_name
from interp.conventions import Output
from interp.families import byte_tokenizer, tiny_hf
from interp.hooks import HookNameError
from interp.positions import Batch

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning"),
]

BACKENDS = ["hf", "bridge", "hooked_transformer"]


def bridge_of(hf_model, tokenizer, cls=None):
    from transformer_lens.model_bridge import TransformerBridge

    # The bridge rewires the HF modules and edits the tokenizer (BOS, padding side) in
    # place, so it gets copies of both.
    cls = cls or TransformerBridge
    return cls.boot_transformers(
        "interp-test", hf_model=copy.deepcopy(hf_model), tokenizer=copy.deepcopy(tokenizer)
    )


def hooked_transformer_cls(name="HookedTransformer", module="transformer_lens.HookedTransformer"):
    mod = pytest.importorskip(module, reason="TransformerLens 4 removed HookedTransformer")
    return getattr(mod, name)


def ht_config(**kw):
    from transformer_lens import HookedTransformerConfig

    base = dict(
        n_layers=3, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_vocab=259, act_fn="gelu", seed=0
    )
    return HookedTransformerConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def raw():
    return tiny_hf("llama", seed=0)


@pytest.fixture(scope="module")
def hf(raw):
    return interp.load(raw[0], tokenizer=raw[1])


@pytest.fixture(scope="module")
def bridge(raw):
    return interp.load(bridge_of(*raw))


@pytest.fixture(scope="module")
def ht():
    return interp.load(hooked_transformer_cls()(ht_config()))


@pytest.fixture
def model(request, backend):
    return request.getfixturevalue({"hooked_transformer": "ht"}.get(backend, backend))


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(0))


def reference_loss(logits, ids, mask=None):
    """Mean next-token NLL over predictions between real tokens, by F.cross_entropy."""
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    if mask is None:
        return nll.mean(), nll
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    return nll[keep].mean(), nll * keep


# -- return_type ---------------------------------------------------------------------


def test_return_type_loss_both_none_on_every_backend(model, ids):
    with torch.no_grad():
        logits = model(ids)
        loss = model(ids, return_type="loss")
        both = model(ids, return_type="both")
        per_token = model(ids, return_type="loss", loss_per_token=True)
        nothing = model(ids, return_type=None)
        via_forward = model.forward(ids, return_type="loss")
    expected, expected_per_token = reference_loss(logits, ids)
    assert loss.shape == () and torch.allclose(loss, expected, atol=1e-5)
    assert isinstance(both, Output) and torch.equal(both.logits, logits)
    assert torch.allclose(both.loss, expected, atol=1e-5)
    assert per_token.shape == (2, 6) and torch.allclose(per_token, expected_per_token, atol=1e-5)
    assert nothing is None
    assert torch.allclose(via_forward, expected, atol=1e-5)
    with pytest.raises(ValueError, match="return_type"):
        model(ids, return_type="logit")
    with pytest.raises(ValueError, match="loss_per_token"):
        model(ids, loss_per_token=True)  # no loss to give per token


def test_loss_matches_transformer_lens_own_loss():
    ht_model = hooked_transformer_cls()(ht_config())
    model = interp.load(ht_model)
    ids = torch.randint(0, 259, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding
    mask[1, :2] = 0  # left padding
    with torch.no_grad():
        for per_token in (False, True):
            ours = model(ids, mask, return_type="loss", loss_per_token=per_token)
            logits = ht_model(ids, attention_mask=mask)
            from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss

            theirs = lm_cross_entropy_loss(logits, ids, mask, per_token=per_token)
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        assert torch.allclose(model(ids, return_type="loss"), ht_model(ids, return_type="loss"))


@pytest.mark.parametrize("side", ["left", "right"])
def test_loss_excludes_padding_and_equals_the_unpadded_rows(hf, side):
    texts = ["a long enough sentence here", "short"]
    batch = hf.tokenize(texts, padding_side=side)
    assert bool((batch.attention_mask == 0).any())
    with torch.no_grad():
        loss = hf(batch, return_type="loss")
        per_token = hf(batch, return_type="loss", loss_per_token=True)
        total, count = 0.0, 0
        for text in texts:
            row = hf.tokenize(text)
            _, nll = reference_loss(hf(row), row.input_ids)
            total, count = total + nll.sum(), count + nll.numel()
    torch.testing.assert_close(loss, total / count, atol=1e-5, rtol=1e-5)
    keep = (batch.attention_mask[:, :-1] * batch.attention_mask[:, 1:]).bool()
    assert (per_token[~keep] == 0).all() and (per_token[keep] > 0).all()
    with pytest.raises(ValueError, match="next-token prediction"):
        hf(torch.tensor([[5]]), return_type="loss")


def test_run_with_hooks_honours_return_type_and_the_hooks(model, ids):
    def double(t, hook):
        return t * 2

    with torch.no_grad():
        clean = model(ids, return_type="loss")
        hooked = model.run_with_hooks(
            ids, return_type="loss", fwd_hooks=[("blocks.0.hook_resid_post", double)]
        )
        logits = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post", double)])
    assert hooked.shape == () and not torch.allclose(hooked, clean)
    torch.testing.assert_close(hooked, reference_loss(logits, ids)[0], atol=1e-5, rtol=1e-5)


# -- stop_at_layer -------------------------------------------------------------------


@pytest.mark.parametrize("stop", [0, 1, -1, 3])
def test_stop_at_layer_returns_the_residual_entering_the_layer_and_runs_nothing_after(
    model, ids, stop
):
    n = model.cfg.n_layers
    layer = stop % n if stop < 0 else stop
    full = interp.capture(model, ids, ["blocks.*.hook_resid_pre", "blocks.*.hook_resid_post"])
    expected = (
        full[f"blocks.{layer}.hook_resid_pre"]
        if layer < n
        else full[f"blocks.{n - 1}.hook_resid_post"]
    )
    fired = []
    with torch.no_grad(), model.hooks(fwd=[("*", lambda t, hook: fired.append(hook.name))]):
        resid = model(ids, stop_at_layer=stop, return_type="loss")
    torch.testing.assert_close(resid, expected)
    assert fired, "the layers before the stop ran"
    late = [
        name
        for name in fired
        if name.startswith(("ln_final", "unembed", "hook_unembed"))
        or (name.startswith("blocks.") and int(name.split(".")[1]) >= layer)
    ]
    if layer == 0:  # the stop reads blocks.0.hook_resid_pre (the bridge's alias: hook_in)
        late = [n for n in late if n not in ("blocks.0.hook_resid_pre", "blocks.0.hook_in")]
    assert late == [], f"hooks after the stop fired: {late}"


def test_stop_at_layer_matches_hooked_transformer():
    ht_model = hooked_transformer_cls()(ht_config())
    model = interp.load(ht_model)
    ids = torch.randint(0, 259, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for stop in (0, 2, -1):
            torch.testing.assert_close(
                model(ids, stop_at_layer=stop), ht_model(ids, stop_at_layer=stop)
            )
        _, ours = model.run_with_cache(ids, stop_at_layer=2)
        _, theirs = ht_model.run_with_cache(ids, stop_at_layer=2)
    assert set(ours) == set(theirs.cache_dict)


def n_torch_hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_stop_at_layer_out_of_range_and_wrong_type(hf, ids):
    before = n_torch_hooks(hf.model)
    with pytest.raises(ValueError, match="out of range"):
        hf(ids, stop_at_layer=4)
    with pytest.raises(ValueError, match="out of range"):
        hf(ids, stop_at_layer=-4)
    with pytest.raises(TypeError, match="int"):
        hf(ids, stop_at_layer=1.0)
    hf(ids, stop_at_layer=1)
    assert n_torch_hooks(hf.model) == before  # the stop's hook is gone after it fired


def test_stop_at_layer_in_run_with_cache_keeps_what_fired(model, ids):
    _, cache = model.run_with_cache(ids, names_filter="blocks.*.hook_resid_post", stop_at_layer=2)
    assert sorted(cache) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


# -- run_with_cache --------------------------------------------------------------------


def test_run_with_cache_without_filter_returns_what_fired(model, ids):
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids)
    assert torch.equal(logits, model(ids))
    seen = set()
    with torch.no_grad(), model.hooks(fwd=[("*", lambda t, hook: seen.add(hook.name))]):
        model(ids)
    assert set(cache) == seen and len(cache) > 0
    torch.testing.assert_close(
        cache["blocks.1.hook_resid_post"],
        interp.capture(model, ids, "blocks.1.hook_resid_post")["blocks.1.hook_resid_post"],
    )


def test_run_with_cache_names_filter_forms(model, ids):
    n = model.cfg.n_layers
    want = [f"blocks.{i}.hook_resid_post" for i in range(n)]
    _, by_predicate = model.run_with_cache(ids, names_filter=lambda name: name in want)
    _, by_glob = model.run_with_cache(ids, names_filter="blocks.*.hook_resid_post")
    _, by_list = model.run_with_cache(ids, names_filter=want)
    _, by_name = model.run_with_cache(ids, names_filter=want[1])
    assert list(by_predicate) == list(by_glob) == list(by_list) == want
    assert list(by_name) == [want[1]]
    with pytest.raises(HookNameError):
        model.run_with_cache(ids, names_filter=lambda name: False)
    with pytest.raises(HookNameError):
        model.run_with_cache(ids, names_filter="blocks.0.hook_resid_pots")


def test_run_with_cache_names_that_never_fire_raise_when_asked_for_by_name(bridge, ids):
    seen = set()
    with torch.no_grad(), bridge.hooks(fwd=[("*", lambda t, hook: seen.add(hook.name))]):
        bridge(ids)
    silent = [n for n in bridge.hook_names if n not in seen]
    assert silent, "the bridge lists hook names that never fire"
    with pytest.raises(RuntimeError, match="never reaches it"):
        bridge.run_with_cache(ids, names_filter=silent[0])


def test_run_with_cache_remove_batch_dim_and_device(model, ids):
    one = ids[:1]
    _, batched = model.run_with_cache(one, names_filter="blocks.*.hook_resid_post")
    _, unbatched = model.run_with_cache(
        one, names_filter="blocks.*.hook_resid_post", remove_batch_dim=True, device="cpu"
    )
    for name in batched:
        assert unbatched[name].shape == batched[name].shape[1:]
        torch.testing.assert_close(unbatched[name], batched[name][0])
    assert unbatched.meta["has_batch_dim"] is False
    with pytest.raises(ValueError, match="one row"):
        model.run_with_cache(ids, names_filter="blocks.0.hook_resid_post", remove_batch_dim=True)


def test_run_with_cache_return_type_loss(model, ids):
    loss, cache = model.run_with_cache(
        ids, names_filter="blocks.0.hook_resid_post", return_type="loss"
    )
    assert loss.shape == () and list(cache) == ["blocks.0.hook_resid_post"]


def test_run_with_hooks_takes_predicate_names(model, ids):
    seen = []
    model.run_with_hooks(
        ids,
        fwd_hooks=[
            (lambda name: name.endswith("hook_resid_pre"), lambda t, h: seen.append(h.name))
        ],
    )
    assert seen == [f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.n_layers)]


# -- refused arguments -----------------------------------------------------------------


@pytest.mark.parametrize("entry", ["call", "forward", "run_with_hooks", "run_with_cache"])
def test_unknown_keyword_arguments_raise_with_the_accepted_list(model, ids, entry):
    run = {
        "call": model,
        "forward": model.forward,
        "run_with_hooks": model.run_with_hooks,
        "run_with_cache": model.run_with_cache,
    }[entry]
    with pytest.raises(TypeError, match=r"return_type.*stop_at_layer"):
        run(ids, retrun_type="loss")
    with pytest.raises(TypeError, match="start_at_layer"):
        run(ids, start_at_layer=1)


def test_declined_transformer_lens_arguments_say_what_to_use(model, ids):
    with pytest.raises(TypeError, match="capture_grads"):
        model.run_with_cache(ids, incl_bwd=True)
    with pytest.raises(TypeError, match="positions="):
        model.run_with_cache(ids, pos_slice=-1)
    with pytest.raises(TypeError, match=r"model\.hooks"):
        model.run_with_hooks(ids, fwd_hooks=[], reset_hooks_end=False)
    with pytest.raises(TypeError, match="attention_mask"):
        model(ids, "loss")  # TransformerLens's second positional is return_type; ours is the mask


def test_backend_keyword_arguments_pass_through(hf, ids):
    with torch.no_grad():
        assert hf(ids, logits_to_keep=1).shape[1] == 1
        assert hf.forward(ids, None, logits_to_keep=1).shape[1] == 1
        with pytest.raises(ValueError, match="logits_to_keep"):
            hf(ids, logits_to_keep=1, return_type="loss")
    with pytest.raises(TypeError, match="output_attentions"):
        hf(ids, output_attentions=True)  # its output would be dropped: refused


# -- tokenization ----------------------------------------------------------------------


def bos_tokenizer(adds_bos: bool):
    from tokenizers import processors

    tok = byte_tokenizer()
    tok.bos_token = "<|im_start|>"
    if adds_bos:
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", special_tokens=[("<|im_start|>", tok.bos_token_id)]
        )
    return tok


@pytest.mark.parametrize("adds_bos", [False, True])
def test_to_tokens_is_a_tensor_and_honours_prepend_bos_and_padding_side(raw, adds_bos):
    model = interp.load(raw[0], tokenizer=bos_tokenizer(adds_bos))
    bos = model.tokenizer.bos_token_id
    plain = model.tokenizer("ab", add_special_tokens=False)["input_ids"]
    ids = model.to_tokens("ab")
    assert isinstance(ids, torch.Tensor) and ids.shape == (1, len(plain) + adds_bos)
    assert model.to_tokens("ab", prepend_bos=True).tolist() == [[bos, *plain]]
    assert model.to_tokens("ab", prepend_bos=False).tolist() == [plain]
    left = model.to_tokens(["ab", "abcd"], padding_side="left", prepend_bos=True)
    right = model.to_tokens(["ab", "abcd"], padding_side="right", prepend_bos=True)
    pad = model.tokenizer.pad_token_id
    assert left[0, :2].tolist() == [pad, pad] and left[0, 2] == bos
    assert right[0, -2:].tolist() == [pad, pad] and right[0, 0] == bos
    batch = model.tokenize(["ab", "abcd"], padding_side="left", prepend_bos=True)
    assert isinstance(batch, Batch) and torch.equal(batch.input_ids, left)
    assert batch.attention_mask[0].tolist() == [0, 0, 1, 1, 1]
    with torch.no_grad():  # model(text, prepend_bos=...) tokenizes the same way
        torch.testing.assert_close(
            model(["ab", "abcd"], padding_side="left", prepend_bos=True), model(batch)
        )


def test_prepend_bos_refused_where_it_cannot_be_honoured(hf, ids):
    with pytest.raises(ValueError, match="no BOS token"):
        hf.to_tokens("ab", prepend_bos=True)  # the byte tokenizer has none
    with pytest.raises(ValueError, match="already tokens"):
        hf(ids, prepend_bos=False)
    with pytest.raises(ValueError, match="padding_side"):
        hf.to_tokens(["a", "bb"], padding_side="middle")


# -- generate, cfg, load ---------------------------------------------------------------


# TransformerBridge's generate passes transformers 5 an argument it has renamed.
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_tl_generate_accepts_a_batch_and_text_like_the_hf_backend(hf, bridge):
    batch = hf.tokenize(["hello there", "hi"], padding_side="left")
    expected = hf.generate(batch, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(bridge.generate(batch, max_new_tokens=4), expected)
    one = hf.generate("hello", max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(bridge.generate("hello", max_new_tokens=3), one)
    with pytest.raises(ValueError, match="left-padded"):
        bridge.generate(hf.tokenize(["hello there", "hi"]), max_new_tokens=2)


def test_hooked_transformer_generate_accepts_a_batch(ht):
    batch = Batch(torch.tensor([[3, 4, 5]]), torch.ones(1, 3, dtype=torch.long))
    out = ht.generate(batch, max_new_tokens=3)
    assert out.shape == (1, 6) and torch.equal(out[:, :3], batch.input_ids)
    with torch.no_grad():
        assert out[0, 3] == ht(batch)[0, -1].argmax()  # greedy by default


def test_cfg_family_is_the_architecture_family(hf, bridge):
    assert hf.cfg.family == bridge.cfg.family == "llama"
    gpt2 = interp.tiny("gpt2")
    assert interp.load(bridge_of(gpt2.model, gpt2.tokenizer)).cfg.family == "gpt2"


def test_hooked_transformer_cfg_family():
    cls = hooked_transformer_cls()
    assert interp.load(cls(ht_config())).cfg.family == "unknown"  # a bare config says nothing
    named = cls(ht_config(original_architecture="LlamaForCausalLM"))
    assert interp.load(named).cfg.family == "llama"


def test_saelens_models_are_recognised_by_class(raw, ids):
    sae_lens = pytest.importorskip("sae_lens")
    from interp.adapters.tl import TLHookedModel

    bridged = interp.load(bridge_of(*raw, cls=sae_lens.SAETransformerBridge))
    assert isinstance(bridged, TLHookedModel) and bridged.cfg.family == "llama"
    hf = interp.load(raw[0], tokenizer=raw[1])
    name = "blocks.1.hook_resid_post"
    torch.testing.assert_close(
        interp.capture(bridged, ids, name)[name],
        interp.capture(hf, ids, name)[name],
        atol=1e-4,
        rtol=1e-4,
    )
    hooked = interp.load(sae_lens.HookedSAETransformer(ht_config()))
    assert isinstance(hooked, TLHookedModel)
    assert interp.capture(hooked, ids, name)[name].shape == (2, 7, 32)


def test_load_refuses_what_it_cannot_wrap(raw):
    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class Probe(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.hook_x = HookPoint()
            self.setup()

    with pytest.raises(TypeError, match="HookedTransformer and TransformerBridge"):
        interp.load(Probe())
    with pytest.raises(TypeError, match="causal LM"):
        interp.load(raw[0].model)  # the bare LlamaModel: no LM head
    with pytest.raises(TypeError, match="causal LM"):
        interp.load(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="name, path or model object"):
        interp.load(3)


# -- cache indexing ----------------------------------------------------------------------


def test_cache_indexing_by_transformer_lens_shorthand(hf, ids):
    _, cache = hf.run_with_cache(ids)
    assert cache["resid_post", 1] is cache["blocks.1.hook_resid_post"]
    assert cache["resid_post", -1] is cache["blocks.2.hook_resid_post"]
    assert cache["embed"] is cache["hook_embed"]
    assert cache["k1"] is cache["blocks.1.attn.hook_k"] if "blocks.1.attn.hook_k" in cache else 1
    assert "resid_post" not in cache and "blocks.1.hook_resid_post" in cache
    with pytest.raises(KeyError, match=r"blocks\.7\.hook_resid_post"):
        cache["resid_post", 7]
    plain = ActivationCache({"blocks.2.hook_resid_post": torch.zeros(1)})
    assert plain["resid_post", 2] is plain["blocks.2.hook_resid_post"]
    with pytest.raises(KeyError, match="depth"):
        plain["resid_post", -1]


@pytest.mark.parametrize(
    "args",
    [
        ("resid_post", 3),
        ("pattern", 0),
        ("attn", 2),
        ("embed",),
        ("scale",),
        ("normalized", 27, "ln2"),
        ("k6",),
        ("scale4ln1",),
        ("pre5",),
        ("q", 1, "a"),
        ("mlp_out", 0),
        ("blocks.1.hook_resid_pre",),
    ],
)
def test_get_act_name_matches_transformer_lens(args):
    from transformer_lens.utilities.components_utils import get_act_name as theirs

    assert get_act_name(*args) == theirs(*args)
    assert get_act_name("pattern", 0) == "blocks.0.attn.hook_pattern"
