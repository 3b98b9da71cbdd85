"""LoRA training of a model dispatched by accelerate (``device_map`` with disk offload).

peft puts the adapter of an offloaded module on ``meta`` (where its base weights sit between
forwards), and a forward through it computes with uninitialized memory: ``train`` refuses
such a run up front. LoRA on the layers kept in memory trains, through the offloaded ones,
to the weights of the model loaded whole.
"""

from __future__ import annotations

import pytest
import torch

import interp
from interp.families import tiny_hf
from interp.train import SFTLoss, TrainConfig, apply_lora, load_adapter, save_adapter, train
from interp.train.trainer import train_trainer

pytest.importorskip("accelerate")
pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = [{"prompt": f"Q{i}?", "response": f"answer number {i} is here"} for i in range(4)]
CONFIG = dict(r=4, lr=1e-2, batch_size=2, epochs=2, dropout=0.0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, tok = tiny_hf("llama")
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    assert model.config.num_hidden_layers == 3
    return path


def _dispatched(path, tmp_path, embed: str = "disk"):
    """Layers 0 and 2 in memory (cpu), layer 1, the head (and the embedding) on disk."""
    dm = {"model.embed_tokens": embed, "model.norm": "cpu", "lm_head": "disk"}
    dm |= {f"model.layers.{i}": "cpu" if i % 2 == 0 else "disk" for i in range(3)}
    dm["model.rotary_emb"] = "cpu"
    model = interp.load(str(path), device_map=dm, offload_folder=str(tmp_path / "offload"))
    assert model.model.model.layers[1].mlp.up_proj.weight.is_meta  # really offloaded
    return model


def _lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_lora_on_offloaded_layers_is_refused_up_front(saved, tmp_path):
    model = _dispatched(saved, tmp_path)
    hint = r"in layers \[1\] \(model\.layers\.1\.self_attn\.q_proj.*TrainConfig\(layers=\(0, 2\)\)"
    for layers in (None, (1,), (0, -2)):
        cfg = TrainConfig(**CONFIG, layers=layers)
        with pytest.raises(ValueError, match=hint):
            train(model, EXAMPLES, SFTLoss(), cfg, progress=False)
    with pytest.raises(ValueError, match=hint):
        train_trainer(model, EXAMPLES, SFTLoss(), output_dir=tmp_path / "out", progress=False)
    # Refused before LoRA was attached: the model is untouched, nothing was written.
    assert not any("lora_" in n for n, _ in model.model.named_modules())
    assert not (tmp_path / "out").exists()
    # apply_lora itself refuses (it is what train calls), before attaching anything.
    with pytest.raises(ValueError, match=r"^LoRA would adapt .*in layers \[1\]"):
        apply_lora(model, TrainConfig(**CONFIG, layers=(1,)))
    assert not any("lora_" in n for n, _ in model.model.named_modules())
    # A PeftModel attached by peft directly, whose adapters it put on meta: train refuses it.
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model.model, LoraConfig(r=4, target_modules=["model.layers.1.self_attn.q_proj"])
    )
    assert all(p.is_meta for n, p in peft_model.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match=r"on the meta device \(.*layers\.1\..*lora_A"):
        train(peft_model, EXAMPLES, SFTLoss(), tokenizer=model.tokenizer, progress=False)


@pytest.mark.parametrize("embed", ["cpu", "disk"])
def test_lora_on_layers_in_memory_trains_as_the_whole_model(saved, tmp_path, embed):
    cfg = TrainConfig(**CONFIG, layers=(0, 2))
    whole = train(interp.load(str(saved)), EXAMPLES, SFTLoss(), cfg, progress=False)
    model = _dispatched(saved, tmp_path, embed)
    init = _lora(apply_lora(interp.load(str(saved)), cfg))
    result = train(model, EXAMPLES, SFTLoss(), cfg, progress=False)
    assert result.steps == whole.steps == 4
    torch.testing.assert_close(result.losses, whole.losses, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.grad_norms, whole.grad_norms, atol=1e-5, rtol=1e-5)
    got, want = _lora(result.model), _lora(whole.model)
    assert got.keys() == want.keys() == init.keys()
    assert {n.split(".layers.")[1][0] for n in got} == {"0", "2"}
    for name, p in got.items():
        assert p.device.type == "cpu"
        torch.testing.assert_close(p, want[name], atol=1e-5, rtol=0)
        # Every adapter trained: the gradient reached layer 0 back through the disk-offloaded
        # head and layer 1 (the B matrices start at zero).
        assert not torch.equal(p, init[name]), name
    assert result.model.base_model.model.model.layers[1].mlp.up_proj.weight.is_meta  # not moved


def test_load_adapter_refuses_offloaded_targets(saved, tmp_path):
    trained = train(interp.load(str(saved)), EXAMPLES, SFTLoss(), TrainConfig(**CONFIG))
    save_adapter(trained.model, tmp_path / "all")
    model = _dispatched(saved, tmp_path)
    with pytest.raises(ValueError, match=r"^the adapter in .*all would adapt .*in layers \[1\]"):
        load_adapter(model, tmp_path / "all")
    assert not any("lora_" in n for n, _ in model.model.named_modules())
