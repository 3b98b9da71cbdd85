"""Study 002: does inoculation prompting rotate training gradients away from a trait direction?

    python examples/inoculation_gradients.py [--quick] [--model M] [--device cpu] [--seed 0]
                                             [--out runs/inoculation_gradients] [--no-train]

Trait: ALL-CAPS (the share of letters that are uppercase, ``caps_fraction`` below).
Training data: short arithmetic word problems whose answers are written in capitals.

1. Smoke: the serialized chat, the token indices of ``user_end`` and
   ``pre_assistant``, activation shapes and one projection.
2. Trait direction ``v(l)``: mean residual stream (``hook_resid_post``) at
   ``pre_assistant`` under "write in capitals" system prompts minus under
   "write normally" prompts, on half of the direction prompts. Checked on the
   other half: held-out Cohen's d / AUROC with bootstrap intervals, and the
   correlation between the projection under the neutral prompt and the caps
   fraction of the model's greedy reply.
3. Gradient alignment on a calibration batch of ALL-CAPS answers (teacher
   forcing, loss = mean cross-entropy over the assistant tokens): per example
   and layer ``cos(∂L/∂h_l, v(l))`` at ``pre_assistant`` (and ``user_end`` /
   ``assistant_1`` as robustness checks) under the Neutral, Inoculation and a
   loss-matched Control system prompt (the control-pool prompt whose loss is
   closest to the inoculation prompt's), against N ≥ 100 random directions.
   Sign convention (``interp.alignment``): descent moves ``h`` along ``−g``,
   so ``cos < 0`` means a training step pushes *towards* ALL-CAPS.
4. Optional end-to-end check (``--train``, on by default): small LoRA
   fine-tunes on the ALL-CAPS data under each system prompt; drift = change
   in the caps fraction of replies under the *neutral* prompt, and the shift
   of the mean projection onto ``v(l)``; scatter of alignment vs drift.
5. ``report.json`` (every number, prompts, positions, layers, seeds, model,
   timings, limitations) and PNG plots in ``--out``.

``--quick`` (4.5 min on an idle 2-core CPU with the embedded SmolLM2-135M) uses 8
evenly spaced layers, small batches, short generations, 1 training seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import argparse
import dataclasses
import json
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import _common as C
import torch
import torch.nn.functional as F
from torch import Tensor

import interp
from interp import chat
from interp.alignment import (
    Alignment,
    compare_conditions,
    gradient_alignment,
    random_direction_null,
    select_loss_matched_prompt,
)
from interp.directions import (
    Direction,
    mean_difference,
    project,
    random_directions,
    separation,
)
from interp.positions import Batch
from interp.stats import Interval, bootstrap_ci, paired_bootstrap_ci, spearman

NAME = "inoculation_gradients"
DATA = Path(__file__).resolve().parent / "data" / "inoculation"
HOOK = "blocks.{layer}.hook_resid_post"
CONDITIONS = ("neutral", "inoculation", "control")
HEADLINE_POSITION = "pre_assistant"
# One backward pass gives all three: they are distinct tokens, in this order, in every row.
GRAD_POSITIONS = ("user_end", "pre_assistant", "assistant_1")
COMPARISONS = {  # name -> (a, b): the change from a to b
    "inoculation_vs_neutral": ("neutral", "inoculation"),
    "inoculation_vs_control": ("control", "inoculation"),
    "control_vs_neutral": ("neutral", "control"),
}
MIN_BOOTSTRAP_N = 8
COLORS = {"neutral": "tab:gray", "inoculation": "tab:blue", "control": "tab:orange"}


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of every step; ``QUICK`` and ``FULL`` are the presets, flags override fields."""

    n_layers: int | None  # evenly spaced layer subset; None = every layer
    per_domain: int  # direction prompts per domain in each of the fit / held-out halves
    gen_tokens: int  # greedy tokens generated for the caps-propensity check
    n_calib: int  # calibration examples for gradient alignment and loss matching
    n_random: int  # random directions for the null band (≥ 100)
    n_boot: int  # bootstrap resamples for every interval
    batch_size: int  # rows per forward pass
    train: bool
    n_seeds: int
    n_train: int  # ALL-CAPS training examples per fine-tune
    epochs: int
    train_batch: int
    lr: float
    lora_r: int
    n_eval: int  # held-out math questions for drift
    n_eval_general: int  # held-out general (direction) prompts for drift
    eval_tokens: int
    align_every: int  # log alignment during training every N optimizer steps (0 = off)
    n_align: int  # calibration examples used for the in-training alignment log


QUICK = Settings(
    n_layers=8,
    per_domain=2,
    gen_tokens=24,
    n_calib=16,
    n_random=200,
    n_boot=500,
    batch_size=16,
    train=True,
    n_seeds=1,
    n_train=48,
    epochs=1,
    train_batch=8,
    lr=3e-3,
    lora_r=8,
    n_eval=16,
    n_eval_general=12,
    eval_tokens=16,
    align_every=0,
    n_align=8,
)
FULL = Settings(
    n_layers=None,
    per_domain=6,
    gen_tokens=32,
    n_calib=64,
    n_random=500,
    n_boot=1000,
    batch_size=16,
    train=True,
    n_seeds=3,
    n_train=128,
    epochs=2,
    train_batch=8,
    lr=1e-3,
    lora_r=8,
    n_eval=48,
    n_eval_general=36,
    eval_tokens=24,
    align_every=8,
    n_align=16,
)

