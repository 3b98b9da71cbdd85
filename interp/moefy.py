"""MoEfication: a dense gated-MLP model turned into a routed mixture of experts, offline.

Design
------
MoEfication (Zhang et al. 2022, "MoEfication: Transformer Feed-forward Layers
are Mixtures of Experts", Findings of ACL) observes that the hidden units of a
trained FFN fire in co-activated groups, so the FFN can be split into experts
and a router can pick the few groups a token needs. Here this gives a *real
pretrained* MoE to study offline: ``interp.load("smollm2-135m-moe")`` is the
embedded SmolLM2-135M-Instruct with every MLP split this way. Per layer:

1. **Calibration.** MLP inputs ``x`` of the dense model on calibration text
   (``interp/_data/moefy_calibration.jsonl``: hand-written paragraphs plus the
   model's own chat answers to prompts, sampled with a fixed seed); hidden
   units ``h = act(x W_gate) ⊙ (x W_up)``. Every fourth item is held out.
2. **Shared group** (DeepSeekMoE's always-on shared expert; Dai et al. 2024,
   arXiv:2401.06066): the ``n_shared`` units with the largest mean contribution
   ``E|h_i| · ‖W_down[:, i]‖`` are computed for every token and never routed.
3. **Experts.** The other units are split into ``n_experts`` equal groups by
   balanced spherical k-means on their co-activation profiles (``|h_i|`` over
   calibration tokens, centred and normalised, i.e. correlation).
4. **Router** (``MoefiedRouter``), logits per group ``g``:
   ``"norm"`` = ``‖W_down[:, g] h_g‖``, the norm of what the group adds to the
   residual stream (exact, but it computes every group: no saving) or
   ``"linear"`` = a ridge-regression map from ``x`` that predicts those norms
   (cheap, less faithful).
5. **Selection** (``interp.routing`` family ``"moefied"``): top-k of the
   logits, weight 1 for every selected group. The block's output is then
   ``shared(x) + Σ_{g ∈ top-k} expert_g(x)``, which is *exactly* the dense MLP
   when ``k = n_experts``. Softmax weights (renormalised or not) would rescale
   the groups' outputs and break that identity, so they are not used.

The block follows the ``transformers`` MoE interface that ``interp.adapters.hf``
detects: ``layer.mlp`` (``MoefiedMLP``) has ``.gate`` (``x_flat -> (logits,
weights, indices)``) and ``.experts`` (fused ``gate_up_proj [E, 2m, d]``,
``down_proj [E, d, m]``, plus ``unit_ids [E, m]``: which dense hidden units each
expert holds), and ``.shared_experts``. So ``interp.moe.trace`` / ``steer`` /
``ablate_experts`` work unchanged, and the adapter's re-selection of edited
logits uses ``RoutingRule.from_config``, which reads ``config.moefy``.

Caching: ``load()`` converts once and stores only the grouping and router
tensors (safetensors) and the settings plus measured agreement (JSON) under
``interp.models.cache_dir() / "smollm2-135m-moe"`` (written into a temp folder,
then renamed). Later loads take the dense model's load time plus a gather.

Faithfulness is measured, not assumed: ``agreement()`` returns the share of
held-out tokens whose greedy next token (argmax) equals the dense model's, for
each ``k`` in ``AGREEMENT_KS`` and ``k = E`` (read from the cache; nothing is run).

Why the defaults (8 experts of 32 units, a shared group of 1280 of the 1536
units, norm router, top-6): SwiGLU units are not modular the way ReLU units
are. Per token the top 10% of units carry ~70–80% of the output energy, but
*which* units varies, and no balanced grouping tracks it (k-means on
co-activation beats a random split by only ~1 point of relative error; an
energy co-activation graph partition does no better). Dropping 2 of 8 groups
therefore costs ~25% relative MLP-output error per layer without a shared
group, and the errors compound over 30 layers. Held-out agreement at top-6 of
8 (top-7 in brackets): no shared group 0.61, 384 shared 0.74, 768 0.81
(0.88), 1024 0.86 (0.90), 1280 0.91 (0.95); routing by ‖h_g‖ instead of the
output norm, or a fitted linear router (0.87 at 1280 shared), is worse. So
the shipped model is mostly dense with a small routed part; pick another
``MoefyConfig`` (``load(rebuild=True, config=...)``) to trade agreement for a
larger routed share.

Model surgery touches module paths, so it is restricted to llama-style gated
MLPs (``gate_proj`` / ``up_proj`` / ``down_proj`` without biases under
``model.layers``): llama, mistral, qwen2, qwen3 and the like.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from interp.routing import RoutingRule, select_experts

__all__ = [
    "AGREEMENT_KS",
    "NAME",
    "SOURCE",
    "MoefiedExperts",
    "MoefiedMLP",
    "MoefiedRouter",
    "MoefyConfig",
    "agreement",
    "balanced_kmeans",
    "calibration_data",
    "info",
    "load",
    "load_state",
    "moefy",
    "save",
    "set_top_k",
]

NAME = "smollm2-135m-moe"
SOURCE = "smollm2-135m-instruct"
AGREEMENT_KS: tuple[int, ...] = (1, 2, 4, 6)
FORMAT_VERSION = 1
_DATA = Path(__file__).parent / "_data" / "moefy_calibration.jsonl"
RouterKind = Literal["norm", "linear"]


@dataclass(frozen=True)
class MoefyConfig:
    """Settings of a MoEfication.

    Attributes:
        n_experts: routed groups per layer (``E``).
        top_k: groups selected per token by default (change with ``set_top_k``).
        n_shared: units in the always-on shared group (0: none); the rest must
            split evenly into ``n_experts`` groups.
        router: ``"norm"`` (route by each group's output norm) or ``"linear"``
            (ridge map from the MLP input to those norms).
        kmeans_iters: balanced k-means iterations.
        profile_tokens: calibration tokens subsampled for the units' profiles.
        ridge: L2 penalty of the linear router (relative to the mean eigenvalue).
        answer_tokens: tokens of the model's own answer generated per calibration
            prompt (0: the prompts are used without answers).
        max_length: calibration sequences are cut to this many tokens.
        seed: seeds the subsampling, k-means initialisation and answer sampling.
    """

    n_experts: int = 8
    top_k: int = 6
    n_shared: int = 1280
    router: RouterKind = "norm"
    kmeans_iters: int = 25
    profile_tokens: int = 4096
    ridge: float = 1e-3
    answer_tokens: int = 96
    max_length: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_experts < 2:
            raise ValueError(f"n_experts must be ≥ 2, got {self.n_experts}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        if self.n_shared < 0:
            raise ValueError(f"n_shared must be ≥ 0, got {self.n_shared}")
        if self.router not in ("norm", "linear"):
            raise ValueError(f"router must be 'norm' or 'linear', got {self.router!r}")
        for name in ("kmeans_iters", "profile_tokens", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.ridge < 0 or self.answer_tokens < 0:
            raise ValueError("ridge and answer_tokens must be ≥ 0")


# ---------------------------------------------------------------------------
# Modules


class MoefiedExperts(nn.Module):
    """``E`` equal groups of a dense gated MLP's hidden units, as fused tensors.

    ``gate_up_proj[e]`` stacks the gate rows then the up rows of expert ``e``'s
    units, ``down_proj[e]`` their down columns (Mixtral's layout);
    ``unit_ids[e]`` are those units' indices in the dense MLP.
    """

    def __init__(self, n_experts: int, d_model: int, expert_size: int, hidden_act: str):
        super().__init__()
        from transformers.activations import ACT2FN

        self.num_experts = n_experts
        self.expert_size = expert_size
        self.gate_up_proj = nn.Parameter(torch.zeros(n_experts, 2 * expert_size, d_model))
        self.down_proj = nn.Parameter(torch.zeros(n_experts, d_model, expert_size))
        self.register_buffer("unit_ids", torch.zeros(n_experts, expert_size, dtype=torch.long))
        self.act_fn = ACT2FN[hidden_act]

    def hidden(self, x: Float[Tensor, "n d_model"]) -> Float[Tensor, "n_experts n size"]:
        """Every expert's hidden units ``act(x W_gate) ⊙ (x W_up)`` (one dense matmul)."""
        E, m = self.num_experts, self.expert_size
        gu = (x @ self.gate_up_proj.reshape(E * 2 * m, -1).T).view(-1, E, 2 * m)
        gate, up = gu.transpose(0, 1).chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def output_norms(self, h: Float[Tensor, "n_experts n size"]) -> Float[Tensor, "n n_experts"]:
        """``‖W_down,e h_e‖`` per token and expert, as ``sqrt(h_eᵀ (W_down,eᵀ W_down,e) h_e)``
        (an ``m × m`` Gram matrix per expert instead of the ``[n, E, d_model]`` outputs)."""
        gram = torch.bmm(self.down_proj.transpose(1, 2), self.down_proj)
        return (torch.bmm(h, gram) * h).sum(-1).clamp_min(0).sqrt().T

    def forward(
        self,
        x: Float[Tensor, "n d_model"],
        top_k_index: Int[Tensor, "n k"],
        top_k_weights: Float[Tensor, "n k"],
        hidden: Float[Tensor, "n_experts n size"] | None = None,
    ) -> Float[Tensor, "n d_model"]:
        """``Σ_j w_j · expert_{i_j}(x)``; reuses ``hidden`` when the router computed it."""
        E, m = self.num_experts, self.expert_size
        gates = torch.zeros(x.shape[0], E, dtype=x.dtype, device=x.device)
        gates = gates.scatter_add(1, top_k_index, top_k_weights.to(x.dtype))
        if hidden is not None:  # one matmul over the gated units of every expert
            hw = (hidden * gates.T[:, :, None]).transpose(0, 1).reshape(-1, E * m)
            return hw @ self.down_proj.transpose(1, 2).reshape(E * m, -1)
        out = torch.zeros_like(x)
        for e in (gates != 0).any(dim=0).nonzero().flatten().tolist():
            rows = (gates[:, e] != 0).nonzero().flatten()
            gate, up = nn.functional.linear(x[rows], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])
            out.index_add_(0, rows, y * gates[rows, e, None])
        return out


class MoefiedSharedMLP(nn.Module):
    """The always-on shared group: a small dense gated MLP."""

    def __init__(self, d_model: int, size: int, hidden_act: str):
        super().__init__()
        from transformers.activations import ACT2FN

        self.gate_proj = nn.Linear(d_model, size, bias=False)
        self.up_proj = nn.Linear(d_model, size, bias=False)
        self.down_proj = nn.Linear(size, d_model, bias=False)
        self.register_buffer("unit_ids", torch.zeros(size, dtype=torch.long))
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoefiedRouter(nn.Module):
    """Router of a MoEfied layer: ``x_flat -> (logits, weights, indices)`` (HF interface).

    ``kind="norm"``: logits are the norms of every group's output (the groups'
    hidden units are computed here and handed to the experts, so nothing is
    computed twice);
    ``kind="linear"``: ``x W^T + b`` fitted to predict those norms.
    """

    def __init__(self, rule: RoutingRule, kind: RouterKind, d_model: int, experts: MoefiedExperts):
        super().__init__()
        self.rule = rule
        self.kind = kind
        self.top_k = rule.top_k
        self.num_experts = rule.n_experts
        if kind == "linear":
            self.weight = nn.Parameter(torch.zeros(rule.n_experts, d_model))
            self.bias = nn.Parameter(torch.zeros(rule.n_experts))
        self._experts = (experts,)  # a tuple: owned (registered) by the MoE block, not here
        self._stash: tuple[Tensor, Tensor] | None = None

    def set_top_k(self, k: int) -> None:
        self.rule = dataclasses.replace(self.rule, top_k=k)
        self.top_k = k

    def forward(
        self, hidden_states: Float[Tensor, "n d_model"]
    ) -> tuple[Float[Tensor, "n n_experts"], Float[Tensor, "n k"], Int[Tensor, "n k"]]:
        if self.kind == "norm":
            experts = self._experts[0]
            hidden = experts.hidden(hidden_states)
            logits = experts.output_norms(hidden)
            self._stash = (hidden_states, hidden)
        else:
            logits = nn.functional.linear(hidden_states, self.weight, self.bias)
        weights, indices = select_experts(logits, self.rule)
        return logits, weights, indices

    def pop_hidden(self, hidden_states: Tensor) -> Tensor | None:
        """The expert hidden units computed for exactly this input tensor, if any (then
        forgotten)."""
        stash, self._stash = self._stash, None
        return stash[1] if stash is not None and stash[0] is hidden_states else None


class MoefiedMLP(nn.Module):
    """A MoEfied MLP: ``shared(x) + Σ_{top-k} experts(x)`` with HF's MoE attribute names."""

    def __init__(
        self, gate: MoefiedRouter, experts: MoefiedExperts, shared_experts: nn.Module | None
    ):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.shared_experts = shared_experts

    def forward(
        self, hidden_states: Float[Tensor, "*lead d_model"]
    ) -> Float[Tensor, "*lead d_model"]:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, weights, indices = self.gate(flat)
        out = self.experts(flat, indices, weights, hidden=self.gate.pop_hidden(flat))
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(hidden_states.shape)


# ---------------------------------------------------------------------------
# Pure functions: grouping and router fitting


def balanced_kmeans(
    features: Float[Tensor, "n_points dim"],
    n_clusters: int,
    iters: int = 25,
    generator: torch.Generator | None = None,
) -> Int[Tensor, " n_points"]:
    """Spherical k-means whose clusters all hold ``n_points / n_clusters`` points.

    Rows are L2-normalised; k-means++ initialisation; each assignment step
    gives points to centroids greedily in order of cosine similarity, subject to
    the equal capacity (MoEfication's balanced split, Zhang et al. 2022, §3.1).
    """
    n = features.shape[0]
    if n % n_clusters:
        raise ValueError(f"{n} points do not split evenly into {n_clusters} clusters")
    cap = n // n_clusters
    # Row-major: a transposed view makes each ``f @ c.T`` ~60x slower on CPU.
    f = nn.functional.normalize(features.double(), dim=-1).contiguous()
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [f[first]]
    for _ in range(1, n_clusters):
        dist = (1 - f @ torch.stack(centres).T).amax(dim=-1).clamp_min(0) ** 2
        dist = dist if float(dist.sum()) > 0 else torch.ones_like(dist)
        centres.append(f[int(torch.multinomial(dist, 1, generator=generator))])
    c = torch.stack(centres)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = _balanced_assign(f @ c.T, cap)
        if torch.equal(new, labels):
            break
        labels = new
        c = torch.stack([f[labels == j].sum(0) for j in range(n_clusters)])
        c = nn.functional.normalize(c, dim=-1)
    return labels


def _balanced_assign(sim: Tensor, cap: int) -> Tensor:
    n, k = sim.shape
    labels = [-1] * n
    counts = [0] * k
    left = n
    for flat in torch.argsort(sim.reshape(-1), descending=True, stable=True).tolist():
        u, e = divmod(flat, k)
        if labels[u] < 0 and counts[e] < cap:
            labels[u] = e
            counts[e] += 1
            left -= 1
            if not left:
                break
    return torch.tensor(labels, dtype=torch.long)


def group_units(
    hidden: Float[Tensor, "n_tokens n_units"],
    down_norm: Float[Tensor, " n_units"],
    n_experts: int,
    n_shared: int,
    iters: int = 25,
    generator: torch.Generator | None = None,
) -> tuple[Int[Tensor, " n_shared"], Int[Tensor, "n_experts expert_size"]]:
    """Shared units (largest mean contribution) and equal co-activation groups of the rest."""
    n_units = hidden.shape[1]
    if n_shared >= n_units or (n_units - n_shared) % n_experts:
        raise ValueError(
            f"{n_units} units minus n_shared={n_shared} must split evenly into "
            f"n_experts={n_experts} non-empty groups"
        )
    magnitude = hidden.abs().double()
    importance = magnitude.mean(0) * down_norm.double()
    shared = torch.argsort(importance, descending=True, stable=True)[:n_shared]
    rest = torch.ones(n_units, dtype=torch.bool)
    rest[shared] = False
    rest_ids = rest.nonzero().flatten()
    profile = magnitude[:, rest_ids].T
    profile = profile - profile.mean(dim=1, keepdim=True)
    labels = balanced_kmeans(profile, n_experts, iters=iters, generator=generator)
    groups = torch.stack([rest_ids[labels == e] for e in range(n_experts)])
    return shared.sort().values, groups


def fit_linear_router(
    x: Float[Tensor, "n d_model"], target: Float[Tensor, "n n_experts"], ridge: float = 1e-3
) -> tuple[Float[Tensor, "n_experts d_model"], Float[Tensor, " n_experts"]]:
    """Ridge regression ``target ≈ x W^T + b`` (penalty ``ridge`` × mean eigenvalue of the
    centred ``xᵀx``; the bias is not penalised)."""
    x64, t64 = x.double(), target.double()
    mx, mt = x64.mean(0), t64.mean(0)
    xc, tc = x64 - mx, t64 - mt
    gram = xc.T @ xc
    lam = ridge * float(gram.diagonal().mean())
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ tc).T
    b = mt - w @ mx
    return w.to(x.dtype), b.to(x.dtype)


