"""Attach, save and load LoRA adapters (``peft``) on any HF causal LM.

Targets are resolved to *full module names* before ``peft`` sees them, so
restricting LoRA to some layers is exact (no reliance on peft's layer-pattern
guessing) and the saved adapter config lists precisely what was adapted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interp.train.config import TrainConfig

__all__ = [
    "apply_lora",
    "default_target_modules",
    "load_adapter",
    "lora_target_names",
    "refuse_meta_adapters",
    "resolve_model",
    "save_adapter",
]

_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_FAMILY_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}
# The container of decoder blocks in every family we support
# (model.layers.N, transformer.h.N, gpt_neox.layers.N, …).
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)(?:\.|$)")


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is the train extra
        return False
    return isinstance(model, PeftModel)


def resolve_model(model: Any) -> nn.Module:
    """The ``nn.Module`` to train: ``model`` itself, or ``model.model`` for wrappers.

    HF causal LMs also have a ``.model`` attribute (the decoder), so a module
    with a ``config`` is taken as-is and only non-modules are unwrapped.
    """
    if isinstance(model, nn.Module) and (_is_peft(model) or hasattr(model, "config")):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(
        f"expected a transformers causal LM, a PeftModel, or an object with one in `.model`; "
        f"got {type(model).__name__}"
    )


@contextmanager
def _quiet_peft() -> Iterator[None]:
    # peft 0.21 reads `is_gradient_checkpointing`, which transformers 5 deprecates
    # with a FutureWarning on every wrap; it is not actionable for our callers.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning
        )
        yield


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def default_target_modules(model: nn.Module) -> tuple[str, ...]:
    """Attention and MLP projection names for ``model``'s family."""
    config = getattr(resolve_model(model), "config", None)
    family = getattr(config, "model_type", "")
    return _FAMILY_TARGETS.get(family, _LLAMA_STYLE)


def _n_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "num_hidden_layers", None)
    return int(n) if n is not None else None


def lora_target_names(
    model: Any,
    target_modules: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
) -> list[str]:
    """Full names of the Linear/Conv1D modules LoRA will adapt.

    ``target_modules`` are leaf names (``"q_proj"``); ``None`` = the family
    default, silently dropping names the model lacks (MoE experts stored as
    fused parameters, for instance). Explicit names that match nothing raise.
    ``layers`` keeps only modules inside those decoder layers (negative
    indices count from the end).
    """
    base = resolve_model(model)
    explicit = target_modules is not None
    targets = tuple(target_modules) if explicit else default_target_modules(base)
    conv1d = _conv1d_type()
    linear_types = (nn.Linear,) + ((conv1d,) if conv1d is not None else ())
    keep: set[int] | None = None
    if layers is not None:
        n = _n_layers(base)
        if n is None:
            raise ValueError("cannot restrict LoRA to layers: the model config has no layer count")
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise ValueError(f"layers {bad} out of range for a model with {n} layers")
        keep = {i % n for i in layers}
    names, seen_leaves, linear_leaves = [], set(), set()
    for name, module in base.named_modules():
        if not isinstance(module, linear_types) or "lora_" in name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        linear_leaves.add(leaf)
        if leaf not in targets:
            continue
        seen_leaves.add(leaf)
        if keep is not None:
            m = _LAYER_INDEX.search(name)
            if m is None or int(m.group(1)) not in keep:
                continue
        names.append(name)
    missing = [t for t in targets if t not in seen_leaves]
    if explicit and missing:
        raise ValueError(
            f"target_modules {missing} match no Linear/Conv1D module; available: "
            f"{', '.join(sorted(linear_leaves))}"
        )
    if not names:
        raise ValueError(
            f"no module matches target_modules={list(targets)} within layers={layers}; "
            f"available Linear/Conv1D names: {', '.join(sorted(linear_leaves))}"
        )
    return names


