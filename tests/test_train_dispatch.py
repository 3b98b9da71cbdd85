"""LoRA training of a model dispatched by accelerate (``device_map`` with disk offload).

peft puts the adapter of an offloaded module on ``meta`` (where its base weights sit between
forwards), where a forward through it computes with uninitialized memory: ``apply_lora`` puts
those adapters in memory on the module's execution device, with the initial values of the
model loaded whole, and LoRA on every layer (offloaded or not) trains to the weights of the
model loaded whole; ``load_adapter`` likewise. ``train`` refuses a ``PeftModel`` whose adapters
peft left on ``meta``.
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


def _trains_as_the_whole_model(saved, tmp_path, embed, cfg):
    """``train`` on the dispatched model against the model loaded whole: equal losses,
    gradient norms and LoRA weights, every adapter on the CPU and moved from its initial
    value (the B matrices start at zero, so the gradient reached it back through the
    disk-offloaded head and layers). Returns (dispatched result, whole result, init)."""
    init = _lora(apply_lora(interp.load(str(saved)), cfg))
    whole = train(interp.load(str(saved)), EXAMPLES, SFTLoss(), cfg, progress=False)
    model = _dispatched(saved, tmp_path / "b", embed)
    result = train(model, EXAMPLES, SFTLoss(), cfg, progress=False)
    assert result.steps == whole.steps == 4
    torch.testing.assert_close(result.losses, whole.losses, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.grad_norms, whole.grad_norms, atol=1e-5, rtol=1e-5)
    got, want = _lora(result.model), _lora(whole.model)
    assert got.keys() == want.keys() == init.keys()
    for name, p in got.items():
        assert p.device.type == "cpu", name
        torch.testing.assert_close(p, want[name], atol=1e-5, rtol=0)
        assert not torch.equal(p, init[name]), name
    return result, whole, init


@pytest.mark.parametrize("embed", ["cpu", "disk"])
def test_lora_on_offloaded_layers_trains_as_the_whole_model(saved, tmp_path, embed):
    cfg = TrainConfig(**CONFIG)  # LoRA on every layer, the offloaded layer 1 included
    result, whole, init = _trains_as_the_whole_model(saved, tmp_path, embed, cfg)
    # apply_lora puts the adapters of offloaded modules in memory, with the seeded initial
    # values of the model loaded whole (peft alone leaves them on meta: see below).
    attached = _lora(apply_lora(_dispatched(saved, tmp_path / "a", embed), cfg))
    assert attached.keys() == init.keys()
    assert {n.split(".layers.")[1][0] for n in attached} == {"0", "1", "2"}
    for name, p in attached.items():
        assert p.device.type == "cpu", name  # the execution device of layer 1's hooks
        torch.testing.assert_close(p, init[name], atol=0, rtol=0)
    # The base weights stay offloaded: on meta between forwards, frozen.
    peft_model = result.model.base_model.model
    for module in (peft_model.model.layers[1].mlp.up_proj, peft_model.model.layers[1].self_attn):
        weights = [p for n, p in module.named_parameters() if "lora_" not in n]
        assert weights and all(p.is_meta and not p.requires_grad for p in weights)
    assert peft_model.lm_head.weight.is_meta
    if embed == "disk":  # train_trainer attaches LoRA through apply_lora too
        model = _dispatched(saved, tmp_path / "c", embed)
        out = train_trainer(
            model, EXAMPLES, SFTLoss(), cfg, output_dir=tmp_path / "out", progress=False
        )
        assert out.losses == pytest.approx(whole.losses, rel=1e-5)
        for name, p in _lora(out.model).items():
            torch.testing.assert_close(p, _lora(whole.model)[name], atol=1e-5, rtol=0)


def test_offloaded_lora_without_execution_device_and_meta_peft_adapters_are_refused(
    saved, tmp_path
):
    # A weight on meta without an accelerate hook naming its execution device: refused
    # before anything is attached.
    model = interp.load(str(saved))
    q = model.model.model.layers[1].self_attn.q_proj
    q.weight = torch.nn.Parameter(q.weight.to("meta"))
    with pytest.raises(ValueError, match=r"without an accelerate hook .*layers\.1\.self_attn"):
        apply_lora(model, TrainConfig(**CONFIG))
    assert not any("lora_" in n for n, _ in model.model.named_modules())
    assert q.weight.is_meta
    # A PeftModel attached by peft directly, whose adapters it put on meta: train refuses it.
    from peft import LoraConfig, get_peft_model

    model = _dispatched(saved, tmp_path)
    peft_model = get_peft_model(
        model.model, LoraConfig(r=4, target_modules=["model.layers.1.self_attn.q_proj"])
    )
    assert all(p.is_meta for n, p in peft_model.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match=r"on the meta device \(.*layers\.1\..*lora_A"):
        train(peft_model, EXAMPLES, SFTLoss(), tokenizer=model.tokenizer, progress=False)


@pytest.mark.parametrize("embed", ["cpu", "disk"])
def test_lora_on_layers_in_memory_trains_as_the_whole_model(saved, tmp_path, embed):
    cfg = TrainConfig(**CONFIG, layers=(0, 2))
    result, _, _ = _trains_as_the_whole_model(saved, tmp_path, embed, cfg)
    assert {n.split(".layers.")[1][0] for n in _lora(result.model)} == {"0", "2"}
    assert result.model.base_model.model.model.layers[1].mlp.up_proj.weight.is_meta  # not moved


@pytest.mark.parametrize("is_trainable", [False, True])
def test_load_adapter_onto_offloaded_modules_equals_the_whole_model(saved, tmp_path, is_trainable):
    """A trained adapter loaded onto the dispatched model: every adapter weight in memory
    with the saved values, the base weights still offloaded, and the logits of the model
    loaded whole with the same adapter."""
    trained = train(interp.load(str(saved)), EXAMPLES, SFTLoss(), TrainConfig(**CONFIG))
    save_adapter(trained.model, tmp_path / "all")
    want = _lora(trained.model)
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    whole = load_adapter(interp.load(str(saved)), tmp_path / "all")
    peft_model = load_adapter(
        _dispatched(saved, tmp_path), tmp_path / "all", is_trainable=is_trainable
    )
    got = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert got.keys() == want.keys()
    assert {n.split(".layers.")[1][0] for n in got} == {"0", "1", "2"}
    for name, p in got.items():
        assert p.device.type == "cpu" and p.requires_grad == is_trainable, name
        torch.testing.assert_close(p.detach(), want[name], atol=0, rtol=0)
    base = peft_model.base_model.model
    assert base.model.layers[1].mlp.up_proj.weight.is_meta and base.lm_head.weight.is_meta
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(input_ids=ids).logits, whole(input_ids=ids).logits, atol=1e-5, rtol=0
        )