# ---------------------------------------------------------------------------
# Calibration data


def calibration_data(
    split: Literal["calibration", "held_out"] = "calibration",
) -> dict[str, list[str]]:
    """The shipped calibration texts and chat prompts; every fourth item of each is held out."""
    if split not in ("calibration", "held_out"):
        raise ValueError(f"split must be 'calibration' or 'held_out', got {split!r}")
    with open(_DATA, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    out: dict[str, list[str]] = {"texts": [], "prompts": []}
    for kind, key in (("text", "texts"), ("prompt", "prompts")):
        items = [r[kind] for r in rows if r["kind"] == kind]
        out[key] = [t for i, t in enumerate(items) if (i % 4 == 3) == (split == "held_out")]
    return out


def _answers(model: Any, prompts: Sequence[str], max_new_tokens: int, seed: int) -> list[str]:
    """The model's own sampled answers to ``prompts`` (fixed seed), in batches of 8."""
    from interp.chat import encode

    answers: list[str] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), 8):
            chats = [[{"role": "user", "content": p}] for p in prompts[i : i + 8]]
            batch = encode(model.tokenizer, chats, padding_side="left")
            with torch.no_grad():
                out = model.generate(
                    batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.7, top_p=0.9
                )
            n = batch.input_ids.shape[1]
            answers += model.tokenizer.batch_decode(out[:, n:], skip_special_tokens=True)
    return [a.strip() for a in answers]