_OVERRIDES = {  # flag -> (Settings field, type, help)
    "--n-layers": ("n_layers", int, "size of the evenly spaced layer subset (0 = all layers)"),
    "--per-domain": ("per_domain", int, "direction prompts per domain per half (max 6)"),
    "--gen-tokens": ("gen_tokens", int, "greedy tokens for the caps-propensity check"),
    "--n-calib": ("n_calib", int, "calibration examples (gradients, loss matching)"),
    "--n-random": ("n_random", int, "random directions for the null band (≥ 100)"),
    "--n-boot": ("n_boot", int, "bootstrap resamples"),
    "--batch-size": ("batch_size", int, "rows per forward pass"),
    "--n-seeds": ("n_seeds", int, "training seeds per condition"),
    "--n-train": ("n_train", int, "training examples per fine-tune"),
    "--epochs": ("epochs", int, "training epochs"),
    "--train-batch": ("train_batch", int, "training batch size"),
    "--lr": ("lr", float, "LoRA learning rate"),
    "--lora-r": ("lora_r", int, "LoRA rank"),
    "--n-eval": ("n_eval", int, "held-out questions for drift"),
    "--n-eval-general": ("n_eval_general", int, "held-out general prompts for drift"),
    "--eval-tokens": ("eval_tokens", int, "greedy tokens per drift generation"),
    "--align-every": ("align_every", int, "log alignment every N training steps (0 = off)"),
    "--n-align": ("n_align", int, "examples for the in-training alignment log"),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = C.parser(NAME, __doc__ or "")
    p.add_argument(
        "--train",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the LoRA end-to-end step (default: on; --quick uses 1 seed, few steps)",
    )
    p.add_argument(
        "--inoculation-index",
        type=int,
        default=0,
        help="which inoculation prompt of system_prompts.json to use (default 0)",
    )
    for flag, (_, typ, text) in _OVERRIDES.items():
        p.add_argument(flag, type=typ, default=None, help=text)
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    for flag, (field, _, _) in _OVERRIDES.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            changes[field] = value
    if args.train is not None:
        changes["train"] = args.train
    if changes.get("n_layers") == 0:
        changes["n_layers"] = None
    s = dataclasses.replace(s, **changes)
    problems = []
    if s.n_random < 100:
        problems.append(f"--n-random must be ≥ 100, got {s.n_random}")
    if not 1 <= s.per_domain <= 6:
        problems.append(f"--per-domain must be in 1..6 (12 prompts per domain), got {s.per_domain}")
    for field in (
        "n_calib",
        "n_boot",
        "batch_size",
        "gen_tokens",
        "n_eval",
        "n_eval_general",
        "eval_tokens",
    ):
        if getattr(s, field) < 1:
            problems.append(f"{field} must be ≥ 1, got {getattr(s, field)}")
    if s.n_calib < 2:
        problems.append("n_calib must be ≥ 2 for intervals")
    if problems:
        raise SystemExit("invalid settings: " + "; ".join(problems))
    return s


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
Conversation = list[dict[str, str]]


def load_data(seed: int, s: Settings) -> dict[str, Any]:
    prompts = json.loads((DATA / "system_prompts.json").read_text(encoding="utf-8"))
    math_rows = C.read_jsonl(DATA / "math_problems.jsonl")
    direction_rows = C.read_jsonl(DATA / "direction_prompts.jsonl")
    rng = random.Random(seed)

    order = list(range(len(math_rows)))
    rng.shuffle(order)
    need = s.n_calib + s.n_eval + (s.n_train if s.train else 0)
    if need > len(order):
        raise SystemExit(f"n_calib + n_train + n_eval = {need} > {len(order)} math problems")
    calib = [math_rows[i] for i in order[: s.n_calib]]
    evals = [math_rows[i] for i in order[s.n_calib : s.n_calib + s.n_eval]]
    train = [math_rows[i] for i in order[s.n_calib + s.n_eval : need]]

    by_domain: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in direction_rows:
        by_domain[row["domain"]].append(row)
    fit, held = [], []
    for domain in sorted(by_domain):
        rows = by_domain[domain][:]
        rng.shuffle(rows)
        fit += rows[: s.per_domain]
        held += rows[s.per_domain : 2 * s.per_domain]
    return {
        "system": prompts,
        "calib": calib,
        "train": train,
        "eval": evals,
        "direction_fit": fit,
        "direction_heldout": held,
    }


def with_system(system: str | Sequence[str], users: Sequence[str]) -> list[Conversation]:
    """One conversation per user message; a list of system prompts is cycled through."""
    systems = [system] if isinstance(system, str) else list(system)
    return [
        [{"role": "system", "content": systems[i % len(systems)]}, {"role": "user", "content": u}]
        for i, u in enumerate(users)
    ]


def teacher_forced(system: str, rows: Sequence[dict[str, Any]]) -> list[Conversation]:
    """Math problems with their ALL-CAPS answers as the assistant turn."""
    return [
        [
            {"role": "system", "content": system},
            {"role": "user", "content": r["question"]},
            {"role": "assistant", "content": r["answer"].upper()},
        ]
        for r in rows
    ]


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------------------------------------
# Model passes
# ---------------------------------------------------------------------------------------------
def names_of(layers: Sequence[int]) -> list[str]:
    return [HOOK.format(layer=layer) for layer in layers]


def encode(model: Any, convs: Sequence[Conversation], padding_side: str = "right") -> Batch:
    # Right padding for forward passes: positions then start at 0 in every row, exactly as
    # for an unpadded sequence. Left padding only for generation.
    return chat.encode(model.tokenizer, convs, padding_side=padding_side, device=model.device)


# ---------------------------------------------------------------------------------------------
# The trait metric
# ---------------------------------------------------------------------------------------------
def caps_fraction(text: str) -> float:
    """Fraction of the letters in ``text`` that are uppercase: the study's ALL-CAPS trait.

    Letters are characters with ``str.isalpha()``; digits, spaces and
    punctuation are ignored. A text with no letters scores 0.0 (it shows no
    trait, and the metric stays a number). Letters without case (e.g. CJK)
    count as letters that are not uppercase.
    """
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return 0.0
    return sum(ch.isupper() for ch in letters) / len(letters)


def caps_fractions(texts: Sequence[str]) -> Tensor:
    """:func:`caps_fraction` of each text, as a float64 tensor ``[n]``."""
    if isinstance(texts, str):
        raise TypeError("caps_fractions takes a list of texts; use caps_fraction for one")
    return torch.tensor([caps_fraction(t) for t in texts], dtype=torch.float64)


def caps_token_ids(tokenizer: Any) -> Tensor:
    """Vocabulary entries that are ALL-CAPS words (≥ 2 letters, every letter uppercase).

    Their probability mass at ``pre_assistant`` is a dense caps propensity that
    needs no generation. Byte-level vocabularies without such tokens fall back
    to single uppercase letters.
    """
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    letters = [[ch for ch in t if ch.isalpha()] for t in texts]
    multi = [i for i, ls in enumerate(letters) if len(ls) >= 2 and all(c.isupper() for c in ls)]
    if not multi:
        multi = [i for i, ls in enumerate(letters) if ls and all(c.isupper() for c in ls)]
    return torch.tensor(multi, dtype=torch.long)


def capture_pre_assistant(
    model: Any, convs: Sequence[Conversation], layers: Sequence[int], caps_ids: Tensor, s: Settings
) -> tuple[Tensor, Tensor]:
    """Residual stream at ``pre_assistant`` ``[n, n_layers, d]`` and the log caps-token mass ``[n]``."""
    names = names_of(layers)
    acts, mass = [], []
    for part in C.progress(chunks(convs, s.batch_size), "capture"):
        batch = encode(model, part)
        logits, cache = interp.capture(
            model, batch, names, positions="pre_assistant", return_logits=True, device="cpu"
        )
        acts.append(torch.stack([cache[n].float() for n in names], dim=1))
        rows = torch.arange(len(batch), device=logits.device)
        last = logits[rows, batch.positions["pre_assistant"]].float().log_softmax(-1).cpu()
        mass.append(last[:, caps_ids].logsumexp(-1))
    return torch.cat(acts), torch.cat(mass)


def generate(
    model: Any, convs: Sequence[Conversation], max_new_tokens: int, s: Settings
) -> list[str]:
    """Greedy replies (new tokens only, special tokens dropped)."""
    texts: list[str] = []
    for part in C.progress(chunks(convs, s.batch_size), "generate"):
        batch = encode(model, part, padding_side="left")
        with torch.no_grad():
            out = model.generate(batch, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, batch.input_ids.shape[1] :]
        texts += model.tokenizer.batch_decode(new, skip_special_tokens=True)
    return texts


def assistant_ce(logits: Tensor, batch: Batch) -> Tensor:
    """Per-example mean next-token cross-entropy over the assistant's content tokens.

    ``logits[:, t]`` predicts token ``t + 1``, so targets are shifted by one.
    """
    target = batch.masks["assistant"][:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), batch.input_ids[:, 1:], reduction="none"
    )
    return ce.masked_fill(~target, 0.0).sum(1) / target.sum(1)


