"""``generate``: completions of texts or conversations in batches, greedy or sampled (seeded
per prompt and sample), with stop strings and hooks on every forward pass or on the generated
tokens only, on Hugging Face models (``transformers``' ``generate``) and TransformerLens models
(interp's own decoding loop)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from interp.positions import Batch, position_axis
from interp.runs._rows import (
    Generations,
    _ChatOptions,
    _check_batch_size,
    _collate,
    _pad_id,
    _progress,
    _Row,
    _rows,
    _tokenizer,
)


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
