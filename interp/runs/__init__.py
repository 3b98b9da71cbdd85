"""Batched runs over a dataset: ``generate``, ``score`` and ``capture_dataset``.

The three loops every study writes around a model, done once:

* ``generate(model, prompts, ...)``: texts or conversations in, completions out, batched
  with left padding, greedy or sampled (seeded per prompt and sample, so a rerun gives the
  same samples whatever the batch size), with stop strings and hooks on every forward
  pass or on the generated tokens only. The result carries a ``Batch`` of prompt +
  completion with named positions, ready to score or capture (teacher forcing on the
  model's own generations).
* ``score(model, batch, mask=...)``: per-token log-probabilities of each token given its
  prefix, and per-example NLL over a mask (``"assistant"``, any named mask, a
  ``[batch, pos]`` bool mask, or every predicted token).
* ``capture_dataset(model, data, names, ...)``: activations of a dataset at hook points,
  one row per token or pooled per example (mean / last / a named position), special
  tokens (BOS, pad, chat markers) left out of pooling, in memory or written to a folder
  of safetensors shards that a rerun resumes.

Conversations are encoded by ``interp.chat.encode``; all three take its ``chat_format``
(``"template"``, ``"plain"``, ``"auto"`` or a ``PlainFormat``, for base models) and
``chat_template_kwargs`` (e.g. ``{"enable_thinking": False}`` for Qwen3-style templates).

Rows are re-padded for every mini-batch (``score`` and ``capture_dataset`` pad on the
right, so position ids start at 0 in every row; ``generate`` pads prompts on the left and
lets ``transformers`` derive position ids from the attention mask): results do not depend
on how the input was padded. Nothing casts or moves the model; log-softmax and pooling are
computed in float32 on the model's output.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp.positions import Batch, position_axis, running

__all__ = [
    "DatasetActivations",
    "Generations",
    "Scores",
    "ShardedActivations",
    "capture_dataset",
    "generate",
    "score",
    "special_ids",
]

Message = Mapping[str, str]


# ---- rows: one example's tokens and named positions, unpadded ---------------------------------
@dataclass
class _Row:
    ids: Tensor  # [n] long, cpu
    positions: dict[str, int] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)  # name -> [n] bool
    text: str | None = None


def _is_conversation(x: Any) -> bool:
    return (
        isinstance(x, Sequence)
        and not isinstance(x, str)
        and len(x) > 0
        and all(isinstance(m, Mapping) for m in x)
    )


def _rows_from_batch(batch: Batch) -> list[_Row]:
    """Each row's real tokens (the attention mask's 1s, which must be contiguous)."""
    ids, att = batch.input_ids.cpu(), batch.attention_mask.cpu().bool()
    positions = {k: v.cpu() for k, v in batch.positions.items()}
    masks = {k: v.cpu() for k, v in batch.masks.items()}
    rows = []
    for b in range(ids.shape[0]):
        real = att[b].nonzero().flatten()
        if real.numel() == 0:
            raise ValueError(f"row {b} of the batch has no tokens (attention_mask all 0)")
        start, end = int(real[0]), int(real[-1]) + 1
        if real.numel() != end - start:
            raise ValueError(
                f"row {b} has padding between real tokens (attention_mask "
                f"{att[b].int().tolist()[:32]}...); pad on the left or the right only"
            )
        rows.append(
            _Row(
                ids[b, start:end].clone(),
                {k: int(v[b]) - start for k, v in positions.items()},
                {k: v[b, start:end].clone() for k, v in masks.items()},
                None if batch.texts is None else batch.texts[b],
            )
        )
    return rows


def _tokenizer(model: Any) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("this model has no tokenizer; pass token ids (a Batch) instead of text")
    return tok


@dataclass(frozen=True)
class _ChatOptions:
    """How conversations are encoded (``interp.chat.encode``'s ``chat_format`` and template
    keyword arguments)."""

    chat_format: Any = "template"
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, chat_format: Any, chat_template_kwargs: Mapping[str, Any] | None) -> _ChatOptions:
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, Mapping):
            raise TypeError(
                "chat_template_kwargs must be a dict of chat-template keyword arguments (e.g. "
                f"{{'enable_thinking': False}}), got {type(chat_template_kwargs).__name__}"
            )
        return cls(chat_format, dict(chat_template_kwargs or {}))


_DEFAULT_CHAT = _ChatOptions()


def _row_of(
    model: Any, item: Any, generation_prompt: bool, chat: _ChatOptions = _DEFAULT_CHAT
) -> list[_Row]:
    """Rows of one input item: a text, a conversation or a ``Batch``."""
    if isinstance(item, Batch):
        return _rows_from_batch(item)
    tok = _tokenizer(model)
    if isinstance(item, str):
        ids = tok(item)["input_ids"]
        if not ids:
            raise ValueError(f"text {item!r} tokenizes to no tokens; drop it or give it text")
        return [_Row(torch.tensor(ids, dtype=torch.long), text=item)]
    if _is_conversation(item):
        from interp.chat import encode

        conv = list(item)
        ends_assistant = conv[-1].get("role") == "assistant"
        if generation_prompt and ends_assistant:
            raise ValueError(
                "a prompt conversation ends with an assistant message; generate continues after "
                "a generation prompt (prefilling an assistant turn is not supported: render the "
                "prompt text with interp.chat.render and pass text)"
            )
        agp = generation_prompt or None
        batch = encode(
            tok,
            [conv],
            add_generation_prompt=agp,
            padding_side="right",
            chat_format=chat.chat_format,
            **chat.template_kwargs,
        )
        return _rows_from_batch(batch)
    raise TypeError(
        "expected texts, conversations (lists of {'role', 'content'} dicts) or an interp Batch; "
        f"got {type(item).__name__}"
    )


def _rows(
    model: Any, data: Any, generation_prompt: bool = False, chat: _ChatOptions = _DEFAULT_CHAT
) -> list[_Row]:
    """Every row of ``data``: a text, a list of texts or conversations, one conversation,
    a ``Batch`` or ``Generations``."""
    if isinstance(data, Generations):
        data = data.batch
    if isinstance(data, Batch | str) or _is_conversation(data):
        rows = _row_of(model, data, generation_prompt, chat)
    elif isinstance(data, Sequence):
        rows = [r for item in data for r in _row_of(model, item, generation_prompt, chat)]
    else:
        raise TypeError(
            "expected a text, a list of texts or conversations, a Batch or Generations; got "
            f"{type(data).__name__}"
        )
    if not rows:
        raise ValueError("empty input: no texts, conversations or rows to run")
    return rows


def _collate(rows: Sequence[_Row], pad_id: int, side: str = "right") -> Batch:
    """Pad rows into a ``Batch`` (cpu). Named positions and masks that every row has are kept."""
    T = max(len(r.ids) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    pos_names = set.intersection(*(set(r.positions) for r in rows))
    mask_names = set.intersection(*(set(r.masks) for r in rows))
    positions = {k: torch.zeros(B, dtype=torch.long) for k in sorted(pos_names)}
    masks = {k: torch.zeros((B, T), dtype=torch.bool) for k in sorted(mask_names)}
    for b, r in enumerate(rows):
        n = len(r.ids)
        shift = T - n if side == "left" else 0
        ids[b, shift : shift + n] = r.ids
        att[b, shift : shift + n] = 1
        for k in positions:
            positions[k][b] = r.positions[k] + shift
        for k in masks:
            masks[k][b, shift : shift + n] = r.masks[k]
    texts = [r.text for r in rows]
    return Batch(
        ids,
        att,
        positions=positions,
        masks=masks,
        texts=texts if all(t is not None for t in texts) else None,
    )


def _pad_id(model: Any) -> int:
    tok = getattr(model, "tokenizer", None)
    for value in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return 0


def _progress(total: int | None, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _accepts(model: Any, kwarg: str) -> bool:
    """Whether ``model.forward`` takes ``kwarg`` (its own parameter or the backend's)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    if kwarg in params:
        return True
    backend = getattr(model, "_backend_kwargs", None)
    return callable(backend) and kwarg in backend()


# ---- generate ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Generations:
    """What ``generate`` returns: ``n`` completions per prompt, prompt-major.

    Attributes:
        texts: the completion of each row, decoded without special tokens and cut before
            the first stop string.
        token_ids: the generated token ids of each row, up to and including the EOS token
            or the token that completed a stop string (so scoring them reproduces what was
            generated).
        prompt_index: the prompt each row continues (row ``i`` is sample
            ``sample_index[i]`` of prompt ``prompt_index[i]``).
        sample_index: which of the ``n`` samples of its prompt each row is.
        finish_reasons: ``"eos"``, ``"stop"`` (a stop string) or ``"length"``.
        prompts: each prompt as the model saw it (a conversation rendered by its chat
            template, with the generation prompt).
        batch: prompt + generated tokens of every row, padded on ``padding_side``, with the
            prompts' named positions (``pre_assistant``, ``user_end``, ``user`` … for
            conversations) and the masks ``generated`` (the ``token_ids``) and, for
            conversations, ``assistant`` (the same without a final EOS token).
    """

    texts: list[str]
    token_ids: list[list[int]]
    prompt_index: list[int]
    sample_index: list[int]
    finish_reasons: list[str]
    prompts: list[str]
    batch: Batch

    def __len__(self) -> int:
        return len(self.texts)

    def by_prompt(self) -> list[list[str]]:
        """The completions grouped per prompt: ``[n_prompts][n]``."""
        out: list[list[str]] = [[] for _ in self.prompts]
        for p, text in zip(self.prompt_index, self.texts, strict=True):
            out[p].append(text)
        return out


def _eos_ids(model: Any) -> list[int]:
    ids: set[int] = set()
    gen_cfg = getattr(getattr(model, "model", None), "generation_config", None)
    tok = getattr(model, "tokenizer", None)
    for source in (getattr(gen_cfg, "eos_token_id", None), getattr(tok, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(s) for s in source)
    return sorted(ids)


def _row_seed(seed: int, prompt: int, sample: int) -> int:
    digest = hashlib.sha256(f"interp.runs.generate:{seed}:{prompt}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _sampling_probs(
    scores: Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> Tensor:
    """The distribution ``transformers`` samples from with the same settings: temperature,
    then top-k (ties with the k-th score kept), top-p (the smallest set of most likely tokens
    whose mass reaches ``top_p``), then min-p (tokens at least ``min_p`` × the most likely
    one); unnormalised (zeros outside the kept set)."""
    probs = torch.softmax(scores.float() / temperature, dim=-1)
    if top_k > 0 and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p < 1.0:
        total = probs.sum(-1, keepdim=True)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p * total, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, 0.0)
    return probs


def _sampler(
    uniforms: Tensor,
    prompt_len: int,
    temperature: float,
    top_p: float,
    top_k: int = 0,
    min_p: float = 0.0,
) -> Any:
    """A logits processor that samples (``_sampling_probs``) with the given uniforms.

    ``uniforms[row, step]`` decides the token of ``row`` at ``step`` by inverse-CDF
    sampling, so each row's samples depend on its own seed only, not on the batch it ran
    in or the global RNG. It returns scores that are ``-inf`` except at the chosen token,
    so ``transformers``' greedy search picks it (after every processor the model's
    generation config applies first).
    """
    from transformers import LogitsProcessor

    class _Sample(LogitsProcessor):
        def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
            step = input_ids.shape[1] - prompt_len
            u = uniforms[:, step].to(device=scores.device, dtype=torch.float32)
            probs = _sampling_probs(scores, temperature, top_k, top_p, min_p)
            cdf = probs.cumsum(-1)
            target = (u * cdf[:, -1]).unsqueeze(-1)
            token = torch.searchsorted(cdf, target, right=True)
            # Rounding can put the target at the total mass: take the last possible token.
            ids = torch.arange(probs.shape[-1], device=probs.device)
            last = torch.where(probs > 0, ids, 0).max(-1, keepdim=True).values
            token = torch.minimum(token, last)
            out = torch.full_like(scores, float("-inf"))
            return out.scatter(-1, token, 0.0)

    return _Sample()


def _stop_criteria(tok: Any, stop: Sequence[str], prompt_len: int) -> Any:
    """Per-row stopping once the decoded generated tokens contain a stop string."""
    from transformers import StoppingCriteria

    tail = 4 * max(len(s) for s in stop) + 4  # ≥ the tokens of any stop string

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
            new = input_ids[:, prompt_len:][:, -tail:].tolist()
            texts = tok.batch_decode(new, skip_special_tokens=False)
            done = [any(s in t for s in stop) for t in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return _Stop()


def _cut(tok: Any, ids: list[int], eos: set[int], stop: Sequence[str]) -> tuple[int, str]:
    """Length of the generated ids to keep and why generation ended."""
    end, reason = len(ids), "length"
    first_eos = next((i for i, t in enumerate(ids) if t in eos), None)
    if first_eos is not None:
        end, reason = first_eos + 1, "eos"
    if stop:

        def hit(k: int) -> bool:
            text = tok.decode(ids[:k], skip_special_tokens=False)
            return any(s in text for s in stop)

        if hit(end):  # the shortest prefix that contains a stop string (binary search)
            lo, hi = 1, end
            while lo < hi:
                mid = (lo + hi) // 2
                if hit(mid):
                    hi = mid
                else:
                    lo = mid + 1
            if lo < end or reason == "length":
                end, reason = lo, "stop"
    return end, reason


def _text(tok: Any, ids: list[int], reason: str, stop: Sequence[str]) -> str:
    text = tok.decode(ids, skip_special_tokens=True)
    if reason == "stop":
        cuts = [text.find(s) for s in stop if s in text]
        if cuts:
            text = text[: min(cuts)]
    return text


def _tl_stepper(model: Any, n_rows: int) -> tuple[Callable[[Tensor, Tensor], Tensor], bool]:
    """``(step, cached)``: ``step(ids, mask)`` gives the logits of a TransformerLens model over
    the sequence so far (``[batch, pos]`` ids and attention mask, growing by one column per
    decoding step).

    A ``HookedTransformer`` runs with TransformerLens's own KV cache (``cached``): the prompt
    in one pass, then only the newest token per step, as ``transformers`` does. After each
    pass the cache must hold every token so far (a model whose attention ignored it would
    decode from the newest token alone): that raises instead. A ``TransformerBridge``
    recomputes the whole sequence at every step (not ``cached``): its attention reads a KV
    cache under the name ``past_key_values``, which ``transformers`` 5 passes to the
    attention modules as ``cache``, so a cache would silently stay empty.
    """
    tl = model.model
    if model._bridge:
        use_cache = {"use_cache": False} if "use_cache" in model._backend_kwargs() else {}

        def recompute(ids: Tensor, mask: Tensor) -> Tensor:
            return tl(ids, attention_mask=mask, **use_cache)

        return recompute, False

    try:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache as KVCache
    except ImportError:  # TransformerLens 2
        from transformer_lens.past_key_value_caching import (
            HookedTransformerKeyValueCache as KVCache,
        )
    cache = KVCache.init_cache(tl.cfg, tl.cfg.device, n_rows)
    done = {"n": 0}

    def step(ids: Tensor, mask: Tensor) -> Tensor:
        n = done["n"]  # the cache holds the first n tokens; it appends the mask's new columns
        logits = tl(ids[:, n:], attention_mask=mask[:, n:], past_kv_cache=cache)
        done["n"] = ids.shape[1]
        held = {int(entry.past_keys.shape[1]) for entry in cache.entries}
        if held != {ids.shape[1]}:
            raise RuntimeError(
                f"runs.generate on {type(tl).__name__}: after {ids.shape[1]} tokens its KV "
                f"cache holds {sorted(held)} per layer: this model's attention does not fill "
                "the cache it is given, and decoding would ignore the earlier tokens"
            )
        return logits

    return step, True


def _tl_decode(
    model: Any,
    batch: Batch,
    max_new_tokens: int,
    processors: Sequence[Any],
    criteria: Sequence[Any],
    pad: int,
    eos: Sequence[int],
) -> Int[Tensor, "batch pos_new"]:
    """Prompt + new tokens of a TransformerLens model (``batch`` left-padded, on the model's
    device), decoded as ``transformers``' greedy search decodes on the Hugging Face path:
    each step takes the last position's logits in float32, applies ``processors`` in order
    (the ``_sampler`` last when sampling) and the argmax; once there are EOS ids a finished
    row continues with ``pad``; rows finish at an EOS id or a stopping criterion, and
    decoding ends when all have. Forward passes as ``_tl_stepper`` runs them, inside
    ``model.generating`` (``interp.positions.decoding_step`` marks the cached steps)."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    seq, mask = batch.input_ids, batch.attention_mask.long()
    step, cached = _tl_stepper(model, seq.shape[0])
    process, stopping = LogitsProcessorList(processors), StoppingCriteriaList(criteria)
    eos_ids = torch.tensor(list(eos), dtype=torch.long, device=seq.device)
    unfinished = torch.ones(seq.shape[0], dtype=torch.bool, device=seq.device)
    with model.generating(batch, cached=cached):
        for i in range(max_new_tokens):
            if i:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = step(seq, mask)
            if hasattr(logits, "logits"):
                logits = logits.logits
            scores = process(seq, logits[:, -1].to(dtype=torch.float32, copy=True))
            token = scores.argmax(-1)
            if eos:
                token = torch.where(unfinished, token, torch.full_like(token, pad))
                unfinished &= ~torch.isin(token, eos_ids)
            seq = torch.cat([seq, token[:, None]], dim=-1)
            if criteria:
                unfinished &= ~stopping(seq, scores).to(unfinished.device)
            if not bool(unfinished.any()):
                break
    return seq


def _generation_hooks(
    hooks: Sequence[Any], on: str, recompute: dict[str, int] | None = None
) -> tuple[list[Any], dict[str, int]]:
    """Hooks for ``model.hooks``; on ``"generated"`` each acts on decoding steps only.

    ``recompute``: the model decodes without a KV cache, each pass recomputing the whole
    sequence (left-padded prompts of ``recompute["P"]`` columns, then the generated tokens),
    so a ``"generated"`` hook is applied to the generated positions of every pass: the same
    edits a cached decoding step makes one position at a time.
    """
    from interp.hooks import HookReplacementError
    from interp.positions import decoding_step

    seen = {"calls": 0, "decoding": 0}
    out = []
    for spec in hooks:
        if not (isinstance(spec, tuple | list) and len(spec) == 2 and callable(spec[1])):
            raise TypeError(f"hooks must be (name, fn) pairs with fn(tensor, hook); got {spec!r}")
        name, fn = spec
        if on == "all":
            out.append((name, fn))
            continue

        def gated(tensor: Tensor, hook: Any, fn: Callable[..., Any] = fn) -> Any:
            seen["calls"] += 1
            if recompute is None:
                if not decoding_step():
                    return None
                seen["decoding"] += 1
                return fn(tensor, hook)
            axis, start = position_axis(hook.name), recompute["P"]
            n = tensor.shape[axis] - start
            if n <= 0:  # the prompt's pass
                return None
            seen["decoding"] += 1
            part = tensor.narrow(axis, start, n)  # a view: in-place edits reach the tensor
            new = fn(part, hook)
            if new is None or new is part:
                return None
            if not isinstance(new, Tensor) or new.shape != part.shape or new.dtype != part.dtype:
                got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise HookReplacementError(
                    f"hook {hook.name!r} (hooks_on='generated') got the generated positions "
                    f"{tuple(part.shape)} {part.dtype} and returned {got}; return a tensor of "
                    "the same shape and dtype (or None)"
                )
            edited = tensor.clone()
            edited.narrow(axis, start, n).copy_(new)
            return edited

        out.append((name, gated))
    return out, seen


def generate(
    model: Any,
    prompts: Any,
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    n: int = 1,
    seed: int = 0,
    stop: str | Sequence[str] | None = None,
    hooks: Sequence[Any] = (),
    hooks_on: str = "all",
    logits_processors: Sequence[Any] | Callable[[list[int]], Sequence[Any]] | None = None,
    padding_side: str = "right",
    chat_format: Any = "template",
    chat_template_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
    **generate_kwargs: Any,
) -> Generations:
    """Complete ``prompts`` in batches.

    Args:
        model: a ``HookedModel`` on the Hugging Face backend (``interp.load`` /
            ``interp.tiny``), completed by ``transformers``' ``generate``, or on a
            TransformerLens ``HookedTransformer`` / ``TransformerBridge``, completed by
            interp's own decoding loop with the same logits processing, sampling streams
            and stopping (same weights: same tokens); there ``generate_kwargs`` raise
            ``TypeError``. A ``HookedTransformer`` decodes with its KV cache, as
            ``transformers`` does; a ``TransformerBridge`` recomputes the whole sequence at
            each step, so its hooks see every position (``"generated"``: every generated
            position) at every step, and interventions with positions raise.
        prompts: texts, conversations (lists of ``{"role", "content"}`` messages, encoded by
            ``interp.chat.encode`` with the generation prompt), or an interp ``Batch``.
        max_new_tokens: the most tokens generated per row.
        batch_size: rows per ``generate`` call (prompts are sorted by length first, so
            rows of similar length share a batch; the result is in prompt order).
        do_sample: sample instead of greedy decoding: ``temperature``, then ``top_k``
            (0: off), ``top_p`` (nucleus) and ``min_p`` (0: off) filtering, in that order
            and with the semantics of ``transformers``' warpers.
        n: samples per prompt (needs ``do_sample=True``).
        seed: sampling seed. Sample ``s`` of prompt ``p`` is drawn from its own random
            stream, seeded by ``(seed, p, s)``: a rerun gives the same samples whatever the
            batch size, and the global RNG is neither used nor advanced.
        stop: stop string(s): a row stops once its generated text contains one; its text
            is cut before it.
        hooks: ``(name, fn)`` forward hooks active while generating;
            ``hooks_on="all"`` (every forward pass: the prompt's and each decoding step's)
            or ``"generated"`` (decoding steps only: they edit the activations of generated
            tokens; the first new token is predicted by the prompt pass and is not
            affected). Interventions with named positions already edit the prompt pass only.
        logits_processors: ``transformers`` logits processors applied at every step, before
            sampling: a list, or a callable ``f(prompt_indices)`` returning one or a list,
            called once per batch with the prompt index of each of its rows (for
            processors that keep per-row state, e.g. forcing an answer format).
        padding_side: padding of ``Generations.batch`` (prompts are always left-padded
            for generation).
        chat_format: how conversations are rendered: ``"template"`` (the tokenizer's chat
            template), ``"plain"``, ``"auto"`` or a ``PlainFormat`` (``interp.chat.encode``).
        chat_template_kwargs: keyword arguments for the chat template, e.g.
            ``{"enable_thinking": False}`` (Qwen3: the prompt ends after an empty thinking
            block).
        progress: show a tqdm bar.
        generate_kwargs: passed to ``transformers`` ``generate`` (e.g.
            ``repetition_penalty``); Hugging Face backend only (on TransformerLens pass
            the matching logits processor, e.g. ``RepetitionPenaltyLogitsProcessor``).

    Returns:
        ``Generations``: texts, token ids, finish reasons and a ``Batch`` of prompt +
        completion with named positions (``score`` / ``interp.capture`` take it as is).
    """
    from interp.adapters.hf import HFHookedModel
    from interp.adapters.tl import TLHookedModel

    if not isinstance(model, HFHookedModel | TLHookedModel):
        raise TypeError(
            "interp.runs.generate runs Hugging Face models (interp.load / interp.tiny) and "
            "TransformerLens HookedTransformer / TransformerBridge models (interp.load(tl_model)); "
            f"got {type(model).__name__}"
        )
    on_tl = isinstance(model, TLHookedModel)
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    _check_batch_size(batch_size)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if n > 1 and not do_sample:
        raise ValueError(f"n={n} samples per prompt need do_sample=True (greedy gives n copies)")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r} (use do_sample=False)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: off), got {top_k!r}")
    if not 0 <= min_p < 1:
        raise ValueError(f"min_p must be in [0, 1) (0: off), got {min_p!r}")
    if not do_sample and (temperature != 1.0 or top_p != 1.0 or top_k or min_p):
        raise ValueError(
            f"temperature={temperature} / top_p={top_p} / top_k={top_k} / min_p={min_p} apply "
            "to sampling: pass do_sample=True (greedy decoding ignores them)"
        )
    if hooks_on not in ("all", "generated"):
        raise ValueError(f"hooks_on must be 'all' or 'generated', got {hooks_on!r}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
    for key, use in (
        ("num_return_sequences", "n="),
        ("logits_processor", "logits_processors="),
        ("stopping_criteria", "stop="),
    ):
        if key in generate_kwargs:
            raise TypeError(f"runs.generate sets {key} itself; use {use}")
    if on_tl and generate_kwargs:
        raise TypeError(
            f"runs.generate on a TransformerLens model decodes with interp's own loop, so "
            f"{sorted(generate_kwargs)} (keyword arguments of transformers' generate) cannot "
            "apply; pass the matching logits processor in logits_processors= instead (e.g. "
            "transformers.RepetitionPenaltyLogitsProcessor for repetition_penalty)"
        )

    tok = _tokenizer(model)
    chat = _ChatOptions.of(chat_format, chat_template_kwargs)
    prompt_rows = _rows(model, prompts, generation_prompt=True, chat=chat)
    pad = _pad_id(model)
    eos = _eos_ids(model)
    jobs = [(p, s) for p in range(len(prompt_rows)) for s in range(n)]
    order = sorted(range(len(jobs)), key=lambda j: -len(prompt_rows[jobs[j][0]].ids))
    # A TransformerBridge decodes without a KV cache (_tl_stepper): "generated" hooks are
    # applied to the generated columns of each pass, from the batch's prompt length on.
    recompute = {"P": 0} if on_tl and model._bridge else None
    wrapped, seen = _generation_hooks(hooks, hooks_on, recompute)
    kept: list[list[int]] = [[] for _ in jobs]
    reasons = [""] * len(jobs)
    bar = _progress(len(jobs), "generate", progress)
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = _collate([prompt_rows[jobs[j][0]] for j in chunk], pad, "left")
            batch = batch.to(model.device)
            P = batch.input_ids.shape[1]
            if recompute is not None:
                recompute["P"] = P
            processors, criteria = [], []
            if isinstance(logits_processors, Sequence):
                processors.extend(logits_processors)
            elif logits_processors is not None:  # a factory: one batch's processors
                made = logits_processors([jobs[j][0] for j in chunk])
                processors.extend(made if isinstance(made, Sequence) else [made])
            if do_sample:
                uniforms = torch.stack(
                    [
                        torch.rand(
                            max_new_tokens,
                            generator=torch.Generator().manual_seed(_row_seed(seed, *jobs[j])),
                            dtype=torch.float64,
                        )
                        for j in chunk
                    ]
                )
                processors.append(_sampler(uniforms, P, temperature, top_p, top_k, min_p))
            if stops:
                criteria.append(_stop_criteria(tok, stops, P))
            if on_tl:
                with torch.no_grad(), model.hooks(fwd=wrapped):
                    out = _tl_decode(model, batch, max_new_tokens, processors, criteria, pad, eos)
            else:
                kwargs: dict[str, Any] = dict(
                    max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
                )
                if eos:
                    kwargs["eos_token_id"] = eos
                if processors:
                    kwargs["logits_processor"] = processors
                if criteria:
                    kwargs["stopping_criteria"] = criteria
                with torch.no_grad(), model.hooks(fwd=wrapped):
                    out = model.generate(batch, **kwargs, **generate_kwargs)
            new = out[:, P:].cpu().tolist()
            for j, ids in zip(chunk, new, strict=True):
                end, reasons[j] = _cut(tok, ids, set(eos), stops)
                kept[j] = ids[:end]
            bar.update(len(chunk))
    finally:
        bar.close()
    generated = any(len(k) > 1 for k in kept)
    if hooks_on == "generated" and seen["calls"] and not seen["decoding"] and generated:
        raise RuntimeError(
            "hooks_on='generated': this model's generate never marked a decoding step "
            "(interp.positions.decoding_step), so the hooks were never applied"
        )

    rows = []
    for (p, _), ids in zip(jobs, kept, strict=True):
        prompt = prompt_rows[p]
        n_prompt, n_new = len(prompt.ids), len(ids)
        gen_mask = torch.cat(
            [torch.zeros(n_prompt, dtype=torch.bool), torch.ones(n_new, dtype=torch.bool)]
        )
        masks = {
            k: torch.cat([m, torch.zeros(n_new, dtype=torch.bool)]) for k, m in prompt.masks.items()
        }
        masks["generated"] = gen_mask
        if "pre_assistant" in prompt.positions:  # a conversation: its reply is the assistant's
            assistant = gen_mask.clone()
            if n_new and ids[-1] in eos:
                assistant[-1] = False
            masks["assistant"] = assistant
        rows.append(
            _Row(
                torch.cat([prompt.ids, torch.tensor(ids, dtype=torch.long)]),
                dict(prompt.positions),
                masks,
            )
        )
    return Generations(
        texts=[_text(tok, ids, r, stops) for ids, r in zip(kept, reasons, strict=True)],
        token_ids=kept,
        prompt_index=[p for p, _ in jobs],
        sample_index=[s for _, s in jobs],
        finish_reasons=reasons,
        prompts=[r.text if r.text is not None else tok.decode(r.ids.tolist()) for r in prompt_rows],
        batch=_collate(rows, pad, padding_side),
    )


# ---- score -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scores:
    """What ``score`` returns, aligned with the input ``Batch``'s ``[batch, pos]`` layout.

    Attributes:
        logprobs: ``log p(token[t] | tokens[:t])`` at every scored token, 0 elsewhere
            (float32).
        mask: the scored tokens: the mask asked for, restricted to real tokens that have
            a previous token in their row.
        n_tokens: scored tokens per row.
        nll: ``reduction="mean"``: mean NLL per row over its scored tokens (NaN for a row
            with none); ``"sum"``: their sum; ``"none"``: ``[batch, pos]`` per-token NLL
            (0 outside ``mask``).
    """

    logprobs: Float[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    n_tokens: Int[Tensor, " batch"]
    nll: Float[Tensor, "batch ..."]


def _resolve_mask(batch: Batch, mask: Any) -> Tensor:
    """The ``[batch, pos]`` bool mask ``mask`` names in ``batch``."""
    shape = tuple(batch.input_ids.shape)
    if mask is None:
        return batch.attention_mask.bool()
    if isinstance(mask, str):
        if mask in batch.masks:
            return batch.masks[mask].bool()
        if mask in batch.positions:
            out = torch.zeros(shape, dtype=torch.bool, device=batch.input_ids.device)
            idx = batch.positions[mask].to(out.device)
            out[torch.arange(shape[0], device=out.device), idx] = True
            return out
        known = sorted([*batch.masks, *batch.positions])
        raise KeyError(
            f"unknown mask {mask!r}; this batch (input_ids {shape}) has "
            f"{known or 'no named masks or positions'} (named masks come from "
            "interp.chat.encode and interp.runs.generate)"
        )
    if isinstance(mask, Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) != shape:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match the batch's input_ids {shape} "
                "(a mask is [batch, pos], aligned with input_ids)"
            )
        return mask
    raise TypeError(
        f"mask must be None, a named mask or position, or a [batch, pos] bool tensor; got "
        f"{type(mask).__name__}"
    )


def _as_scoring_batch(model: Any, batch: Any, chat: _ChatOptions = _DEFAULT_CHAT) -> Batch:
    if isinstance(batch, Generations):
        return batch.batch
    if isinstance(batch, Batch):
        return batch
    return _collate(_rows(model, batch, chat=chat), _pad_id(model), "right")


def score(
    model: Any,
    batch: Any,
    mask: Any = None,
    *,
    reduction: str = "mean",
    batch_size: int = 8,
    chat_format: Any = "template",
    chat_template_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> Scores:
    """Log-probabilities of each token given its prefix, and per-example NLL over a mask.

    Args:
        model: a ``HookedModel``.
        batch: a ``Batch`` (any padding), ``Generations``, texts, or conversations
            (teacher-forced, encoded with ``interp.chat.encode``).
        mask: which tokens to score: ``None`` (every token after the first of its row), a
            named mask (``"assistant"``, ``"generated"`` …) or named position of the batch,
            or a ``[batch, pos]`` bool tensor aligned with ``input_ids``. Token ``t`` is
            scored by the logits at ``t - 1``; padding and each row's first token are never
            scored.
        reduction: ``"mean"`` / ``"sum"`` of the NLL per row, or ``"none"`` (per token).
        batch_size: rows per forward pass (rows are re-padded on the right per pass,
            shortest padding first; results come back in the input's layout).
        chat_format: how conversations are rendered (``interp.chat.encode``).
        chat_template_kwargs: keyword arguments for the chat template (e.g.
            ``{"enable_thinking": False}``).
        progress: show a tqdm bar.

    Hooks active around the call apply. The model runs in its own dtype; the log-softmax
    is computed in float32 on the selected logits.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    _check_batch_size(batch_size)
    full = _as_scoring_batch(model, batch, _ChatOptions.of(chat_format, chat_template_kwargs))
    want = _resolve_mask(full, mask).cpu()
    rows = _rows_from_batch(full)
    att = full.attention_mask.cpu().bool()
    starts = [int(att[b].nonzero()[0]) for b in range(len(rows))]
    for b, r in enumerate(rows):  # named positions stay, for interventions that use them
        r.masks["_score"] = want[b, starts[b] : starts[b] + len(r.ids)].clone()
        r.masks["_score"][0] = False  # the first token has no prediction
    B, T = full.input_ids.shape
    logprobs = torch.zeros((B, T), dtype=torch.float32)
    scored = torch.zeros((B, T), dtype=torch.bool)
    order = sorted(range(B), key=lambda b: -len(rows[b].ids))
    keep_kw = _accepts(model, "logits_to_keep")
    bar = _progress(B, "score", progress)
    try:
        for s in range(0, B, batch_size):
            chunk = order[s : s + batch_size]
            sub = _collate([rows[b] for b in chunk], _pad_id(model), "right")
            target = sub.masks["_score"]
            if not target.any():
                bar.update(len(chunk))
                continue
            first = int(target.any(0).nonzero()[0])  # earliest scored column
            kw: dict[str, Any] = {}
            width = sub.input_ids.shape[1]
            if keep_kw:
                kw["logits_to_keep"] = width - (first - 1)
            sub_dev = sub.to(model.device)
            with torch.no_grad(), running(sub_dev):
                logits = model.forward(sub_dev.input_ids, sub_dev.attention_mask, **kw)
            offset = width - logits.shape[1]  # logits[:, k] are those of position offset + k
            rr, tt = target.nonzero(as_tuple=True)
            lp = torch.empty(len(rr), dtype=torch.float32)
            for c in range(0, len(rr), 1024):  # bounded float32 copies of the logits
                r_, t_ = rr[c : c + 1024], tt[c : c + 1024]
                pred = logits[r_.to(logits.device), (t_ - 1 - offset).to(logits.device)]
                lsm = pred.float().log_softmax(-1)
                tok = sub.input_ids[r_, t_].to(logits.device)
                lp[c : c + 1024] = lsm.gather(-1, tok[:, None])[:, 0].cpu()
            del logits
            for i, b in enumerate(chunk):
                sel = rr == i
                cols = tt[sel] + starts[b]
                logprobs[b, cols] = lp[sel]
                scored[b, cols] = True
            bar.update(len(chunk))
    finally:
        bar.close()
    n_tokens = scored.sum(1)
    token_nll = -logprobs
    if reduction == "none":
        nll = token_nll
    elif reduction == "sum":
        nll = token_nll.sum(1)
    else:
        nll = token_nll.sum(1) / n_tokens.clamp_min(1)
        nll = nll.masked_fill(n_tokens == 0, float("nan"))
    return Scores(logprobs=logprobs, mask=scored, n_tokens=n_tokens, nll=nll)


# ---- capture_dataset ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetActivations:
    """Activations of a dataset: one row per token or per example.

    Attributes:
        acts: hook name -> ``[rows, d]`` (``[rows, k, d]`` for ``k`` named positions;
            attention patterns keep their head axis).
        example: ``[rows]`` index of the input example each row comes from.
        position: ``[rows]`` the token's index within its example (its own tokens, no
            padding) for token rows; -1 for pooled rows.
    """

    acts: dict[str, Tensor]
    example: Int[Tensor, " rows"]
    position: Int[Tensor, " rows"]

    def __getitem__(self, name: str) -> Tensor:
        return self.acts[name]

    def __len__(self) -> int:
        return int(self.example.shape[0])

    @property
    def names(self) -> list[str]:
        return list(self.acts)

    def stack(self) -> Tensor:
        """All hooks stacked in front: ``[n_names, rows, ...]``."""
        return torch.stack(list(self.acts.values()))


_META = "meta.json"
_CONFIG = "config.json"


@dataclass(frozen=True)
class ShardedActivations:
    """A folder of ``capture_dataset`` shards (``shard_00000.safetensors`` …, one per input
    batch, and ``meta.json`` once complete). ``load()`` reads everything into memory;
    iterating yields one ``DatasetActivations`` per shard."""

    path: Path
    meta: dict[str, Any]

    def __len__(self) -> int:
        return int(self.meta["rows"])

    def __iter__(self) -> Iterator[DatasetActivations]:
        for name in self.meta["shards"]:
            yield _read_shard(self.path / name)

    def load(self) -> DatasetActivations:
        return _concat(list(self), self.meta["names"])


def _read_shard(path: Path) -> DatasetActivations:
    from safetensors.torch import load_file

    data = load_file(str(path))
    example = data.pop("__example__")
    position = data.pop("__position__")
    return DatasetActivations(acts=data, example=example, position=position)


def _concat(parts: Sequence[DatasetActivations], names: Sequence[str]) -> DatasetActivations:
    return DatasetActivations(
        acts={n: torch.cat([p.acts[n] for p in parts]) for n in names},
        example=torch.cat([p.example for p in parts]),
        position=torch.cat([p.position for p in parts]),
    )


def special_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokenizer's special tokens: BOS, EOS, pad, unknown and every added token
    marked special (chat markers such as ``<|im_start|>``)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return sorted(ids)


def _stop_layer(model: Any, names: Sequence[str]) -> int | None:
    """The block to stop before, when every name is in (or before) a block and the model's
    ``forward`` takes ``stop_at_layer``."""
    if not _accepts(model, "stop_at_layer"):
        return None
    last = -1
    for name in names:
        m = re.match(r"^blocks\.(\d+)\.", name)
        if m is not None:
            last = max(last, int(m.group(1)))
        elif name != "hook_embed":
            return None
    return last + 1


def _iter_batches(
    model: Any, data: Any, batch_size: int, chat: _ChatOptions = _DEFAULT_CHAT
) -> Iterator[tuple[list[_Row], bool]]:
    """``(rows, sortable)``: lists of ``batch_size`` inputs each; one per ``Batch`` of an
    iterable of them, which is run as given (``sortable`` False)."""
    if isinstance(data, Generations):
        data = data.batch
    if isinstance(data, Batch):
        rows = _rows_from_batch(data)
        for s in range(0, len(rows), batch_size):
            yield rows[s : s + batch_size], True
        return
    if isinstance(data, str) or _is_conversation(data):
        data = [data]
    if not isinstance(data, Iterable):
        raise TypeError(
            "expected texts, conversations, a Batch or an iterable of Batches; got "
            f"{type(data).__name__}"
        )
    chunk: list[_Row] = []
    for item in data:
        if isinstance(item, Batch):
            if chunk:
                raise TypeError("mix of Batches and texts/conversations; pass one kind")
            yield _rows_from_batch(item), False
            continue
        chunk.extend(_row_of(model, item, False, chat))
        if len(chunk) >= batch_size:
            yield chunk, True
            chunk = []
    if chunk:
        yield chunk, True


def _windows(
    batches: Iterator[tuple[list[_Row], bool]], size: int
) -> Iterator[tuple[list[list[_Row]], bool]]:
    """Consecutive sortable chunks grouped ``size`` at a time (rows are sorted by length within
    a window); an unsortable chunk (a caller's own ``Batch``) is a window of its own."""
    window: list[list[_Row]] = []
    for rows, sortable in batches:
        if not sortable:
            if window:
                yield window, True
                window = []
            yield [rows], False
            continue
        window.append(rows)
        if len(window) >= size:
            yield window, True
            window = []
    if window:
        yield window, True


def _fingerprint(rows: Sequence[_Row], config: str) -> str:
    h = hashlib.sha256(config.encode())
    for r in rows:
        h.update(r.ids.numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:32]


class _Plan:
    """How one batch's activations are selected (positions / pooling) and what they keep."""

    def __init__(self, positions: Any, pool: Any, exclude_special: bool, specials: Tensor) -> None:
        if positions is not None and pool is not None:
            raise ValueError(
                "pass positions= (which tokens) or pool= (one row per example), not both"
            )
        if pool is not None and not isinstance(pool, str):
            raise TypeError(f"pool must be 'mean', 'last' or a named position/mask, got {pool!r}")
        if isinstance(positions, Tensor) or (
            positions is not None
            and not isinstance(positions, str | int)
            and not (isinstance(positions, list | tuple) and positions)
        ):
            raise TypeError(
                "positions in capture_dataset is None (every token), an int or a list of ints "
                "(counted in each example's own tokens), or a named position / mask (or a "
                f"list of named positions); got {type(positions).__name__}. Tensors are tied "
                "to one batch's padding: use interp.capture for those"
            )
        self.positions = positions
        self.pool = pool
        self.exclude_special = exclude_special
        self.specials = specials

    def describe(self) -> str:
        return json.dumps(
            {"positions": repr(self.positions), "pool": self.pool, "ex": self.exclude_special}
        )

    def resolve(self, batch: Batch) -> tuple[str, Any, Tensor, Tensor]:
        """(kind, index, example, position): kind is ``tokens`` (index: a [B, T] mask),
        ``rows`` (index: [B] or [B, k] positions) or ``mean`` (index: a [B, T] mask)."""
        att = batch.attention_mask.bool()
        B, T = att.shape
        real = att & ~torch.isin(batch.input_ids, self.specials) if self.exclude_special else att
        lengths = att.sum(1)
        arange = torch.arange(B)

        def named_mask(name: str) -> Tensor | None:
            return batch.masks[name].bool() if name in batch.masks else None

        def check_name(name: str) -> None:
            if name not in batch.masks and name not in batch.positions:
                known = sorted([*batch.masks, *batch.positions])
                raise KeyError(
                    f"unknown named position {name!r}; these inputs have {known or 'none'} "
                    "(named positions come from conversations through interp.chat.encode)"
                )

        def need_rows(mask: Tensor, what: str) -> None:
            empty = (~mask.any(1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(
                    f"{what}: rows {empty[:8]} of this batch have no tokens to use "
                    "(only special tokens or an empty mask); drop them or pass "
                    "exclude_special=False"
                )

        pool, positions = self.pool, self.positions
        if pool is not None:
            example = arange
            position = torch.full((B,), -1, dtype=torch.long)
            if pool == "mean":
                need_rows(real, "pool='mean'")
                return "mean", real, example, position
            if pool == "last":
                need_rows(real, "pool='last'")
                cols = torch.arange(T).expand(B, T)
                last = torch.where(real, cols, -1).max(1).values
                return "rows", last, example, position
            check_name(pool)
            m = named_mask(pool)
            if m is not None:
                m = m & real
                need_rows(m, f"pool={pool!r}")
                return "mean", m, example, position
            return "rows", batch.positions[pool], example, position
        if positions is None or (isinstance(positions, str) and named_mask(positions) is not None):
            m = real if positions is None else named_mask(positions) & real
            rows, cols = m.nonzero(as_tuple=True)
            return "tokens", m, rows, cols
        position = torch.full((B,), -1, dtype=torch.long)
        if isinstance(positions, str):
            check_name(positions)
            return "rows", batch.positions[positions], arange, position
        if isinstance(positions, int):
            idx = torch.full((B,), positions) if positions >= 0 else lengths + positions
        elif all(isinstance(p, str) for p in positions):
            for p in positions:
                check_name(p)
                if p not in batch.positions:
                    raise ValueError(
                        f"a list of named positions takes one-token positions; {p!r} is a mask"
                    )
            idx = torch.stack([batch.positions[p] for p in positions], dim=1)
        elif all(isinstance(p, int) and not isinstance(p, bool) for p in positions):
            raw = torch.tensor(positions, dtype=torch.long)
            idx = torch.where(raw >= 0, raw, lengths[:, None] + raw)
        else:
            raise TypeError(f"positions must be ints or names, got {positions!r}")
        bad = (idx < 0) | (idx >= lengths.view(-1, *([1] * (idx.ndim - 1))))
        if bad.any():
            row = int(bad.nonzero()[0][0])
            raise ValueError(
                f"positions={positions!r} is out of range for example row {row} of this batch "
                f"({int(lengths[row])} tokens)"
            )
        return "rows", idx, arange, position


def _select(act: Tensor, name: str, kind: str, index: Tensor) -> Tensor:
    """The rows of one hook's activation (pooling in float32)."""
    axis = position_axis(name)
    x = act if axis == 1 else act.movedim(axis, 1)
    index = index.to(x.device)
    if kind == "tokens":
        return x[index]
    if kind == "rows":
        rows = torch.arange(x.shape[0], device=x.device)
        return x[rows if index.ndim == 1 else rows[:, None], index]
    w = index.to(torch.float32).view(*index.shape, *([1] * (x.ndim - 2)))
    return (x.float() * w).sum(1) / w.sum(1)


def _capture_rows(
    model: Any,
    rows: Sequence[_Row],
    names: Sequence[str],
    plan: _Plan,
    dtype: torch.dtype | None,
    stop: int | None,
    ids: Tensor,
) -> DatasetActivations:
    """One forward pass over ``rows``; ``ids[i]`` is the input index of row ``i``."""
    batch = _collate(rows, _pad_id(model), "right")
    kind, index, example, position = plan.resolve(batch)
    store: dict[str, Tensor] = {}

    def keep(tensor: Tensor, hook: Any) -> None:
        value = _select(tensor.detach(), hook.name, kind, index)
        store[hook.name] = value.to(device="cpu", dtype=dtype or tensor.dtype)

    kw: dict[str, Any] = {}
    if stop is not None:
        kw["stop_at_layer"] = stop
    elif _accepts(model, "logits_to_keep"):
        kw["logits_to_keep"] = 1
    dev = batch.to(model.device)
    with torch.no_grad(), running(dev), model.hooks(fwd=[(n, keep) for n in names]):
        model.forward(dev.input_ids, dev.attention_mask, **kw)
    missing = [n for n in names if n not in store]
    if missing:
        raise RuntimeError(f"hooks {missing[:4]} never fired during the forward pass")
    return DatasetActivations(
        acts={n: store[n].contiguous() for n in names},
        example=ids[example],
        position=position,
    )


def _by_example(acts: DatasetActivations) -> DatasetActivations:
    """Rows in input order (stable: a token's rows keep their position order)."""
    order = torch.sort(acts.example, stable=True).indices
    return DatasetActivations(
        acts={n: a[order] for n, a in acts.acts.items()},
        example=acts.example[order],
        position=acts.position[order],
    )


def _capture_window(
    model: Any,
    rows: Sequence[_Row],
    names: Sequence[str],
    plan: _Plan,
    dtype: torch.dtype | None,
    stop: int | None,
    offset: int,
    batch_size: int,
    sort: bool,
    tick: Callable[[int], Any] = lambda n: None,
) -> DatasetActivations:
    """``rows`` (inputs ``offset`` …) in forward passes of ``batch_size``, longest first when
    ``sort`` (less padding), returned in input order; ``tick(n)`` after each pass."""
    order = list(range(len(rows)))
    if sort:
        order.sort(key=lambda i: -len(rows[i].ids))
    parts = []
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        ids = torch.tensor(chunk, dtype=torch.long) + offset
        parts.append(_capture_rows(model, [rows[i] for i in chunk], names, plan, dtype, stop, ids))
        tick(len(chunk))
    out = _concat(parts, names)
    return _by_example(out) if sort else out


def capture_dataset(
    model: Any,
    data: Any,
    names: str | Iterable[str],
    *,
    positions: Any = None,
    pool: str | None = None,
    exclude_special: bool = True,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
    to: str | Path | None = None,
    chat_format: Any = "template",
    chat_template_kwargs: Mapping[str, Any] | None = None,
    length_window: int = 16,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> DatasetActivations | ShardedActivations:
    """Activations of a whole dataset at ``names``: the one way to turn data into rows.

    Args:
        model: a ``HookedModel``.
        data: texts, conversations (teacher-forced: a conversation ending with an
            assistant message has an ``assistant`` mask), a ``Batch`` (any padding),
            ``Generations``, or an iterable of these (read lazily; each ``Batch`` of an
            iterable of Batches is one forward pass).
        names: hook names or glob patterns.
        positions: which tokens become rows when ``pool`` is None: ``None`` every token;
            a named mask (``"assistant"``) its tokens; a named position
            (``"pre_assistant"``), an int or a list of them one row per example (ints count
            in the example's own tokens: ``-1`` is its last token, whatever the padding).
        pool: one row per example instead: ``"mean"`` over its tokens, ``"last"`` its last
            token, a named mask (mean over it) or a named position.
        exclude_special: leave the tokenizer's special tokens (BOS, EOS, pad, chat
            markers; ``special_ids``) out of token rows, means and ``"last"`` (on
            Llama-family models BOS's huge norm would dominate a mean). Named positions are
            taken as they are.
        batch_size: examples per forward pass.
        dtype: storage dtype (default: the activation's). Means are computed in float32.
        to: ``None`` keeps everything in memory; a folder writes one safetensors shard per
            batch (atomically) and ``meta.json`` when complete. A rerun with the same inputs
            and settings reuses the shards already written, so an interrupted run resumes;
            shards of different inputs or settings raise ``ValueError``.
        chat_format: how conversations are rendered (``interp.chat.encode``).
        chat_template_kwargs: keyword arguments for the chat template (e.g.
            ``{"enable_thinking": False}``).
        length_window: run the inputs longest first within windows of this many batches
            (inputs of similar length share a forward pass, so less of it is padding); rows
            still come back in input order. ``1`` runs them in input order. With ``to=``,
            a window's shards are written when the window completes, so an interruption
            loses at most one window. Batches of an iterable of ``Batch`` objects are run
            as given.
        rank, world_size: data parallelism. Windows of inputs are dealt out round-robin
            (window ``w`` to rank ``w % world_size``); every rank reads the whole input in
            the same order, so ``example`` indices are global. Default: the
            ``torch.distributed`` process group when one is initialised (``torchrun``),
            else one process; ``rank=0, world_size=1`` inside a group captures locally.
            Ranks without a window idle: keep ``length_window`` × ``batch_size`` × ranks
            well below the number of inputs. With ``to=``, the ranks write their shards into the one
            folder and, once all are there, ``meta.json`` lists them all: every rank gets
            the whole dataset back (with a process group, after a barrier; with explicit
            ``rank``/``world_size`` and no group, the rank that finds every shard present
            writes it, and the others get their own shards, ``meta["complete"]`` False).
            In memory (``to=None``) each rank gets its own rows.
        progress: show a tqdm bar.

    The forward pass stops after the last block asked for when the model supports
    ``stop_at_layer``; otherwise only the last position's logits are computed where the
    backend supports ``logits_to_keep``.

    Returns:
        ``DatasetActivations`` (``acts[name]``: ``[rows, d]``, with ``example`` and
        ``position`` per row), or ``ShardedActivations`` for a folder.
    """
    _check_batch_size(batch_size)
    if isinstance(length_window, bool) or not isinstance(length_window, int) or length_window < 1:
        raise ValueError(f"length_window must be a positive int, got {length_window!r}")
    rank, world_size, group = _world(rank, world_size)
    chat = _ChatOptions.of(chat_format, chat_template_kwargs)
    resolved = model.resolve(names)
    if not resolved:
        raise ValueError(f"names {names!r} match no hook point")
    tok = getattr(model, "tokenizer", None)
    specials = torch.tensor(special_ids(tok) if tok is not None else [], dtype=torch.long)
    plan = _Plan(positions, pool, exclude_special, specials)
    stop = _stop_layer(model, resolved)
    settings: dict[str, Any] = {
        "names": resolved,
        "plan": plan.describe(),
        "dtype": str(dtype),
        "bs": batch_size,
    }
    if length_window > 1:
        settings["window"] = length_window
    config = json.dumps(settings)
    out = None if to is None else Path(to)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        cfg_path = out / _CONFIG
        if cfg_path.exists() and cfg_path.read_text() != config:
            raise ValueError(
                f"{out} holds shards of a different capture_dataset call "
                f"({cfg_path.read_text()}); use a new folder"
            )
        if not cfg_path.exists():
            from interp.cache import atomic_write

            atomic_write(cfg_path, lambda tmp: Path(tmp).write_text(config))

    total = len(data) if isinstance(data, Sequence) and not isinstance(data, str) else None
    if isinstance(data, Batch):
        total = len(data)
    bar = _progress(total, "capture_dataset", progress)
    parts: list[DatasetActivations] = []
    shards: list[str] = []
    mine: list[str] = []
    offset = 0
    try:
        batches = _iter_batches(model, data, batch_size, chat)
        for w, (window, sortable) in enumerate(_windows(batches, length_window)):
            sort = sortable and length_window > 1
            size = sum(len(chunk) for chunk in window)
            if w % world_size != rank:  # another rank's window: named, counted, not run
                first = len(shards)
                shards.extend([_shard_name(first + i) for i in range(len(window))])
                bar.update(size)
            elif out is None:
                rows = [r for chunk in window for r in chunk]
                parts.append(
                    _capture_window(
                        model,
                        rows,
                        resolved,
                        plan,
                        dtype,
                        stop,
                        offset,
                        batch_size,
                        sort,
                        bar.update,
                    )
                )
            else:
                done = _shards(
                    model,
                    out,
                    len(shards),
                    window,
                    resolved,
                    plan,
                    dtype,
                    stop,
                    offset,
                    config,
                    batch_size,
                    sort,
                    bar.update,
                )
                shards.extend(done)
                mine.extend(done)
            offset += size
    finally:
        bar.close()
    if offset == 0:
        raise ValueError("empty input: no texts, conversations or rows to capture")
    if out is None:
        if not parts:
            raise ValueError(
                f"rank {rank} of {world_size} got no inputs (fewer windows of "
                f"{length_window} batches than ranks): lower length_window, or pass to= "
                "(a rank without windows then writes nothing)"
            )
        return _concat(parts, resolved)
    if group:
        import torch.distributed as dist

        dist.barrier()
        if rank == 0:
            _write_meta(out, resolved, shards, offset)
        dist.barrier()
        return ShardedActivations(out, json.loads((out / _META).read_text()))
    if all((out / name).exists() for name in shards):
        return ShardedActivations(out, _write_meta(out, resolved, shards, offset))
    meta = _meta(out, resolved, mine, offset)
    meta["complete"] = False
    return ShardedActivations(out, meta)


def _world(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    """``(rank, world_size, process group?)`` of a capture."""
    import torch.distributed as dist

    group = dist.is_available() and dist.is_initialized()
    if rank is None and world_size is None:
        return (dist.get_rank(), dist.get_world_size(), True) if group else (0, 1, False)
    if rank is None or world_size is None:
        raise ValueError("pass both rank and world_size, or neither (torch.distributed decides)")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    # Explicit values win (e.g. a rank's own local capture inside a torchrun job); the
    # group's barrier is used only when they are the group's.
    group = group and (rank, world_size) == (dist.get_rank(), dist.get_world_size())
    return rank, world_size, group and world_size > 1


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def _meta(out: Path, names: Sequence[str], shards: Sequence[str], examples: int) -> dict:
    from safetensors import safe_open

    rows = 0
    for name in shards:
        with safe_open(str(out / name), framework="pt") as f:
            rows += int(f.get_slice("__example__").get_shape()[0])
    return {"names": list(names), "shards": list(shards), "rows": rows, "examples": examples}


def _write_meta(out: Path, names: Sequence[str], shards: Sequence[str], examples: int) -> dict:
    """``meta.json`` of a complete folder (every shard present: raises otherwise)."""
    from interp.cache import atomic_write

    missing = [s for s in shards if not (out / s).exists()]
    if missing:
        raise RuntimeError(f"{out}: shards {missing[:4]} are missing after every rank finished")
    meta = _meta(out, names, shards, examples)
    atomic_write(out / _META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return meta


def _shards(
    model: Any,
    out: Path,
    first: int,
    window: Sequence[Sequence[_Row]],
    names: Sequence[str],
    plan: _Plan,
    dtype: torch.dtype | None,
    stop: int | None,
    offset: int,
    config: str,
    batch_size: int,
    sort: bool,
    tick: Callable[[int], Any],
) -> list[str]:
    """Write one shard per input chunk of ``window`` (numbered from ``first``), or reuse the
    shards a previous run wrote for the same inputs and settings."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from interp.cache import atomic_write

    names_out, todo = [], []
    for i, rows in enumerate(window):
        name = _shard_name(first + i)
        path, fp = out / name, _fingerprint(rows, config)
        names_out.append(name)
        if path.exists():
            with safe_open(str(path), framework="pt") as f:
                found = (f.metadata() or {}).get("fingerprint")
            if found != fp:
                raise ValueError(
                    f"{path} was written for other inputs or settings (fingerprint {found} != "
                    f"{fp}); use a new folder"
                )
        else:
            todo.append((i, path, fp))
    if not todo:
        tick(sum(len(chunk) for chunk in window))
        return names_out
    rows = [r for chunk in window for r in chunk]
    acts = _capture_window(model, rows, names, plan, dtype, stop, offset, batch_size, sort, tick)
    bounds = [offset]
    for chunk in window:
        bounds.append(bounds[-1] + len(chunk))
    edges = torch.searchsorted(acts.example, torch.tensor(bounds), right=False).tolist()
    for i, path, fp in todo:
        lo, hi = edges[i], edges[i + 1]
        tensors = {n: a[lo:hi].contiguous() for n, a in acts.acts.items()}
        tensors["__example__"] = acts.example[lo:hi].contiguous()
        tensors["__position__"] = acts.position[lo:hi].contiguous()
        atomic_write(
            path, lambda tmp, t=tensors, f=fp: save_file(t, tmp, metadata={"fingerprint": f})
        )
    return names_out
