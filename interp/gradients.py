"""``capture_grads``: gradients of a loss with respect to activations at named hooks.

The same names and positions as ``capture``. Gradients come from
``torch.autograd.grad`` taken with respect to the embedding output, with
backward hooks recording the gradient at each requested activation on the
way; so no parameter ``.grad`` is ever written, whether or not the weights
require grad. When ``loss_fn`` returns one loss per example, their sum is
differentiated: rows of a batch do not interact, so each row's gradient is
the gradient of its own loss.

``gradient_checkpointing=True`` recomputes each block's internals during the backward
pass instead of keeping them (``interp.checkpointing``), for the call only: the
gradients are the same, activation memory is one block's. Forward hooks inside a block
run again during the recomputation (interventions must re-apply to reproduce the
forward pass); the activations returned are those of the forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interp.cache import ActivationCache
from interp.checkpointing import checkpointing, is_recomputing
from interp.hooks import HookPoint
from interp.positions import Batch, as_batch, running, selector

__all__ = ["GradientCapture", "capture_grads", "capture_grads_dataset"]


@dataclass(frozen=True)
class GradientCapture:
    """Result of ``capture_grads``.

    Attributes:
        loss: the loss ``loss_fn`` returned (``[batch]`` per example, or a scalar).
        grads: hook name -> gradient of the (summed) loss w.r.t. the activation there,
            shaped like ``capture``'s output for the same ``positions``.
        activations: the activations at the same names and positions, when asked.
        logits: the forward pass's logits (detached).
    """

    loss: Float[Tensor, "..."]
    grads: ActivationCache
    activations: ActivationCache | None
    logits: Tensor


def capture_grads(
    model: Any,
    batch: Any,
    loss_fn: Callable[[Tensor, Batch], Tensor],
    names: str | Iterable[str],
    positions: Any = None,
    *,
    return_activations: bool = False,
    dtype: torch.dtype | None = None,
    gradient_checkpointing: bool = False,
    **forward_kwargs: Any,
) -> GradientCapture:
    """Gradients of ``loss_fn(logits, batch)`` w.r.t. the activations at ``names``.

    ``loss_fn`` returns a scalar, or ``[batch]`` per-example losses (summed for the
    backward pass, returned as they are). ``positions`` as in ``capture``. ``dtype``
    converts the stored gradients and activations (default: the model's activation
    dtype; nothing is upcast). ``gradient_checkpointing=True`` checkpoints every block
    for this call (see the module docstring); the model is left as it was.
    """
    refused = sorted(set(forward_kwargs) & {"return_type", "stop_at_layer", "loss_per_token"})
    if refused:
        raise TypeError(
            f"capture_grads does not take {refused}: loss_fn receives the logits of the full "
            "forward pass and computes the loss itself"
        )
    batch = as_batch(model, batch)
    resolved = model.resolve(names)
    if "hook_embed" not in model.hook_names:
        raise ValueError("capture_grads needs a 'hook_embed' hook point on the model")
    sel = selector(positions, batch, device=model.device)
    grads: dict[str, Tensor] = {}
    acts: dict[str, Tensor] = {}
    root: list[Tensor] = []

    def keep_root(tensor: Tensor, hook: HookPoint) -> None:
        root.append(tensor)

    def keep_grad(grad: Tensor, hook: HookPoint) -> None:
        g = sel.select(grad.detach(), hook.name)
        grads[hook.name] = g.to(dtype) if dtype is not None else g

    def keep_act(tensor: Tensor, hook: HookPoint) -> None:
        if is_recomputing():  # the same values again, from the backward pass
            return
        a = sel.select(tensor.detach(), hook.name)
        acts[hook.name] = a.to(dtype) if dtype is not None else a

    fwd = [("hook_embed", keep_root)]
    if return_activations:
        fwd += [(n, keep_act) for n in resolved]
    bwd = [(n, keep_grad) for n in resolved]
    with (
        torch.enable_grad(),
        running(batch),
        model.hooks(fwd=fwd, bwd=bwd),
        checkpointing(model, gradient_checkpointing),
    ):
        logits = model.forward(batch.input_ids, batch.attention_mask, **forward_kwargs)
        loss = loss_fn(logits, batch)
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            raise ValueError(
                "loss_fn must return a Tensor computed from the logits (scalar or [batch])"
            )
        total = loss.sum() if loss.ndim else loss
        torch.autograd.grad(total, root[0])
    missing = [n for n in resolved if n not in grads]
    if missing:
        raise RuntimeError(f"no gradient reached {missing[:4]}: the loss does not depend on them")
    return GradientCapture(
        loss=loss.detach(),
        grads=ActivationCache({n: grads[n] for n in resolved}),
        activations=ActivationCache({n: acts[n] for n in resolved}) if return_activations else None,
        logits=logits.detach(),
    )


def capture_grads_dataset(
    model: Any,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    loss_fn: Callable[[Tensor, Batch], Tensor],
    names: Sequence[str],
    positions: Any,
    *,
    batch_size: int = 8,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    desc: str = "gradients",
) -> tuple[Float[Tensor, " n"], dict[str, Float[Tensor, "n *pos d_model"]]]:
    """:func:`capture_grads` over many teacher-forced conversations, ``batch_size`` at a
    time (right-padded by ``interp.chat.encode`` with ``chat_template_kwargs``, e.g.
    ``{"enable_thinking": False}``): the per-example losses ``[n]`` and, per hook name,
    the gradients at ``positions`` (as in ``capture``; e.g. a list of named positions
    gives ``[n, len(positions), d_model]``), concatenated on the CPU in ``dtype``.
    ``loss_fn(logits, batch)`` must return one loss per example."""
    from tqdm.auto import tqdm

    from interp.chat import encode

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    kw = dict(chat_template_kwargs or {})
    losses: list[Tensor] = []
    grads: dict[str, list[Tensor]] = {n: [] for n in names}
    for i in tqdm(range(0, len(conversations), batch_size), desc=desc, leave=False):
        convs = [list(c) for c in conversations[i : i + batch_size]]
        batch = encode(model.tokenizer, convs, padding_side="right", device=model.device, **kw)
        out = capture_grads(model, batch, loss_fn, list(names), positions)
        if out.loss.shape != (len(convs),):
            raise ValueError(
                f"loss_fn must return one loss per example, got {tuple(out.loss.shape)}"
            )
        losses.append(out.loss.detach().to("cpu", dtype))
        for n in names:
            grads[n].append(out.grads[n].to("cpu", dtype))
    return torch.cat(losses), {n: torch.cat(g) for n, g in grads.items()}