def _documents(model: Any, data: dict[str, list[str]], answer_tokens: int, seed: int) -> list[str]:
    """Plain texts plus chat-rendered prompt (+ the model's answer) documents."""
    tok = model.tokenizer
    docs = list(data["texts"])
    prompts = data["prompts"]
    answers = (
        _answers(model, prompts, answer_tokens, seed) if answer_tokens else [""] * len(prompts)
    )
    for prompt, answer in zip(prompts, answers, strict=True):
        chat = [{"role": "user", "content": prompt}]
        if answer:
            chat.append({"role": "assistant", "content": answer})
        docs.append(tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=not answer))
    return docs


def _batches(tokenizer: Any, docs: Sequence[str], max_length: int, size: int = 8) -> list[dict]:
    out = []
    for i in range(0, len(docs), size):
        enc = tokenizer(
            list(docs[i : i + size]),
            return_tensors="pt",
            padding=True,
            padding_side="right",
            truncation=True,
            max_length=max_length,
            add_special_tokens=False,
        )
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


# ---------------------------------------------------------------------------
# Surgery


def _gated_mlps(hf_model: nn.Module) -> list[nn.Module]:
    from interp.adapters.hf import unwrap

    base = unwrap(hf_model)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(base).__name__} has no model.layers: not a llama-style model")
    mlps = [layer.mlp for layer in layers]
    for i, mlp in enumerate(mlps):
        if isinstance(mlp, MoefiedMLP):
            raise ValueError(f"layer {i} is already MoEfied")
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(
                f"layer {i}'s MLP ({type(mlp).__name__}) is not a gated gate_proj/up_proj/"
                "down_proj MLP; interp.moefy supports llama-style dense models"
            )
        if any(getattr(mlp, n).bias is not None for n in ("gate_proj", "up_proj", "down_proj")):
            raise ValueError(f"layer {i}'s MLP has biases, which interp.moefy does not split")
    return mlps


