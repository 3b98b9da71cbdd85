"""TransformerLens's calling conventions, honoured the same way on every backend.

``model(...)``, ``model.forward``, ``run_with_hooks`` and ``run_with_cache`` take
TransformerLens's keyword arguments and mean by them what TransformerLens means:

* ``return_type``: ``"logits"`` (default), ``"loss"``, ``"both"`` (an ``Output(logits,
  loss)`` named tuple) or ``None`` (nothing is returned).
* ``loss_per_token``: the loss as ``[batch, pos - 1]`` instead of its mean.
* ``stop_at_layer=L``: the forward pass stops before block ``L`` (negative ``L`` counts
  from the end) and returns the residual stream entering it, ``[batch, pos, d_model]``;
  blocks ``L`` and later never run, and none of their hooks fire. ``L = n_layers``
  returns the last block's output (before the final norm).
* ``prepend_bos`` / ``padding_side``: how text input is tokenized (``None``: the
  tokenizer's own choice, where TransformerLens's default prepends a BOS token).
* ``names_filter`` (``run_with_cache``): a name, a glob, a list of them, or a predicate
  ``lambda name: ...``; ``remove_batch_dim`` drops the batch axis of every cached
  activation (one-row batches only, as in TransformerLens).

Anything else a backend's own forward does not take raises ``TypeError`` listing what
is accepted: an argument is honoured or refused, never ignored.

The loss is TransformerLens's ``lm_cross_entropy_loss``: the mean next-token
cross-entropy. Padding is excluded exactly as TransformerLens excludes it when given an
attention mask: a prediction counts only when both the token it is made at and the token
it predicts are real (``mask[:, :-1] & mask[:, 1:]``), so left and right padding give the
same loss as the unpadded rows; per-token losses are 0 at excluded predictions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = [
    "FORWARD_ARGS",
    "RETURN_TYPES",
    "TEXT_ARGS",
    "Output",
    "lm_cross_entropy_loss",
    "tokenize",
]

RETURN_TYPES = ("logits", "loss", "both", None)
FORWARD_ARGS = ("return_type", "loss_per_token", "stop_at_layer")
TEXT_ARGS = ("prepend_bos", "padding_side")
CALL_ARGS = ("attention_mask", *TEXT_ARGS, *FORWARD_ARGS)
# Forward arguments of transformers models that interp does not pass through: the ids and
# mask it sets itself, and outputs its logits-only return would silently drop.
HF_DROPPED_KWARGS = (
    "input_ids",
    "attention_mask",
    "inputs_embeds",
    "labels",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "output_router_logits",
)
# TransformerLens arguments that interp knows and declines, with what to do instead.
_DECLINED = {
    "start_at_layer": "interp runs whole forward passes from token ids; patch "
    "blocks.{L}.hook_resid_pre with a hook instead",
    "tokens": "it only serves start_at_layer, which interp does not support",
    "incl_bwd": "use interp.capture_grads(model, batch, loss_fn, names) for gradients "
    "(no parameter .grad is written)",
    "pos_slice": "use interp.capture(model, batch, names, positions=...), which selects "
    "positions before copying",
    "return_cache_object": "run_with_cache always returns an interp.ActivationCache",
    "reset_hooks_end": "interp removes every hook when its run ends; for hooks that outlive "
    "one call use `with model.hooks(fwd=...)`",
    "clear_contexts": "each run gets fresh hook contexts",
}


class Output(NamedTuple):
    """``return_type="both"``: TransformerLens's ``Output(logits, loss)``."""

    logits: Tensor
    loss: Tensor


class StopForward(Exception):
    """Raised from a hook to end a forward pass early, carrying the residual stream."""

    def __init__(self, resid: Tensor):
        super().__init__("stop_at_layer")
        self.resid = resid


def lm_cross_entropy_loss(
    logits: Float[Tensor, "batch pos vocab"],
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    per_token: bool = False,
) -> Tensor:
    """Next-token cross-entropy, as TransformerLens's ``utils.lm_cross_entropy_loss``.

    Mean over the counted predictions (see the module docstring for which count), or
    ``[batch, pos - 1]`` per token (0 where not counted). Computed in float32 at least.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    log_probs = logits[:, :-1].log_softmax(-1)
    predicted = log_probs.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]
    if attention_mask is not None:
        mask = attention_mask.to(logits.device).bool()
        keep = mask[:, :-1] & mask[:, 1:]
        predicted = predicted.masked_fill(~keep, 0.0)
        n = keep.sum()
    else:
        n = torch.tensor(predicted.numel(), device=logits.device)
    if per_token:
        return -predicted
    if int(n) == 0:
        raise ValueError(
            "return_type='loss' needs at least one next-token prediction between real "
            f"tokens; this batch of shape {tuple(tokens.shape)} has none"
        )
    return -predicted.sum() / n


def accepted_message(name: str, accepted: Iterable[str]) -> str:
    hint = _DECLINED.get(name)
    listed = ", ".join(accepted)
    if hint is not None:
        return f"{name}= is not supported by interp: {hint}. Accepted keyword arguments: {listed}"
    return f"unexpected keyword argument {name!r}. Accepted keyword arguments: {listed}"


def check_kwargs(kwargs: Iterable[str], accepted: Sequence[str]) -> None:
    """Raise ``TypeError`` for the first keyword argument not in ``accepted``."""
    allowed = set(accepted)
    for name in kwargs:
        if name not in allowed:
            raise TypeError(accepted_message(name, accepted))


def explicit_params(fn: Callable[..., Any], exclude: Iterable[str] = ()) -> tuple[str, ...]:
    """The named keyword parameters of ``fn`` (not ``*args`` / ``**kwargs``), minus ``exclude``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ()
    skip = {"self", *exclude}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in params if p.kind in kinds and p.name not in skip)