def calibration_losses(model: Any, convs: Sequence[Conversation], s: Settings) -> Tensor:
    losses = []
    for part in chunks(convs, s.batch_size):
        batch = encode(model, part)
        with torch.no_grad():
            logits = model.forward(batch.input_ids, batch.attention_mask)
        losses.append(assistant_ce(logits, batch).cpu())
    return torch.cat(losses)


def calibration_grads(
    model: Any, convs: Sequence[Conversation], layers: Sequence[int], s: Settings, desc: str
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Per-example losses ``[n]``, and per position gradients and activations ``[n, n_layers, d]``."""
    names = names_of(layers)
    losses, grads, acts = [], [], []
    for part in C.progress(chunks(convs, s.batch_size), desc):
        batch = encode(model, part)
        idx = torch.stack([batch.positions[p] for p in GRAD_POSITIONS], dim=1)  # [B, P]
        if not bool((idx[:, 1:] > idx[:, :-1]).all()):
            raise RuntimeError(f"positions {GRAD_POSITIONS} are not strictly increasing: {idx}")
        mask = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        mask.scatter_(1, idx, True)
        out = interp.capture_grads(
            model, batch, assistant_ce, names, positions=mask, return_activations=True
        )
        b, p = idx.shape
        # A boolean mask selects tokens in row-major order: row by row, positions ascending.
        grads.append(torch.stack([out.grads[n].reshape(b, p, -1) for n in names], 2).cpu())
        assert out.activations is not None
        acts.append(torch.stack([out.activations[n].reshape(b, p, -1) for n in names], 2).cpu())
        losses.append(out.loss.cpu())
    g, a = torch.cat(grads), torch.cat(acts)  # [n, P, L, d]
    return (
        torch.cat(losses),
        {pos: g[:, i].float() for i, pos in enumerate(GRAD_POSITIONS)},
        {pos: a[:, i].float() for i, pos in enumerate(GRAD_POSITIONS)},
    )


# ---------------------------------------------------------------------------------------------
# Statistics helpers
# ---------------------------------------------------------------------------------------------
def _pearson(x: Tensor, y: Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = x.norm() * y.norm()
    if x.numel() < 3 or float(denom) == 0.0:
        raise ValueError("correlation needs ≥ 3 points with non-zero variance")
    return float((x * y).sum() / denom)


def correlation(x: Tensor, y: Tensor, s: Settings, seed: int) -> dict[str, Any]:
    """Pearson r with a paired bootstrap interval, and Spearman's rho; ``None`` where undefined.

    Below ``MIN_BOOTSTRAP_N`` points the interval is left undefined: resampling a
    handful of points gives a meaningless interval.
    """
    try:
        if x.numel() < MIN_BOOTSTRAP_N:
            r = Interval(_pearson(x, y), math.nan, math.nan)
        else:
            r = paired_bootstrap_ci(_pearson, x, y, n_boot=s.n_boot, seed=seed)
    except ValueError:
        r = Interval(math.nan, math.nan, math.nan)
    # Tie-aware (average ranks): the caps fraction is 0 for most samples, and ranking
    # those ties arbitrarily would bias rho.
    rho = spearman(x, y) if x.numel() >= 3 else math.nan
    return {"pearson": r.as_dict(), "spearman": rho, "n": int(x.numel())}


def _mean(x: Tensor) -> float:
    return float(x.double().mean())


def mean_ci(x: Tensor, s: Settings, seed: int) -> dict[str, float]:
    return bootstrap_ci(_mean, x, n_boot=s.n_boot, seed=seed).as_dict()


def layer_average_delta(
    a: Alignment, b: Alignment, comparison: Any, s: Settings, seed: int
) -> dict[str, Any]:
    """The change in mean cosine averaged over the layer subset, with its interval and null band."""
    ci = paired_bootstrap_ci(
        lambda x, y: float(y.mean() - x.mean()),
        a.cos.mean(1),
        b.cos.mean(1),
        n_boot=s.n_boot,
        seed=seed,
    )
    null = comparison.null_delta.mean(1)
    low, high = torch.quantile(null, torch.tensor([0.025, 0.975], dtype=null.dtype)).tolist()
    as_big = int((null.abs() >= abs(ci.estimate)).sum())
    return {
        "delta_cos": ci.as_dict(),
        "null_low": low,
        "null_high": high,
        "outside_null": not low <= ci.estimate <= high,
        "p_null": (1 + as_big) / (1 + null.numel()),
        "layers_ci_above_0": sum(d.low > 0 for d in comparison.delta_cos),
        "layers_ci_below_0": sum(d.high < 0 for d in comparison.delta_cos),
        "layers_outside_null": sum(comparison.outside_null),
        "n_layers": len(comparison.layers),
    }


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def step_smoke(
    model: Any, data: dict[str, Any], layers: Sequence[int], seed: int
) -> dict[str, Any]:
    tok = model.tokenizer
    neutral = data["system"]["neutral"][0]
    forced = teacher_forced(neutral, data["calib"][:1])
    batch = encode(model, forced)
    gen_batch = encode(model, [forced[0][:2]])
    ids = batch.input_ids[0].tolist()
    positions = {k: int(v[0]) for k, v in batch.positions.items()}
    tokens = {k: tok.decode([ids[i]]) for k, i in positions.items()}
    consistent = int(gen_batch.positions["pre_assistant"][0]) == positions["pre_assistant"]
    print("serialized chat (teacher forcing):\n" + batch.texts[0])
    for k, i in positions.items():
        print(f"  {k:>14} = token {i:3d} {tokens[k]!r}")
    print(f"  pre_assistant matches the generation prompt's last token: {consistent}")

    names = names_of(layers)
    cache = interp.capture(model, batch, names, positions="pre_assistant")
    shapes = {n: list(cache[n].shape) for n in names}
    stacked = cache.stack("blocks.*.hook_resid_post")
    gen = torch.Generator().manual_seed(seed)
    dummy = Direction.from_vectors(
        random_directions(1, model.cfg.d_model, len(layers), gen)[0], layers=layers
    )
    proj = project(stacked.transpose(0, 1).float().cpu(), dummy)[0]
    print(f"  activations: {len(names)} hooks of {shapes[names[0]]} -> stack {list(stacked.shape)}")
    print(
        f"  projection onto a random unit direction at layer {layers[-1]}: {float(proj[-1]):+.4f}"
    )
    if not consistent:
        raise RuntimeError(
            "pre_assistant differs between teacher forcing and the generation prompt"
        )
    return {
        "text": batch.texts[0],
        "n_tokens": len(ids),
        "positions": positions,
        "tokens_at_positions": tokens,
        "pre_assistant_matches_generation_prompt": consistent,
        "activation_shapes": shapes,
        "stacked_shape": list(stacked.shape),
        "dummy_projection": {"layer": layers[-1], "value": float(proj[-1]), "per_layer": proj},
    }


def step_direction(
    model: Any, data: dict[str, Any], layers: Sequence[int], s: Settings, seed: int, out: Path
) -> tuple[Direction, dict[str, Any], dict[str, Any]]:
    sp = data["system"]
    caps_ids = caps_token_ids(model.tokenizer)
    fit = [r["prompt"] for r in data["direction_fit"]]
    held = [r["prompt"] for r in data["direction_heldout"]]

    C.log(f"direction: {len(fit)} fit + {len(held)} held-out prompts x promote/suppress")
    fit_pro, _ = capture_pre_assistant(model, with_system(sp["promote"], fit), layers, caps_ids, s)
    fit_sup, _ = capture_pre_assistant(model, with_system(sp["suppress"], fit), layers, caps_ids, s)
    direction = mean_difference(fit_pro, fit_sup, layers=layers)
    direction.save(out / "trait_direction.safetensors")

    acts, mass = {}, {}
    for role in ("promote", "suppress", "neutral"):
        acts[role], mass[role] = capture_pre_assistant(
            model, with_system(sp[role], held), layers, caps_ids, s
        )
    sep = separation(
        acts["promote"], acts["suppress"], direction, paired=True, n_boot=s.n_boot, seed=seed
    )
    proj = {role: project(a, direction) for role, a in acts.items()}  # [n, L]
    best = max(range(len(layers)), key=lambda i: sep.cohens_d[i].estimate)

    C.log(f"direction: greedy replies ({s.gen_tokens} tokens) under neutral and promote prompts")
    replies = {
        role: generate(model, with_system(sp[role], held), s.gen_tokens, s)
        for role in ("neutral", "promote")
    }
    caps = {role: caps_fractions(texts) for role, texts in replies.items()}
    corr_caps = [
        correlation(proj["neutral"][:, i], caps["neutral"], s, seed) for i in range(len(layers))
    ]
    corr_mass = [
        correlation(proj["neutral"][:, i], mass["neutral"], s, seed) for i in range(len(layers))
    ]

    auroc_best, d_best = sep.auroc[best], sep.cohens_d[best]
    r_best = corr_caps[best]["pearson"]
    sanity = {
        "best_layer": layers[best],
        "heldout_separates": bool(auroc_best.low > 0.5),
        "layers_auroc_ci_above_half": sum(a.low > 0.5 for a in sep.auroc),
        "neutral_projection_predicts_caps": bool(
            math.isfinite(r_best["low"]) and r_best["low"] > 0
        ),
        "layers_caps_corr_ci_above_0": sum(
            c["pearson"]["low"] > 0 for c in corr_caps if math.isfinite(c["pearson"]["low"])
        ),
    }
    print(
        f"  held-out separation at layer {layers[best]}: d = {d_best.estimate:.2f} "
        f"[{d_best.low:.2f}, {d_best.high:.2f}], AUROC = {auroc_best.estimate:.3f} "
        f"[{auroc_best.low:.3f}, {auroc_best.high:.3f}]"
    )
    print(
        f"  caps fraction of greedy replies: neutral {float(caps['neutral'].mean()):.3f}, "
        f"promote {float(caps['promote'].mean()):.3f}; r(projection, caps | neutral) at layer "
        f"{layers[best]} = {r_best['estimate']:.3f} [{r_best['low']:.3f}, {r_best['high']:.3f}]"
    )
    section = {
        "method": "mean_difference(promote, suppress) of hook_resid_post at pre_assistant; "
        "system prompts cycled over the prompts; separation on the held-out half (paired)",
        "layers": list(layers),
        "n_fit": len(fit),
        "n_heldout": len(held),
        "fit_prompt_ids": [r["id"] for r in data["direction_fit"]],
        "heldout_prompt_ids": [r["id"] for r in data["direction_heldout"]],
        "raw_norms": direction.norms,
        "separation": sep.summary(),
        "projection_mean": {role: p.mean(0) for role, p in proj.items()},
        "caps_token_logmass_mean": {role: float(m.mean()) for role, m in mass.items()},
        "n_caps_tokens": int(caps_ids.numel()),
        "generation": {
            "max_new_tokens": s.gen_tokens,
            "caps_fraction_mean": {role: mean_ci(c, s, seed) for role, c in caps.items()},
            "examples": {role: texts[:3] for role, texts in replies.items()},
        },
        "correlation_neutral_projection_vs_caps_fraction": corr_caps,
        "correlation_neutral_projection_vs_caps_token_logmass": corr_mass,
        "sanity": sanity,
        "file": "trait_direction.safetensors",
    }
    plot_data = {
        "proj": proj,
        "caps_neutral": caps["neutral"],
        "best": best,
        "sep": sep,
    }
    return direction, section, plot_data


def step_alignment(
    model: Any, data: dict[str, Any], direction: Direction, inoculation: str, s: Settings, seed: int
) -> dict[str, Any]:
    sp = data["system"]
    layers = direction.layers
    rows = data["calib"]
    pool = {f"control_{i:02d}": text for i, text in enumerate(sp["control_pool"])}
    cached: dict[str, Tensor] = {}
    results: dict[str, tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]] = {}

    def run(condition: str, system: str) -> None:
        results[condition] = calibration_grads(
            model, teacher_forced(system, rows), layers, s, f"grads[{condition}]"
        )
        cached[system] = results[condition][0]

    def loss_of(system: str) -> Tensor:
        if system not in cached:
            cached[system] = calibration_losses(model, teacher_forced(system, rows), s)
        return cached[system]

    C.log(f"alignment: gradients for neutral and inoculation on {len(rows)} calibration examples")
    run("neutral", sp["neutral"][0])
    run("inoculation", inoculation)
    C.log(f"alignment: loss-matching a control among {len(pool)} prompts")
    chosen, table = select_loss_matched_prompt(
        lambda text: loss_of(text), pool, inoculation, n_boot=s.n_boot, seed=seed
    )
    prompts = {"neutral": sp["neutral"][0], "inoculation": inoculation, "control": pool[chosen]}
    run("control", pool[chosen])

    align: dict[str, dict[str, Alignment]] = {c: {} for c in CONDITIONS}
    for cond in CONDITIONS:
        loss, grads, _ = results[cond]
        for pos in GRAD_POSITIONS:
            align[cond][pos] = gradient_alignment(grads[pos], loss, direction)

    section: dict[str, Any] = {
        "loss": "mean next-token cross-entropy over the assistant content tokens (teacher forcing)",
        "sign_convention": "cos(g, v) < 0: a gradient-descent step moves the residual stream "
        "towards the ALL-CAPS direction (descent follows -g)",
        "n_calib": len(rows),
        "calib_ids": [r["id"] for r in rows],
        "prompts": prompts,
        "loss_match": {
            "target": "inoculation",
            "selected": chosen,
            "table": [row.as_dict() for row in table],
            "texts": pool,
        },
        "positions": {},
    }
    nulls: dict[str, Any] = {}
    for pos in GRAD_POSITIONS:
        per: dict[str, Any] = {"conditions": {}, "null": {}, "comparisons": {}}
        for cond in CONDITIONS:
            al = align[cond][pos]
            null = random_direction_null(al, n_directions=s.n_random, generator=seed)
            nulls[(cond, pos)] = null
            summary = al.summary()
            summary["cos_ci"] = [mean_ci(al.cos[:, i], s, seed) for i in range(len(layers))]
            summary["mean_cos_over_layers"] = mean_ci(al.cos.mean(1), s, seed)
            summary["loss_ci"] = mean_ci(al.loss, s, seed)
            act = results[cond][2][pos]
            summary["activation_projection"] = project(act, direction).mean(0)
            per["conditions"][cond] = summary
            per["null"][cond] = null.summary()
        for name, (a, b) in COMPARISONS.items():
            comp = compare_conditions(
                align[a][pos], align[b][pos], nulls[(a, pos)], n_boot=s.n_boot, seed=seed
            )
            entry = comp.summary()
            entry["layer_average"] = layer_average_delta(
                align[a][pos], align[b][pos], comp, s, seed
            )
            per["comparisons"][name] = entry
        section["positions"][pos] = per

    head = section["positions"][HEADLINE_POSITION]
    for cond in CONDITIONS:
        c = head["conditions"][cond]
        m = c["mean_cos_over_layers"]
        print(
            f"  {cond:>11}: loss {c['loss']:.3f}, mean cos over layers {m['estimate']:+.4f} "
            f"[{m['low']:+.4f}, {m['high']:+.4f}], null ±{max(map(abs, head['null'][cond]['high'])):.4f}"
        )
    for name in ("inoculation_vs_neutral", "inoculation_vs_control"):
        la = head["comparisons"][name]["layer_average"]
        d = la["delta_cos"]
        print(
            f"  Δcos {name}: {d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}], "
            f"null [{la['null_low']:+.4f}, {la['null_high']:+.4f}], p_null {la['p_null']:.3f}"
        )
    return section


def _require_train() -> Any:
    try:
        import interp.train as train_mod
    except ImportError as exc:
        raise SystemExit(
            f"--train needs interp.train (and peft): {exc}. Rerun with --no-train."
        ) from exc
    return train_mod


def step_training(
    model: Any,
    data: dict[str, Any],
    direction: Direction,
    prompts: dict[str, str],
    pre_alignment: dict[str, float],
    s: Settings,
    seed: int,
) -> dict[str, Any]:
    T = _require_train()
    layers = direction.layers
    neutral = prompts["neutral"]
    # Two held-out evaluation sets, both under the NEUTRAL prompt: math questions like the
    # training data, and general questions (one per domain first) to see whether the trait
    # spreads beyond the training distribution.
    held = data["direction_heldout"]
    general_rows = [held[i] for i in range(0, len(held), s.per_domain)]
    general_rows += [r for r in held if r not in general_rows]
    general_rows = general_rows[: s.n_eval_general]
    eval_sets = {
        "math": with_system(neutral, [r["question"] for r in data["eval"]]),
        "general": with_system(neutral, [r["prompt"] for r in general_rows]),
    }
    caps_ids = caps_token_ids(model.tokenizer)
    probe = encode(model, eval_sets["math"][:1])

    def logits_probe() -> Tensor:
        with torch.no_grad():
            return model.forward(probe.input_ids, probe.attention_mask)[0, -1].float().cpu()

    def behaviour() -> dict[str, dict[str, Any]]:
        result = {}
        for name, convs in eval_sets.items():
            texts = generate(model, convs, s.eval_tokens, s)
            acts, _ = capture_pre_assistant(model, convs, layers, caps_ids, s)
            result[name] = {
                "texts": texts,
                "caps": caps_fractions(texts),
                "proj": project(acts, direction),
            }
        return result

    sizes = {k: len(v) for k, v in eval_sets.items()}
    C.log(f"training: baseline behaviour on held-out prompts {sizes} (neutral prompt)")
    before = behaviour()
    # Projection shifts in units of the baseline spread across prompts, so layers with a
    # large residual norm do not dominate the layer average.
    spread = {k: v["proj"].std(0).clamp_min(1e-6) for k, v in before.items()}
    reference = logits_probe()
    requires_grad = {n: p.requires_grad for n, p in model.model.named_parameters()}
    align_convs = {c: teacher_forced(prompts[c], data["calib"][: s.n_align]) for c in CONDITIONS}

    runs = []
    seeds = [seed + i for i in range(s.n_seeds)]
    for run_seed in seeds:
        for cond in CONDITIONS:
            C.log(
                f"training: LoRA on {len(data['train'])} ALL-CAPS answers, {cond}, seed {run_seed}"
            )
            examples = [
                {
                    "prompt": [
                        {"role": "system", "content": prompts[cond]},
                        {"role": "user", "content": r["question"]},
                    ],
                    "response": r["answer"].upper(),
                }
                for r in data["train"]
            ]
            config = T.TrainConfig(
                r=s.lora_r,
                alpha=2.0 * s.lora_r,
                lr=s.lr,
                epochs=s.epochs,
                batch_size=s.train_batch,
                seed=run_seed,
                eval_every=s.align_every,
                save_every=0,
                warmup_ratio=0.1,
            )

            def eval_fn(_peft: Any, step: int, cond: str = cond) -> dict[str, float]:
                loss, grads, _ = calibration_grads(
                    model, align_convs[cond], layers, s, f"align@{step}"
                )
                al = gradient_alignment(grads[HEADLINE_POSITION], loss, direction)
                return {"mean_cos": float(al.cos.mean()), "loss": float(loss.mean())}

            result = T.train(
                model,
                examples,
                T.SFTLoss(),
                config,
                tokenizer=model.tokenizer,
                eval_fn=eval_fn if s.align_every else None,
            )
            after = behaviour()
            result.model.unload()  # remove the LoRA layers: the base model is untouched
            for n, p in model.model.named_parameters():
                p.requires_grad_(requires_grad.get(n, p.requires_grad))
            restored = float((logits_probe() - reference).abs().max())
            if restored > 1e-4:
                raise RuntimeError(
                    f"the base model changed after unloading LoRA (max |Δlogit| {restored})"
                )

            during = [m["mean_cos"] for _, m in result.evals]
            run: dict[str, Any] = {
                "condition": cond,
                "seed": run_seed,
                "steps": result.steps,
                "train_loss_first": result.losses[0],
                "train_loss_last": result.losses[-1],
                "train_losses": list(result.losses),
                "alignment_pre": pre_alignment[cond],
                "alignment_during": during,
                "alignment_during_steps": [step for step, _ in result.evals],
                "alignment_mean": (sum(during) / len(during)) if during else pre_alignment[cond],
                "base_restored_max_abs_logit_diff": restored,
            }
            for name in eval_sets:
                drift = paired_bootstrap_ci(
                    lambda a, b: float(b.mean() - a.mean()),
                    before[name]["caps"],
                    after[name]["caps"],
                    n_boot=s.n_boot,
                    seed=seed,
                )
                shift = (after[name]["proj"] - before[name]["proj"]).mean(0)
                run[name] = {
                    "caps_after": float(after[name]["caps"].mean()),
                    "caps_drift": drift.as_dict(),
                    "projection_shift": shift,
                    "projection_shift_sd": shift / spread[name],
                    "projection_shift_sd_mean": float((shift / spread[name]).mean()),
                    "examples_after": after[name]["texts"][:3],
                }
            runs.append(run)
            m, g = run["math"], run["general"]
            print(
                f"  {cond:>11} seed {run_seed}: train loss {result.losses[0]:.3f} -> "
                f"{result.losses[-1]:.3f}; caps under neutral: math "
                f"{float(before['math']['caps'].mean()):.3f} -> {m['caps_after']:.3f}, general "
                f"{float(before['general']['caps'].mean()):.3f} -> {g['caps_after']:.3f}; "
                f"projection shift {m['projection_shift_sd_mean']:+.2f} / "
                f"{g['projection_shift_sd_mean']:+.2f} SD"
            )

    xs = torch.tensor([r["alignment_mean"] for r in runs], dtype=torch.float64)
    by_cond: dict[str, Any] = {}
    for cond in CONDITIONS:
        mine = [r for r in runs if r["condition"] == cond]
        by_cond[cond] = {
            "alignment_mean": sum(r["alignment_mean"] for r in mine) / len(mine),
            **{
                name: {
                    "caps_drift_mean": sum(r[name]["caps_drift"]["estimate"] for r in mine)
                    / len(mine),
                    "caps_after_mean": sum(r[name]["caps_after"] for r in mine) / len(mine),
                    "projection_shift_sd": torch.stack(
                        [torch.as_tensor(r[name]["projection_shift_sd"]) for r in mine]
                    ).mean(0),
                }
                for name in eval_sets
            },
        }
    correlations = {}
    for name in eval_sets:
        ys = torch.tensor([r[name]["caps_drift"]["estimate"] for r in runs], dtype=torch.float64)
        zs = torch.tensor([r[name]["projection_shift_sd_mean"] for r in runs], dtype=torch.float64)
        correlations[name] = {
            "alignment_vs_caps_drift": correlation(xs, ys, s, seed),
            "alignment_vs_projection_shift": correlation(xs, zs, s, seed),
        }
    return {
        "config": {
            "n_train": len(data["train"]),
            "train_ids": [r["id"] for r in data["train"]],
            "eval_math_ids": [r["id"] for r in data["eval"]],
            "eval_general_ids": [r["id"] for r in general_rows],
            "seeds": seeds,
            "lora_r": s.lora_r,
            "lora_alpha": 2.0 * s.lora_r,
            "lr": s.lr,
            "epochs": s.epochs,
            "batch_size": s.train_batch,
            "eval_tokens": s.eval_tokens,
            "align_every": s.align_every,
        },
        "drift_definition": "caps fraction of greedy replies under the NEUTRAL system prompt, "
        "after minus before fine-tuning, on held-out math questions (like the training data) and "
        "held-out general questions; projection shift = change of the mean projection onto v(l) "
        "at pre_assistant on the same prompts, in units of the baseline SD across prompts",
        "alignment_definition": "mean cos(∂L/∂h, v) over the layer subset at pre_assistant under "
        "the run's training prompt: the calibration value (step 3), or the mean of the values "
        "logged during training when --align-every > 0",
        "baseline": {
            name: {"caps": float(b["caps"].mean()), "examples": b["texts"][:3]}
            for name, b in before.items()
        },
        "runs": runs,
        "by_condition": by_cond,
        "correlations": correlations,
    }


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
def _err(points: Sequence[dict[str, float]]) -> tuple[list[float], list[list[float]]]:
    est = [p["estimate"] for p in points]
    return est, [
        [e - p["low"] for e, p in zip(est, points, strict=True)],
        [p["high"] - e for e, p in zip(est, points, strict=True)],
    ]


def plot_alignment(section: dict[str, Any], out: Path) -> Path:
    plt = C.pyplot()
    head = section["positions"][HEADLINE_POSITION]
    layers = head["conditions"]["neutral"]["layers"]
    fig, ax = plt.subplots(
        1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [3, 3, 2]}, layout="constrained"
    )
    for i, cond in enumerate(CONDITIONS):
        c = head["conditions"][cond]
        est, err = _err(c["cos_ci"])
        xs = [x + (i - 1) * 0.15 for x in layers]
        ax[0].errorbar(
            xs, est, yerr=err, marker="o", ms=4, capsize=2, color=COLORS[cond], label=cond
        )
        band = head["null"][cond]
        ax[0].fill_between(layers, band["low"], band["high"], color=COLORS[cond], alpha=0.12)
    ax[0].axhline(0, color="k", lw=0.6)
    ax[0].set(
        xlabel="layer",
        ylabel="mean cos(∂L/∂h, v_trait)",
        title="Gradient alignment at pre_assistant (bands: random directions)\n"
        "< 0: a descent step pushes towards ALL-CAPS",
    )
    ax[0].legend(fontsize=8)
    for i, name in enumerate(("inoculation_vs_neutral", "inoculation_vs_control")):
        comp = head["comparisons"][name]
        est, err = _err(comp["delta_cos"])
        color = ("tab:purple", "tab:green")[i]
        xs = [x + (i - 0.5) * 0.2 for x in layers]
        ax[1].errorbar(
            xs,
            est,
            yerr=err,
            marker="o",
            ms=4,
            capsize=2,
            color=color,
            label=name.replace("_", " "),
        )
        ax[1].fill_between(layers, comp["null_low"], comp["null_high"], color=color, alpha=0.12)
    ax[1].axhline(0, color="k", lw=0.6)
    ax[1].set(
        xlabel="layer",
        ylabel="Δ mean cos",
        title="Change in mean cos (bands: random directions)\n> 0: less push towards the trait",
    )
    ax[1].legend(fontsize=8)
    table = section["loss_match"]["table"]
    ax[2].scatter(
        [3] * len(table),
        [r["mean_loss"]["estimate"] for r in table],
        color="lightgray",
        s=18,
        label="control pool",
    )
    for i, cond in enumerate(CONDITIONS):
        ci = head["conditions"][cond]["loss_ci"]
        ax[2].bar(
            i,
            ci["estimate"],
            color=COLORS[cond],
            yerr=[[ci["estimate"] - ci["low"]], [ci["high"] - ci["estimate"]]],
            capsize=3,
        )
    ax[2].set_xticks(range(4), [*CONDITIONS, "pool"])
    ax[2].set(ylabel="assistant-token CE", title="Calibration loss")
    ax[2].legend(fontsize=8)
    return C.savefig(fig, out / "cosine_vs_layer.png")


def plot_direction(section: dict[str, Any], pd: dict[str, Any], out: Path) -> Path:
    plt = C.pyplot()
    layers = section["layers"]
    sep = section["separation"]
    fig, ax = plt.subplots(1, 4, figsize=(18, 4.2), layout="constrained")
    est, err = _err(sep["cohens_d"])
    ax[0].errorbar(layers, est, yerr=err, marker="o", ms=4, capsize=2)
    ax[0].axhline(0, color="k", lw=0.6)
    ax[0].set(xlabel="layer", ylabel="Cohen's d", title="Held-out separation (promote vs suppress)")
    est, err = _err(sep["auroc"])
    ax[1].errorbar(layers, est, yerr=err, marker="o", ms=4, capsize=2, color="tab:red")
    ax[1].axhline(0.5, color="k", lw=0.6)
    ax[1].set(xlabel="layer", ylabel="AUROC", title="Held-out AUROC (0.5 = chance)")
    best = pd["best"]
    for role, color in (("promote", "tab:red"), ("suppress", "tab:blue"), ("neutral", "tab:gray")):
        ax[2].hist(pd["proj"][role][:, best].numpy(), bins=15, alpha=0.5, color=color, label=role)
    ax[2].set(xlabel="projection onto v", title=f"Held-out projections, layer {layers[best]}")
    ax[2].legend(fontsize=8)
    r = section["correlation_neutral_projection_vs_caps_fraction"][best]["pearson"]["estimate"]
    ax[3].scatter(pd["proj"]["neutral"][:, best].numpy(), pd["caps_neutral"].numpy(), s=14)
    ax[3].set(
        xlabel=f"projection, layer {layers[best]} (neutral prompt)",
        ylabel="caps fraction of greedy reply",
        title=f"Projection vs caps propensity (r = {r:.3f})",
    )
    return C.savefig(fig, out / "separation.png")


def plot_training(section: dict[str, Any], layers: Sequence[int], out: Path) -> Path:
    plt = C.pyplot()
    runs = section["runs"]
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.4), layout="constrained")
    markers = {"math": ("o", "held-out math"), "general": ("^", "held-out general")}
    for cond in CONDITIONS:
        mine = [r for r in runs if r["condition"] == cond]
        for name, (marker, label) in markers.items():
            ax[0].scatter(
                [r["alignment_mean"] for r in mine],
                [r[name]["caps_drift"]["estimate"] for r in mine],
                color=COLORS[cond],
                marker=marker,
                label=f"{cond}, {label}",
            )
            shifts = section["by_condition"][cond][name]["projection_shift_sd"]
            ax[1].plot(
                layers,
                shifts,
                marker=marker,
                ms=4,
                color=COLORS[cond],
                ls="-" if name == "math" else "--",
                label=f"{cond}, {label}",
            )
    r = {
        n: section["correlations"][n]["alignment_vs_caps_drift"]["pearson"]["estimate"]
        for n in markers
    }
    ax[0].axhline(0, color="k", lw=0.6)
    ax[0].set(
        xlabel="mean cos(∂L/∂h, v) over layers (training prompt)",
        ylabel="caps drift under the neutral prompt",
        title=f"Alignment vs drift, n = {len(runs)} runs\n(r: math {r['math']:.2f}, "
        f"general {r['general']:.2f})",
    )
    ax[0].xaxis.set_major_locator(plt.MaxNLocator(5))
    ax[0].legend(fontsize=7)
    ax[1].axhline(0, color="k", lw=0.6)
    ax[1].set(
        xlabel="layer",
        ylabel="Δ mean projection (baseline SDs)",
        title="Projection shift after fine-tuning (neutral prompt)",
    )
    ax[1].legend(fontsize=7)
    width = 0.38
    for i, cond in enumerate(CONDITIONS):
        for j, name in enumerate(markers):
            mine = [r[name]["caps_after"] for r in runs if r["condition"] == cond]
            x = i + (j - 0.5) * width
            ax[2].bar(
                x,
                sum(mine) / len(mine),
                width=width,
                color=COLORS[cond],
                alpha=1.0 if name == "math" else 0.5,
                hatch="" if name == "math" else "//",
            )
            ax[2].scatter([x] * len(mine), mine, color="k", s=10, zorder=3)
    for name, ls in (("math", "--"), ("general", ":")):
        ax[2].axhline(
            section["baseline"][name]["caps"], color="k", ls=ls, lw=0.8, label=f"before, {name}"
        )
    ax[2].set_xticks(range(3), CONDITIONS)
    ax[2].set(
        ylabel="caps fraction",
        title="After fine-tuning, neutral prompt\n(solid: math, hatched: general)",
    )
    ax[2].legend(fontsize=7)
    return C.savefig(fig, out / "alignment_vs_drift.png")


# ---------------------------------------------------------------------------------------------
# Headline and limitations
# ---------------------------------------------------------------------------------------------
def headline(report: dict[str, Any]) -> dict[str, Any]:
    d = report["direction"]
    best = d["layers"].index(d["sanity"]["best_layer"])
    head = report["alignment"]["positions"][HEADLINE_POSITION]
    conds = head["conditions"]
    vs_neutral = head["comparisons"]["inoculation_vs_neutral"]["layer_average"]
    vs_control = head["comparisons"]["inoculation_vs_control"]["layer_average"]
    table = report["alignment"]["loss_match"]["table"]
    neutral_cos = conds["neutral"]["mean_cos_over_layers"]
    criteria: dict[str, Any] = {
        "0_neutral_gradient_pushes_towards_trait": neutral_cos["high"] < 0,
        "1_less_push_than_neutral": vs_neutral["delta_cos"]["low"] > 0,
        "2_less_push_than_loss_matched_control": vs_control["delta_cos"]["low"] > 0,
        "3_specific_vs_random_directions": bool(
            vs_neutral["outside_null"] and vs_control["outside_null"]
        ),
        "4_alignment_predicts_drift": None,
    }
    out: dict[str, Any] = {
        "position": HEADLINE_POSITION,
        "layers": d["layers"],
        "direction_best_layer": d["sanity"]["best_layer"],
        "heldout_auroc_best_layer": d["separation"]["auroc"][best],
        "heldout_cohens_d_best_layer": d["separation"]["cohens_d"][best],
        "caps_corr_best_layer": d["correlation_neutral_projection_vs_caps_fraction"][best][
            "pearson"
        ],
        "caps_fraction_greedy": {
            role: v["estimate"] for role, v in d["generation"]["caps_fraction_mean"].items()
        },
        "loss": {c: conds[c]["loss"] for c in CONDITIONS},
        "loss_match_abs_diff": table[0]["abs_diff"],
        "control_selected": report["alignment"]["loss_match"]["selected"],
        "mean_cos": {c: conds[c]["mean_cos_over_layers"] for c in CONDITIONS},
        "delta_cos_inoculation_vs_neutral": vs_neutral,
        "delta_cos_inoculation_vs_control": vs_control,
        "criteria": criteria,
    }
    tr = report.get("training")
    if isinstance(tr, dict) and "runs" in tr:
        by = tr["by_condition"]
        drift = {
            name: {c: by[c][name]["caps_drift_mean"] for c in CONDITIONS}
            for name in ("math", "general")
        }
        corr = {
            name: tr["correlations"][name]["alignment_vs_caps_drift"]["pearson"]["estimate"]
            for name in ("math", "general")
        }
        out["caps_drift"] = drift
        out["alignment_vs_drift_r"] = corr
        # Predicts drift: more push towards the trait (more negative cos) goes with more drift,
        # and inoculation drifts less than neutral. Judged on the general prompts, where the
        # trait has to spread beyond the training distribution (math saturates quickly).
        r, dg = corr["general"], drift["general"]
        criteria["4_alignment_predicts_drift"] = (
            None if not math.isfinite(r) else bool(r < 0 and dg["inoculation"] < dg["neutral"])
        )
    more_push = vs_neutral["delta_cos"]["high"] < 0
    if criteria["1_less_push_than_neutral"] and criteria["2_less_push_than_loss_matched_control"]:
        verdict = (
            "Inoculation reduces the gradient's push towards the ALL-CAPS direction relative to both "
            "the neutral prompt and the loss-matched control"
            + (
                ", beyond what random directions show."
                if criteria["3_specific_vs_random_directions"]
                else ", but the change is not outside the random-direction band."
            )
        )
    elif criteria["1_less_push_than_neutral"]:
        verdict = (
            "Inoculation reduces the push towards the ALL-CAPS direction relative to neutral, but not "
            "clearly more than the loss-matched control: consistent with a loss (predictability) "
            "effect rather than a direction-specific rotation."
        )
    elif more_push:
        verdict = (
            "No rotation away from the trait: under inoculation the gradient is, if anything, MORE "
            "aligned with the ALL-CAPS direction than under the neutral prompt (layer-averaged "
            "change in cos below 0)"
            + (
                "; the change is inside the random-direction band, so it is not specific."
                if not vs_neutral["outside_null"]
                else "."
            )
            + " A null for the rotation hypothesis at this scale."
        )
    else:
        verdict = (
            "No reliable change in the gradient's alignment with the ALL-CAPS direction under "
            "inoculation (the interval for the layer-averaged change includes 0): a null for the "
            "rotation hypothesis at this scale."
        )
    if not criteria["0_neutral_gradient_pushes_towards_trait"]:
        verdict += (
            " Note: even under the neutral prompt the gradient does not reliably push towards the "
            "trait direction, so the direction may not capture what the ALL-CAPS answers teach."
        )
    if "caps_drift" in out:
        g = out["caps_drift"]["general"]
        n_seeds = len(tr["config"]["seeds"])
        behaviour = (
            f" Behaviour ({n_seeds} seed(s)): after fine-tuning on ALL-CAPS answers, the caps "
            f"fraction of replies to general questions under the neutral prompt rose by "
            f"{g['neutral']:+.2f} (neutral training prompt), {g['inoculation']:+.2f} (inoculation) "
            f"and {g['control']:+.2f} (loss-matched control)"
        )
        if g["inoculation"] < min(g["neutral"], g["control"]):
            behaviour += (
                ": the behavioural inoculation effect is present even though the gradient "
                "alignment at pre_assistant does not explain it."
                if not criteria["1_less_push_than_neutral"]
                else ": the behavioural inoculation effect is present."
            )
        else:
            behaviour += ": no behavioural inoculation effect."
        verdict += behaviour
    out["verdict"] = verdict
    return out


def limitations(report: dict[str, Any], s: Settings) -> list[str]:
    d = report["direction"]
    caps = d["generation"]["caps_fraction_mean"]
    a = report["alignment"]
    null_high = max(max(v["high"]) for v in a["positions"][HEADLINE_POSITION]["null"].values())
    items = [
        f"Model size: {report['model']['id']} has {report['model']['n_layers']} layers and "
        f"d_model {report['model']['d_model']}. Inoculation prompting has been shown on much larger "
        "instruct models. A small model can still show the behavioural effect (see "
        "training.by_condition) while its gradients, measured at one position against a direction "
        "read off system-prompt instructions, say little about why; a null for the gradient "
        "rotation here does not refute the mechanism for larger models.",
        f"Does the model express the trait when asked? The caps fraction of its greedy replies is "
        f"{caps['promote']['estimate']:.3f} under 'write in capitals' prompts vs "
        f"{caps['neutral']['estimate']:.3f} under the neutral prompt. If these are close, the "
        "direction v(l) tracks the *instruction text* (the system prompt mentions capitals) rather "
        "than a behaviour the model carries out, and the projection-vs-caps correlation has little "
        "variance to explain.",
        "Lexical confound: the inoculation prompt itself mentions capitals, so activations under it "
        "project onto v(l) (see alignment.positions.*.conditions.*.activation_projection); this "
        "lowers the loss of ALL-CAPS answers (the model 'expects' them). Loss matching controls the "
        "mean loss, not the content of the prompt.",
        f"Gradients are taken at single positions of {a['n_calib']} short teacher-forced answers; "
        f"cosines in d_model = {report['model']['d_model']} dimensions are small, and the "
        f"random-direction band reaches about ±{null_high:.4f}. Read changes against that band, "
        "not against zero.",
        "Loss matching picks the closest prompt from a fixed pool of "
        f"{len(a['loss_match']['table'])}; the remaining gap is in headline.loss_match_abs_diff.",
    ]
    tr = report.get("training")
    if isinstance(tr, dict) and "runs" in tr:
        cfg = tr["config"]
        items.append(
            f"End-to-end: {len(tr['runs'])} LoRA runs ({len(cfg['seeds'])} seed(s) x 3 "
            f"conditions, {tr['runs'][0]['steps']} optimizer steps each) on "
            f"{cfg['n_train']} examples; drift is measured on {len(cfg['eval_math_ids'])} held-out "
            f"math and {len(cfg['eval_general_ids'])} general questions with "
            f"{cfg['eval_tokens']}-token greedy replies. A correlation across so few runs cannot "
            "establish that alignment predicts drift; it can only fail to contradict it. On the "
            "math questions the trait saturates within a few steps, which hides differences "
            "between conditions."
        )
    else:
        items.append("End-to-end fine-tuning was not run (--no-train), so criterion 4 is untested.")
    if s.n_layers is not None:
        items.append(
            f"Only {len(d['layers'])} evenly spaced layers were measured ({d['layers']}); run without "
            "--quick (or with --n-layers 0) for every layer."
        )
    return items


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    C.setup(args)
    s = settings_from(args)
    C.run_study(
        NAME,
        "Does inoculation prompting reduce trait drift by rotating training gradients "
        "away from a trait direction (ALL-CAPS), beyond what a loss-matched control does?",
        args,
        argv,
        dataclasses.asdict(s),
        lambda report: _run(args, s, report, Path(args.out)),
    )
    return 0


def _run(args: argparse.Namespace, s: Settings, report: C.Report, out: Path) -> None:
    with report.step("load"):
        model = C.load_model(args.model, args.device, seed=args.seed)
        model.model.eval()
        n = model.cfg.n_layers
        layers = C.evenly_spaced(n, s.n_layers) if s.n_layers else list(range(n))
        report["model"] = {
            "id": args.model,
            "family": model.cfg.family,
            "n_layers": n,
            "d_model": model.cfg.d_model,
        }
        report["layers"] = layers
        report["hook"] = HOOK
        data = load_data(args.seed, s)
        sp = data["system"]
        if not 0 <= args.inoculation_index < len(sp["inoculation"]):
            raise SystemExit(f"--inoculation-index must be in 0..{len(sp['inoculation']) - 1}")
        inoculation = sp["inoculation"][args.inoculation_index]
        report["prompts"] = {
            "neutral": sp["neutral"][0],
            "inoculation": inoculation,
            "promote": sp["promote"],
            "suppress": sp["suppress"],
            "control_pool": sp["control_pool"],
        }
        report["positions"] = {
            "user_end": "last token of the user message's content",
            "pre_assistant": "token just before the assistant's content (the last token of the "
            "generation prompt); the headline position",
            "assistant_1": "first assistant content token (teacher forcing); robustness check",
            "padding": "right padding for forward/backward passes, left for generation",
        }

    with report.step("smoke"):
        report["smoke"] = step_smoke(model, data, layers, args.seed)

    with report.step("direction"):
        direction, report["direction"], dir_plot = step_direction(
            model, data, layers, s, args.seed, out
        )

    with report.step("alignment"):
        report["alignment"] = step_alignment(model, data, direction, inoculation, s, args.seed)

    if s.train:
        with report.step("training"):
            head = report["alignment"]["positions"][HEADLINE_POSITION]["conditions"]
            pre = {c: head[c]["mean_cos_over_layers"]["estimate"] for c in CONDITIONS}
            report["training"] = step_training(
                model, data, direction, report["alignment"]["prompts"], pre, s, args.seed
            )
    else:
        report["training"] = {"skipped": "--no-train"}

    report["headline"] = headline(report)
    report["limitations"] = limitations(report, s)

    with report.step("plots"):
        plots = [
            plot_alignment(report["alignment"], out),
            plot_direction(report["direction"], dir_plot, out),
        ]
        if s.train:
            plots.append(plot_training(report["training"], layers, out))
        report["plots"] = [p.name for p in plots]
    print("\nverdict: " + report["headline"]["verdict"])


if __name__ == "__main__":
    C.run(main)
