"""Evaluate an SAE on a model: reconstruction, CE loss recovered, dead/dense latents, top examples.

``evaluate_on_model(model, sae, texts, hook_name)`` runs the texts through the model in
padded batches, three forward passes each:

1. **clean**: the activation at ``hook_name`` is read; its *counted* tokens (real tokens,
   and not special tokens such as BOS, EOS, pad and chat markers unless
   ``exclude_special=False``: the rows ``ActivationStore``/``capture_dataset`` train on;
   optionally not each text's first ``exclude_first`` tokens)
   are encoded and decoded by the SAE, giving L0, FVU, MSE, firing rates and the top
   activations;
2. **spliced**: the counted tokens' activations are replaced by their reconstructions
   (every other position keeps its clean activation);
3. **zero-ablated**: the counted tokens' activations are replaced by zeros.

The splice reuses the clean pass's reconstructions: positions up to the hook are computed
identically in all three passes, so encoding once is exact.

Cross-entropy is next-token loss averaged over **real target tokens only**: a target
counts when it and the token predicting it are real (attention mask 1) and, with
``exclude_special``, the target is not a special token. Padding never enters a mean, so a
heavily padded batch gives the same numbers as running the texts one by one (the
hand-written ``cross_entropy(logits[:, :-1], ids[:, 1:])`` over a padded batch does not).
``ce_loss_recovered = (L_zero − L_spliced) / (L_zero − L_clean)``.

FVU is Σ‖x − x̂‖² / Σ‖x − x̄‖² with x̄ the mean over all counted tokens; MSE is
Σ‖x − x̂‖² per token (summed over d_in, as ``evaluate``); L0 is the mean number of
latents > 0 per token. A latent's firing rate is the fraction of counted tokens where it
is > 0; it is *dead* when its rate ≤ ``dead_threshold`` (default 0: never fired) and
*dense* when its rate > ``dense_threshold`` (default 0.1).

Top-activating examples: for every latent (or those in ``example_latents``), the
``top_n`` counted tokens with the largest activation > 0, each as a ``TopExample``
(text, token, activation, ``context`` tokens either side), kept by a streaming top-k so
memory is ``top_n × d_sae`` whatever the data size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm import tqdm

from interp.sae.archs import SAE
from interp.sae.model import TopKSAE

__all__ = ["ModelEvalReport", "TopExample", "evaluate_on_model"]


class TopExample(NamedTuple):
    """One top activation of a latent: the token at ``position`` (in the text's own
    tokens, padding excluded) of ``texts[text_index]``, with decoded context."""

    activation: float
    text_index: int
    position: int
    token: str
    left: str
    right: str
    text: str

    @property
    def context(self) -> str:
        """The context window with the token marked: ``left«token»right``."""
        return f"{self.left}«{self.token}»{self.right}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without the full text (``text_index`` refers to it)."""
        return {
            "activation": self.activation,
            "text_index": self.text_index,
            "position": self.position,
            "token": self.token,
            "context": self.context,
        }


@dataclass(frozen=True)
class ModelEvalReport:
    """Result of ``evaluate_on_model`` (see the module docstring for definitions)."""

    n_texts: int
    n_tokens: int  # counted tokens: SAE rows
    n_loss_tokens: int  # target tokens in the cross-entropy means
    fvu: float
    mse: float
    l0: float
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_loss_recovered: float
    dead_threshold: float
    dense_threshold: float
    firing_rate: Tensor = field(repr=False)  # [d_sae]
    dead_latents: list[int] = field(repr=False)
    dense_latents: list[int] = field(repr=False)
    top_examples: dict[int, list[TopExample]] = field(repr=False)

    @property
    def dead_fraction(self) -> float:
        return len(self.dead_latents) / self.firing_rate.numel()

    @property
    def dense_fraction(self) -> float:
        return len(self.dense_latents) / self.firing_rate.numel()

    def summary(self) -> dict[str, Any]:
        """The scalar metrics as a JSON-ready dict."""
        return {
            "n_texts": self.n_texts,
            "n_tokens": self.n_tokens,
            "n_loss_tokens": self.n_loss_tokens,
            "fvu": self.fvu,
            "mse": self.mse,
            "l0": self.l0,
            "ce_clean": self.ce_clean,
            "ce_spliced": self.ce_spliced,
            "ce_zero": self.ce_zero,
            "ce_loss_recovered": self.ce_loss_recovered,
            "dead_threshold": self.dead_threshold,
            "dense_threshold": self.dense_threshold,
            "dead_fraction": self.dead_fraction,
            "dense_fraction": self.dense_fraction,
            "n_dead": len(self.dead_latents),
            "n_dense": len(self.dense_latents),
        }