def check_return_type(return_type: Any) -> None:
    if return_type not in RETURN_TYPES:
        raise ValueError(
            f"return_type must be one of 'logits', 'loss', 'both' or None; got {return_type!r}"
        )


def stop_layer(stop_at_layer: Any, n_layers: int) -> int:
    """``stop_at_layer`` as a block index in ``0..n_layers`` (negative counts from the end)."""
    if isinstance(stop_at_layer, bool) or not isinstance(stop_at_layer, int):
        raise TypeError(f"stop_at_layer must be an int, got {type(stop_at_layer).__name__}")
    layer = stop_at_layer + n_layers if stop_at_layer < 0 else stop_at_layer
    if not 0 <= layer <= n_layers:
        raise ValueError(
            f"stop_at_layer={stop_at_layer} is out of range for a model with {n_layers} layers "
            f"(use -{n_layers}..{n_layers})"
        )
    return layer


def stop_hook_name(layer: int, n_layers: int) -> str:
    """The hook whose tensor is the residual stream entering block ``layer``.

    ``blocks.{L-1}.hook_resid_post`` rather than ``blocks.{L}.hook_resid_pre``: it is the
    same tensor, but reading it after block ``L-1`` means hooks inside block ``L`` (its
    ``hook_resid_pre`` included) never fire, as in TransformerLens.
    """
    if layer == 0:
        return "blocks.0.hook_resid_pre"
    return f"blocks.{min(layer, n_layers) - 1}.hook_resid_post"


def raise_stop(tensor: Tensor, hook: Any) -> None:
    raise StopForward(tensor)


def filter_names(model: Any, names_filter: Any) -> tuple[list[str], list[Any]]:
    """Resolve a TransformerLens ``names_filter`` against ``model.hook_names``.

    Returns the names in model order and the patterns that each must fire (names and
    globs given explicitly; none for ``None`` or a predicate, which keep what fired).
    """
    if names_filter is None:
        return list(model.hook_names), []
    if callable(names_filter):
        names = [n for n in model.hook_names if names_filter(n)]
        if not names:
            from interp.hooks import HookNameError

            raise HookNameError(
                f"names_filter {names_filter!r} selects none of the model's "
                f"{len(model.hook_names)} hook names (see model.hook_names)"
            )
        return names, []
    patterns = [names_filter] if isinstance(names_filter, str) else list(names_filter)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            "names_filter must be a name, a glob, a list of them, or a predicate "
            f"lambda name: ...; got {names_filter!r}"
        )
    return model.resolve(patterns), patterns


def tokenize(
    model: Any,
    text: str | Sequence[str],
    padding_side: str | None = None,
    prepend_bos: bool | None = None,
):
    """Text to a padded ``Batch``, honouring ``prepend_bos`` and ``padding_side``.

    ``prepend_bos=None`` keeps the tokenizer's own choice; ``True`` makes every row
    start with the BOS token (added when the tokenizer does not add it), ``False``
    removes the BOS token the tokenizer adds. TransformerLens's own default is ``True``.
    """
    from interp.positions import Batch
    from interp.positions import tokenize as plain_tokenize

    side = "right" if padding_side is None else padding_side
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if prepend_bos is not None and not isinstance(prepend_bos, bool):
        raise TypeError(f"prepend_bos must be True, False or None, got {prepend_bos!r}")
    texts = [text] if isinstance(text, str) else list(text)
    tok = model.tokenizer
    if prepend_bos is None or tok is None or not texts:
        return plain_tokenize(model, text, padding_side=side)
    bos = tok.bos_token_id
    if prepend_bos and bos is None:
        raise ValueError(
            "prepend_bos=True, but this tokenizer has no BOS token; pass prepend_bos=False or None"
        )
    rows = [list(r) for r in tok(texts)["input_ids"]]
    adds_bos = bos is not None and tok("a")["input_ids"][:1] == [bos]
    if prepend_bos and not adds_bos:
        rows = [[bos, *r] for r in rows]
    elif not prepend_bos and adds_bos:
        rows = [r[1:] if r[:1] == [bos] else r for r in rows]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id
    if pad is None:
        if any(len(r) != width for r in rows):
            raise ValueError("texts of different lengths need a tokenizer with a pad token")
        pad = 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return Batch(ids, mask, texts=texts).to(model.device)