def _mlp_inputs(hf_model: nn.Module, mlps: list[nn.Module], batches: list[dict]) -> list[Tensor]:
    """Every layer's MLP input on the non-padding tokens of ``batches`` ([n_tokens, d] each)."""
    store: list[list[Tensor]] = [[] for _ in mlps]
    keep: dict[str, Tensor] = {}

    def grab(i: int):
        def pre(_mod, args):
            x = args[0]
            store[i].append(x.reshape(-1, x.shape[-1])[keep["mask"]].detach().float().cpu())

        return pre

    handles = [m.register_forward_pre_hook(grab(i)) for i, m in enumerate(mlps)]
    dev = next(hf_model.parameters()).device
    try:
        with torch.no_grad():
            for b in batches:
                keep["mask"] = b["attention_mask"].reshape(-1).bool().to(dev)
                hf_model(
                    input_ids=b["input_ids"].to(dev),
                    attention_mask=b["attention_mask"].to(dev),
                    use_cache=False,
                )
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in store]


def _build_block(
    mlp: nn.Module,
    shared_ids: Tensor,
    unit_ids: Tensor,
    rule: RoutingRule,
    kind: RouterKind,
    hidden_act: str,
    router: tuple[Tensor, Tensor] | None = None,
) -> MoefiedMLP:
    w_gate, w_up, w_down = (
        getattr(mlp, n).weight.detach() for n in ("gate_proj", "up_proj", "down_proj")
    )
    d_model = w_gate.shape[1]
    n_experts, size = unit_ids.shape
    experts = MoefiedExperts(n_experts, d_model, size, hidden_act).to(w_gate)
    ids = unit_ids.to(w_gate.device)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.cat([w_gate[ids], w_up[ids]], dim=1))
        experts.down_proj.copy_(w_down[:, ids].permute(1, 0, 2))
        experts.unit_ids.copy_(unit_ids)
    shared = None
    if shared_ids.numel():
        sid = shared_ids.to(w_gate.device)
        shared = MoefiedSharedMLP(d_model, sid.numel(), hidden_act).to(w_gate)
        with torch.no_grad():
            shared.gate_proj.weight.copy_(w_gate[sid])
            shared.up_proj.weight.copy_(w_up[sid])
            shared.down_proj.weight.copy_(w_down[:, sid])
            shared.unit_ids.copy_(shared_ids)
    gate = MoefiedRouter(rule, kind, d_model, experts).to(w_gate)
    if kind == "linear":
        if router is None:
            raise ValueError("a linear router needs its fitted (weight, bias)")
        with torch.no_grad():
            gate.weight.copy_(router[0])
            gate.bias.copy_(router[1])
    return MoefiedMLP(gate, experts, shared)