def refuse_meta_adapters(peft_model: nn.Module) -> None:
    """Raise when a trainable parameter of a ``PeftModel`` is on the ``meta`` device: its
    module was offloaded by ``accelerate`` and peft put the adapter there too, where it
    computes with uninitialized memory and cannot train."""
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad and p.is_meta]
    if names:
        raise ValueError(
            f"{len(names)} trainable parameters of this PeftModel are on the meta device "
            f"({', '.join(names[:3])}{', …' if len(names) > 3 else ''}): their modules "
            "were offloaded by accelerate, and peft put their adapters on meta, where they "
            "compute garbage and cannot train. Attach LoRA with apply_lora (or let train "
            "attach it), which puts the adapters of offloaded modules in memory"
        )


def _offloaded(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters(recurse=False))


def _execution_device(modules: dict[str, nn.Module], name: str) -> torch.device | None:
    """The device ``accelerate`` runs module ``name`` on (``modules``: the model's
    ``named_modules``): the ``execution_device`` of the ``AlignDevicesHook`` on it or,
    failing that, on its nearest parent (``None`` if none)."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        hook = getattr(modules.get(".".join(parts[:i])), "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            device = getattr(h, "execution_device", None)
            if device is not None:
                return torch.device(device)  # an int: that index of the accelerator
    return None


@contextmanager
def _offloaded_weights_on_execution_device(base: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """While ``peft`` attaches adapters, give each offloaded target (weight on ``meta``) a
    one-element stand-in weight, broadcast to the weight's shape and dtype, on the module's
    execution device, so that ``peft`` places the adapter there, with the values its seeded
    init drew (on the CPU, as for any module) instead of moving them to ``meta``. The
    offloaded weight (still on ``meta``) is put back afterwards with the ``requires_grad``
    ``peft`` gave the stand-in. Raises before anything is attached when a target's
    execution device cannot be determined (offloaded, but no ``accelerate`` hook)."""
    modules = dict(base.named_modules())
    offloaded = [n for n in names if _offloaded(modules[n])]
    devices = {n: _execution_device(modules, n) for n in offloaded}
    unknown = [n for n, d in devices.items() if d is None or d.type == "meta"]
    if unknown:
        raise ValueError(
            f"LoRA would adapt {len(unknown)} modules whose weights are on the meta device "
            f"without an accelerate hook naming their execution device "
            f"({', '.join(unknown[:3])}{', …' if len(unknown) > 3 else ''}): their adapters "
            "could not be put in memory. Load the model with a device_map (accelerate "
            "dispatch), or with these modules in memory"
        )
    swapped: list[tuple[nn.Module, nn.Parameter, nn.Parameter]] = []
    try:
        for n in offloaded:
            module, weight = modules[n], modules[n]._parameters.get("weight")
            if weight is None or not weight.is_meta:
                raise ValueError(
                    f"cannot attach LoRA to offloaded module {n}: its parameters on the meta "
                    "device are not its `weight`, which peft reads the adapter's device from"
                )
            stand_in = nn.Parameter(
                torch.empty(1, dtype=weight.dtype, device=devices[n]).expand(weight.shape),
                requires_grad=weight.requires_grad,
            )
            module._parameters["weight"] = stand_in
            swapped.append((module, weight, stand_in))
        yield
    finally:
        for module, weight, stand_in in swapped:
            module._parameters["weight"] = weight
            weight.requires_grad_(stand_in.requires_grad)


def apply_lora(model: Any, config: TrainConfig | None = None) -> nn.Module:
    """Wrap ``model`` (or ``model.model``) in a ``peft`` LoRA ``PeftModel``.

    LoRA weights are injected into the base modules in place, so a wrapper
    holding the base model (e.g. ``interp.tiny``'s ``HookedModel``) runs the
    adapted model too. Initialization is seeded by ``config.seed`` without
    touching the caller's global RNG.

    A target module that ``accelerate`` offloaded (disk, or CPU beside an accelerator:
    its weights on ``meta`` between forwards) gets its adapter in memory on the module's
    execution device (its ``AlignDevicesHook``'s), with the values the model loaded whole
    would get under the same seed; its base weights stay offloaded. Such a module without
    an ``accelerate`` hook raises ``ValueError`` before anything is attached.
    """
    from peft import LoraConfig, get_peft_model

    config = config or TrainConfig()
    base = resolve_model(model)
    if _is_peft(base):
        raise ValueError("model already has a PEFT adapter; train it directly or unload it first")
    names = lora_target_names(base, config.target_modules, config.layers)
    conv1d = _conv1d_type()
    modules = dict(base.named_modules())
    fan_in_fan_out = conv1d is not None and any(isinstance(modules[n], conv1d) for n in names)
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=names,
        fan_in_fan_out=fan_in_fan_out,  # GPT-2's Conv1D stores weights transposed
        bias="none",
        task_type="CAUSAL_LM",
    )
    was_training = base.training
    with (
        _offloaded_weights_on_execution_device(base, names),
        torch.random.fork_rng(devices=[]),
        _quiet_peft(),
    ):
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(base, lora)
    refuse_meta_adapters(peft_model)  # every adapter got memory above; never train garbage
    # A fresh wrapper module defaults to train mode; keep the base model's mode.
    return peft_model.train(was_training)


def save_adapter(model: Any, directory: str | os.PathLike[str]) -> Path:
    """Save the LoRA adapter of a ``PeftModel`` atomically (write a temp dir, then rename)."""
    peft_model = resolve_model(model)
    if not _is_peft(peft_model):
        raise ValueError("save_adapter needs a PeftModel (the result of apply_lora/train)")
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        peft_model.save_pretrained(str(tmp))
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_adapter(
    model: Any, directory: str | os.PathLike[str], *, is_trainable: bool = False
) -> nn.Module:
    """Load a saved adapter onto ``model`` (or ``model.model``); returns the ``PeftModel``.

    As with ``apply_lora``, the adapters of modules ``accelerate`` offloaded are put in
    memory on each module's execution device (peft alone would leave them on ``meta``)."""
    from peft import PeftModel

    base = resolve_model(model)
    if _is_peft(base):
        raise ValueError("model already has a PEFT adapter; load onto the base model")
    config_file = Path(directory) / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no adapter_config.json in {directory}")
    targets = json.loads(config_file.read_text()).get("target_modules") or []
    modules = dict(base.named_modules())
    if isinstance(targets, str):  # a regex: check every Linear it matches, as peft will
        pattern = re.compile(targets)
        names = [n for n in modules if pattern.fullmatch(n)]
    else:  # peft's rule for a list: the full name, or its last dotted components
        names = [n for n in modules if any(n == t or n.endswith("." + t) for t in targets)]
    if not any(_offloaded(modules[n]) for n in names):
        with _quiet_peft():
            return PeftModel.from_pretrained(base, str(directory), is_trainable=is_trainable)
    # peft's own loader re-dispatches an offloaded model (an inferred device map, which
    # fails on weights already on meta) and would put these adapters on meta; attach the
    # adapter structure as apply_lora does, then load the saved weights into it.
    from peft import PeftConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict

    config = PeftConfig.from_pretrained(str(directory))
    config.inference_mode = not is_trainable
    with (
        _offloaded_weights_on_execution_device(base, names),
        torch.random.fork_rng(devices=[]),
        _quiet_peft(),
    ):
        peft_model = get_peft_model(base, config)
    refuse_meta_adapters(peft_model)
    saved = load_peft_weights(str(directory), device="cpu")
    loaded = set_peft_model_state_dict(peft_model, saved)
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if loaded.unexpected_keys or missing:
        raise ValueError(
            f"the adapter in {directory} does not fit this model: "
            f"unexpected {loaded.unexpected_keys[:3]}, missing {missing[:3]}"
        )
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(is_trainable)
    return peft_model.train(False) if not is_trainable else peft_model