def _texts(data: Any, text_column: str) -> list[str]:
    if isinstance(data, str):
        raise TypeError("give a list of texts (or a datasets.Dataset), not one string")
    if hasattr(data, "column_names"):  # a datasets.Dataset
        if text_column not in data.column_names:
            raise KeyError(f"dataset has no column {text_column!r}; columns: {data.column_names}")
        data = data[text_column]
    texts = list(data)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    if not texts:
        raise ValueError("evaluate_on_model needs at least one text")
    return texts


class _Moments:
    """Streaming Σ‖x − x̂‖², Σ‖x − x̄‖² (Chan et al.'s parallel update), nnz."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2 = 0.0
        self.sse = 0.0
        self.nnz = 0.0

    def add(self, x: Tensor, x_hat: Tensor, nnz: float) -> None:
        xd = x.double()
        self.sse += float((xd - x_hat.double()).pow(2).sum())
        self.nnz += nnz
        b_n, b_mean = x.shape[0], xd.mean(0)
        b_m2 = float((xd - b_mean).pow(2).sum())
        if self.mean is None:
            self.mean, self.m2 = b_mean, b_m2
        else:
            delta = float((b_mean - self.mean).pow(2).sum())
            self.m2 += b_m2 + delta * self.n * b_n / (self.n + b_n)
            self.mean = self.mean + (b_mean - self.mean) * (b_n / (self.n + b_n))
        self.n += b_n


def _check_threshold(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a firing rate in [0, 1], got {value!r}")


@torch.no_grad()
def evaluate_on_model(
    model: Any,
    sae: TopKSAE | SAE,
    data: Any,
    hook_name: str,
    *,
    batch_size: int = 8,
    max_length: int | None = 512,
    exclude_special: bool = True,
    exclude_first: int = 0,
    dead_threshold: float = 0.0,
    dense_threshold: float = 0.1,
    top_n: int = 10,
    context: int = 8,
    example_latents: Iterable[int] | None = None,
    text_column: str = "text",
    progress: bool = False,
) -> ModelEvalReport:
    """L0, FVU, MSE, CE loss recovered, dead/dense latents and top examples of ``sae``
    spliced at ``hook_name`` of ``model`` over ``data`` (a list of texts or a
    ``datasets.Dataset`` with ``text_column``).

    Args:
        batch_size: texts per forward pass (padded with the tokenizer's padding side).
        max_length: truncate texts to this many tokens (None: no truncation).
        exclude_special: leave special tokens out of the SAE rows, the splice and the
            loss targets (as ``ActivationStore`` leaves them out of training rows).
        exclude_first: leave each text's first ``n`` real tokens out of the SAE rows and
            the splice, and the targets they alone predict (own positions ≤ n) out of the
            losses. On models whose tokenizer adds no BOS the first token is the attention
            sink, with a norm ~100× the others' (SmolLM2: ~24,000 vs ~176 at layer 15),
            and it dominates FVU; ``1`` leaves it out.
        dead_threshold / dense_threshold: firing-rate thresholds (fractions of tokens).
        top_n: top-activating examples kept per latent (0: none).
        context: tokens of context either side of an example's token.
        example_latents: latents to build examples for (default: all).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if top_n < 0 or context < 0:
        raise ValueError(f"top_n and context must be ≥ 0, got {top_n}, {context}")
    if isinstance(exclude_first, bool) or not isinstance(exclude_first, int) or exclude_first < 0:
        raise ValueError(f"exclude_first must be an int ≥ 0, got {exclude_first!r}")
    _check_threshold("dead_threshold", dead_threshold)
    _check_threshold("dense_threshold", dense_threshold)
    if "*" in hook_name or "?" in hook_name:
        raise ValueError(f"give one hook name, not a pattern: {hook_name!r}")
    if not isinstance(sae, TopKSAE | SAE):
        raise TypeError(f"sae must be a TopKSAE or an interp.sae.SAE, got {type(sae).__name__}")
    tok = model.tokenizer
    if tok is None:
        raise ValueError("evaluate_on_model needs a model with a tokenizer")
    from interp.positions import Batch
    from interp.runs import special_ids

    texts = _texts(data, text_column)
    specials = torch.tensor(special_ids(tok), dtype=torch.long)
    d_sae = sae.d_sae
    sae_device = sae.W_dec.device
    wanted = None if example_latents is None else sorted({int(i) for i in example_latents})
    if wanted is not None and any(not 0 <= i < d_sae for i in wanted):
        raise ValueError(f"example_latents must be in [0, {d_sae}), got {wanted}")

    moments = _Moments()
    fired = torch.zeros(d_sae, dtype=torch.float64)
    loss_sums = torch.zeros(3, dtype=torch.float64)  # clean, spliced, zero
    n_loss = 0
    top_vals = torch.full((top_n, d_sae), -math.inf)
    top_rows = torch.zeros((top_n, d_sae), dtype=torch.long)
    row_text: list[Tensor] = []
    row_pos: list[Tensor] = []
    text_ids: list[list[int]] = []
    n_rows = 0

    state: dict[str, Any] = {}

    def read(act: Tensor, hook: Any = None) -> None:
        del hook
        state["act"] = act.detach()

    def replace(act: Tensor, hook: Any = None) -> Tensor:
        del hook
        out = act.clone()
        out[state["mask"]] = state["fill"].to(device=act.device, dtype=act.dtype)
        return out

    def token_losses(logits: Tensor, ids: Tensor, loss_mask: Tensor) -> Tensor:
        lp = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), ids[:, 1:].to(logits.device), reduction="none"
        )
        return lp[loss_mask.to(lp.device)].double().sum().cpu()

    kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True}
    if max_length is not None:
        kwargs.update(truncation=True, max_length=max_length)
    bar = tqdm(total=len(texts), disable=not progress, desc="evaluate_on_model", unit="text")
    try:
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            enc = tok(chunk, **kwargs)
            ids, attn = enc["input_ids"], enc["attention_mask"].bool()
            batch = Batch(ids, enc["attention_mask"]).to(model.device)
            special = torch.isin(ids, specials) if exclude_special else torch.zeros_like(attn)
            own_pos = attn.long().cumsum(1) - 1
            counted = attn & ~special & (own_pos >= exclude_first)
            loss_mask = attn[:, 1:] & attn[:, :-1] & ~special[:, 1:]
            loss_mask &= own_pos[:, 1:] > exclude_first
            for r in range(len(chunk)):
                text_ids.append(ids[r][attn[r]].tolist())

            clean_logits = model.run_with_hooks(batch, fwd_hooks=[(hook_name, read)])
            act = state.pop("act")
            if act.dim() != 3 or tuple(act.shape[:2]) != tuple(ids.shape):
                raise ValueError(
                    f"{hook_name} gives activations of shape {tuple(act.shape)}; "
                    f"evaluate_on_model needs [batch, pos, d_in] = [{ids.shape[0]}, "
                    f"{ids.shape[1]}, {sae.d_in}]"
                )
            if act.shape[-1] != sae.d_in:
                raise ValueError(
                    f"{hook_name} has width {act.shape[-1]} but the SAE has d_in={sae.d_in}"
                )
            mask = counted.to(act.device)
            x = act[mask].to(device=sae_device, dtype=torch.float32)
            if isinstance(sae, TopKSAE):
                latents = sae.encode(x)
                x_hat = sae.decode(latents)
                z = latents.to_dense(d_sae)
            else:
                z = sae.encode_dense(x).float()
                x_hat = sae.decode(z).float()
            if x.shape[0]:
                active = z > 0
                moments.add(x, x_hat, float(active.sum()))
                fired += active.sum(0).double().cpu()
                if top_n:
                    vals = torch.cat([top_vals, z.cpu()])
                    top_vals, pick = vals.topk(min(top_n, vals.shape[0]), dim=0)
                    old_rows = top_rows.gather(0, pick.clamp(max=top_n - 1))
                    top_rows = torch.where(pick >= top_n, pick - top_n + n_rows, old_rows)
                    row_text.append(
                        (torch.arange(len(chunk)) + start).unsqueeze(1).expand_as(ids)[counted]
                    )
                    row_pos.append(own_pos[counted])
                n_rows += x.shape[0]

            state["mask"] = mask
            state["fill"] = x_hat
            spliced_logits = model.run_with_hooks(batch, fwd_hooks=[(hook_name, replace)])
            state["fill"] = torch.zeros_like(x_hat)
            zero_logits = model.run_with_hooks(batch, fwd_hooks=[(hook_name, replace)])
            state.clear()
            for i, logits in enumerate((clean_logits, spliced_logits, zero_logits)):
                loss_sums[i] += token_losses(logits, ids, loss_mask)
            n_loss += int(loss_mask.sum())
            bar.update(len(chunk))
    finally:
        bar.close()

    if moments.n == 0:
        raise ValueError(
            "no counted tokens: every token was padding or special "
            f"(exclude_special={exclude_special})"
        )
    if n_loss == 0:
        raise ValueError("no loss targets: every text is shorter than two real tokens")
    ce_clean, ce_spliced, ce_zero = (float(v) / n_loss for v in loss_sums)
    recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean) if ce_zero != ce_clean else math.nan
    rate = (fired / moments.n).float()
    dead = (rate <= dead_threshold).nonzero().squeeze(1).tolist()
    dense = (rate > dense_threshold).nonzero().squeeze(1).tolist()

    examples: dict[int, list[TopExample]] = {}
    if top_n and n_rows:
        all_text, all_pos = torch.cat(row_text), torch.cat(row_pos)
        for latent in wanted if wanted is not None else range(d_sae):
            records = []
            for v, row in zip(
                top_vals[:, latent].tolist(), top_rows[:, latent].tolist(), strict=True
            ):
                if not v > 0:
                    break
                t, p = int(all_text[row]), int(all_pos[row])
                toks = text_ids[t]
                records.append(
                    TopExample(
                        activation=float(v),
                        text_index=t,
                        position=p,
                        token=tok.decode([toks[p]]),
                        left=tok.decode(toks[max(0, p - context) : p]),
                        right=tok.decode(toks[p + 1 : p + 1 + context]),
                        text=texts[t],
                    )
                )
            examples[latent] = records

    return ModelEvalReport(
        n_texts=len(texts),
        n_tokens=moments.n,
        n_loss_tokens=n_loss,
        fvu=moments.sse / moments.m2 if moments.m2 > 0 else math.inf,
        mse=moments.sse / moments.n,
        l0=moments.nnz / moments.n,
        ce_clean=ce_clean,
        ce_spliced=ce_spliced,
        ce_zero=ce_zero,
        ce_loss_recovered=recovered,
        dead_threshold=float(dead_threshold),
        dense_threshold=float(dense_threshold),
        firing_rate=rate,
        dead_latents=dead,
        dense_latents=dense,
        top_examples=examples,
    )


def top_examples_json(
    report: ModelEvalReport, latents: Sequence[int] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """``{latent: [example dict, …]}`` for JSON (``latents`` defaults to all kept)."""
    keys = report.top_examples.keys() if latents is None else latents
    return {str(k): [e.to_dict() for e in report.top_examples.get(k, [])] for k in keys}