def _blocks(model: Any) -> list[MoefiedMLP]:
    from interp.adapters.hf import unwrap

    hf = getattr(model, "model", model)
    return [m for m in unwrap(hf).modules() if isinstance(m, MoefiedMLP)]


def _wrap(hf_model: nn.Module, tokenizer: Any) -> Any:
    from interp.adapters.hf import HFHookedModel

    return HFHookedModel(hf_model, tokenizer)


def _install(hf_model: nn.Module, state: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Replace every dense MLP by its MoEfied block and mark the config (in place)."""
    from interp.adapters.hf import unwrap

    base = unwrap(hf_model)
    config = base.config
    mlps = _gated_mlps(hf_model)
    meta = state["moefy"]
    rule = RoutingRule(
        family="moefied",
        n_experts=meta["n_experts"],
        top_k=state["top_k"],
        scoring="identity",
        moe_layers=tuple(meta["layers"]),
        shared_experts=int(meta["n_shared"] > 0),
    )
    act = getattr(config, "hidden_act", "silu")
    for i, mlp in enumerate(mlps):
        router = None
        if meta["router"] == "linear":
            router = (tensors[f"layers.{i}.router.weight"], tensors[f"layers.{i}.router.bias"])
        block = _build_block(
            mlp,
            tensors[f"layers.{i}.shared_ids"],
            tensors[f"layers.{i}.unit_ids"],
            rule,
            meta["router"],
            act,
            router,
        )
        base.model.layers[i].mlp = block
    config.moefy = meta
    config.num_experts = meta["n_experts"]
    config.num_experts_per_tok = state["top_k"]


def _predictions(hf_model: nn.Module, batches: list[dict]) -> list[Tensor]:
    dev = next(hf_model.parameters()).device
    out = []
    with torch.no_grad():
        for b in batches:
            logits = hf_model(
                input_ids=b["input_ids"].to(dev),
                attention_mask=b["attention_mask"].to(dev),
                use_cache=False,
            ).logits
            out.append(logits.argmax(-1).cpu()[b["attention_mask"].bool()])
    return out


def _agreement(
    hf_model: nn.Module, batches: list[dict], dense: list[Tensor], ks: Sequence[int]
) -> dict[int, float]:
    blocks = _blocks(hf_model)
    k0 = blocks[0].gate.top_k
    out = {}
    try:
        for k in ks:
            for b in blocks:
                b.gate.set_top_k(k)
            preds = _predictions(hf_model, batches)
            hits = sum(int((p == d).sum()) for p, d in zip(preds, dense, strict=True))
            out[k] = hits / sum(d.numel() for d in dense)
    finally:
        for b in blocks:
            b.gate.set_top_k(k0)
    return out


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"[interp.moefy] {msg}", file=sys.stderr, flush=True)


def _fit_layers(
    mlps: list[nn.Module], xs: list[Tensor], config: MoefyConfig, act: str, verbose: bool = False
) -> dict[str, Tensor]:
    """Per layer: shared units, expert groups and (linear) router from calibration inputs."""
    from transformers.activations import ACT2FN

    gen = torch.Generator().manual_seed(config.seed)
    subset = torch.randperm(xs[0].shape[0], generator=gen)[: config.profile_tokens]
    tensors: dict[str, Tensor] = {}
    for i, (mlp, x) in enumerate(zip(mlps, xs, strict=True)):
        _log(verbose, f"layer {i}: grouping units")
        w = {
            n: getattr(mlp, n).weight.detach().float().cpu()
            for n in ("gate_proj", "up_proj", "down_proj")
        }
        xp = x[subset]
        hidden = ACT2FN[act](xp @ w["gate_proj"].T) * (xp @ w["up_proj"].T)
        shared, groups = group_units(
            hidden,
            w["down_proj"].norm(dim=0),
            config.n_experts,
            config.n_shared,
            config.kmeans_iters,
            gen,
        )
        tensors[f"layers.{i}.shared_ids"] = shared
        tensors[f"layers.{i}.unit_ids"] = groups
        if config.router == "linear":
            experts = MoefiedExperts(config.n_experts, x.shape[1], groups.shape[1], act)
            with torch.no_grad():
                experts.gate_up_proj.copy_(
                    torch.cat([w["gate_proj"][groups], w["up_proj"][groups]], 1)
                )
                experts.down_proj.copy_(w["down_proj"][:, groups].permute(1, 0, 2))
                target = torch.cat([experts.output_norms(experts.hidden(c)) for c in x.split(4096)])
            rw, rb = fit_linear_router(x, target, config.ridge)
            tensors[f"layers.{i}.router.weight"], tensors[f"layers.{i}.router.bias"] = rw, rb
    return tensors


def moefy(
    model: Any,
    config: MoefyConfig = MoefyConfig(),
    *,
    texts: Sequence[str] | None = None,
    held_out: Sequence[str] | None = None,
    agreement_ks: Sequence[int] = AGREEMENT_KS,
    source: str | None = None,
    verbose: bool = False,
) -> Any:
    """MoEfy a dense llama-style ``HookedModel`` in place; returns a new MoE ``HookedModel``.

    Args:
        model: a dense HF-backed ``HookedModel`` (its MLP modules are replaced;
            pass a copy to keep the dense model).
        config: grouping, router and calibration settings.
        texts: calibration documents (default: the shipped calibration split,
            with the model's own answers to its prompts).
        held_out: documents for the agreement measurement (default: the
            shipped held-out split, answered the same way).
        agreement_ks: the ``k`` values whose next-token agreement is measured
            (those < ``n_experts``, plus ``n_experts`` itself as the exactness
            check); stored in ``config.moefy["agreement"]``.
        source: name of the dense model, kept in the metadata.
    """
    hf = model.model
    tok = model.tokenizer
    mlps = _gated_mlps(hf)
    if texts is None:
        _log(verbose, "sampling the model's answers to the calibration prompts")
        texts = _documents(
            model, calibration_data("calibration"), config.answer_tokens, config.seed
        )
    if held_out is None:
        held_out = _documents(
            model, calibration_data("held_out"), config.answer_tokens, config.seed + 1
        )
    calib = _batches(tok, texts, config.max_length)
    evals = _batches(tok, held_out, config.max_length)
    _log(verbose, f"collecting MLP inputs on {len(texts)} calibration documents")
    xs = _mlp_inputs(hf, mlps, calib)
    n_tokens = xs[0].shape[0]
    dense_preds = _predictions(hf, evals) if evals else []
    tensors = _fit_layers(mlps, xs, config, getattr(hf.config, "hidden_act", "silu"), verbose)
    n_units = mlps[0].gate_proj.weight.shape[0]
    state = {
        "top_k": config.top_k,
        "moefy": {
            "version": FORMAT_VERSION,
            "source": source,
            "layers": list(range(len(mlps))),
            "n_experts": config.n_experts,
            "n_shared": config.n_shared,
            "expert_size": (n_units - config.n_shared) // config.n_experts,
            "n_units": n_units,
            "router": config.router,
            "selection": "top-k of router logits, weight 1 per selected group",
            "config": dataclasses.asdict(config),
            "calibration": {"documents": len(texts), "tokens": n_tokens},
            "held_out": {
                "documents": len(held_out),
                "tokens": sum(d.numel() for d in dense_preds),
            },
            "agreement": {},
        },
    }
    _install(hf, state, tensors)
    ks = sorted({k for k in agreement_ks if 1 <= k < config.n_experts} | {config.n_experts})
    if dense_preds and ks:
        _log(verbose, f"measuring next-token agreement for k in {ks}")
        agree = _agreement(hf, evals, dense_preds, ks)
        hf.config.moefy["agreement"] = {str(k): round(v, 4) for k, v in agree.items()}
    return _wrap(hf, tok)


# ---------------------------------------------------------------------------
# Persistence and access


def save(model: Any, directory: str | os.PathLike[str]) -> Path:
    """Write a MoEfied model's grouping/router tensors and metadata (atomic folder rename)."""
    from safetensors.torch import save_file

    meta = info(model)
    tensors = _state_tensors(model)
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp / "moefy.safetensors")
        state = {"top_k": int(model.cfg.experts_per_token), "moefy": meta}
        (tmp / "moefy.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _state_tensors(model: Any) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for i, block in enumerate(_blocks(model)):
        out[f"layers.{i}.unit_ids"] = block.experts.unit_ids.detach().cpu()
        shared = block.shared_experts
        out[f"layers.{i}.shared_ids"] = (
            shared.unit_ids.detach().cpu()
            if shared is not None
            else torch.zeros(0, dtype=torch.long)
        )
        if block.gate.kind == "linear":
            out[f"layers.{i}.router.weight"] = block.gate.weight.detach().float().cpu()
            out[f"layers.{i}.router.bias"] = block.gate.bias.detach().float().cpu()
    return out


def load_state(model: Any, directory: str | os.PathLike[str], top_k: int | None = None) -> Any:
    """Apply a saved MoEfication to the dense ``model`` (in place); returns the MoE model."""
    from safetensors.torch import load_file

    directory = Path(directory)
    state = json.loads((directory / "moefy.json").read_text(encoding="utf-8"))
    tensors = load_file(str(directory / "moefy.safetensors"))
    if top_k is not None:
        state["top_k"] = int(top_k)
    _install(model.model, state, tensors)
    return _wrap(model.model, model.tokenizer)


def info(model: Any) -> dict[str, Any]:
    """The MoEfication metadata of a model (settings, calibration sizes, agreement)."""
    from interp.adapters.hf import unwrap

    hf = getattr(model, "model", model)
    meta = getattr(unwrap(hf).config, "moefy", None)
    if not meta:
        raise ValueError("this model is not MoEfied (its config has no 'moefy' entry)")
    return meta


def agreement(model: Any = NAME) -> dict[int, float]:
    """Held-out greedy next-token agreement with the dense model, per ``k``.

    ``model``: a MoEfied model, or the embedded name (read from the cache
    without loading anything; raises ``FileNotFoundError`` before the first
    ``interp.load(NAME)``).
    """
    if isinstance(model, str):
        from interp.models import cache_dir

        path = cache_dir() / model / "moefy.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; run interp.load({model!r}) first")
        meta = json.loads(path.read_text(encoding="utf-8"))["moefy"]
    else:
        meta = info(model)
    return {int(k): float(v) for k, v in meta["agreement"].items()}


def set_top_k(model: Any, k: int) -> Any:
    """Route every MoEfied layer to ``k`` groups; returns a fresh ``HookedModel`` wrapper
    (the old wrapper caches the previous rule: stop using it)."""
    meta = info(model)
    if not 1 <= k <= meta["n_experts"]:
        raise ValueError(f"k must be in [1, {meta['n_experts']}], got {k}")
    for block in _blocks(model):
        block.gate.set_top_k(k)
    from interp.adapters.hf import unwrap

    unwrap(model.model).config.num_experts_per_tok = k
    return _wrap(model.model, model.tokenizer)


def load(
    name: str = NAME,
    *,
    top_k: int | None = None,
    config: MoefyConfig | None = None,
    rebuild: bool = False,
    dtype: Any = None,
    device: Any = None,
    device_map: Any = None,
) -> Any:
    """The embedded MoEfied model: built once from ``SOURCE`` and cached, then loaded.

    ``top_k`` overrides the cached default; ``config`` and ``rebuild`` rebuild
    the cache (a different config is only used when rebuilding).
    """
    from interp.models import cache_dir
    from interp.models import load as load_model

    if name != NAME:
        raise ValueError(f"unknown MoEfied model {name!r}; available: {NAME!r}")
    target = cache_dir() / name
    fresh = (target / "moefy.json").exists() and not rebuild
    if fresh:
        version = json.loads((target / "moefy.json").read_text(encoding="utf-8"))["moefy"]
        fresh = version.get("version") == FORMAT_VERSION
    if not fresh:
        dense = load_model(SOURCE, dtype=torch.float32, device=device)
        _log(True, f"building {name} from {SOURCE} once (cached under {target})")
        moe = moefy(dense, config or MoefyConfig(), source=SOURCE, verbose=True)
        save(moe, target)
    dense = load_model(SOURCE, dtype=dtype, device=device, device_map=device_map)
    return load_state(dense, target, top_k=top_k)
