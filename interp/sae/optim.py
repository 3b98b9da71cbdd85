"""Schedule-free SignSGD: the optimizer EleutherAI's ``sparsify`` trains TopK SAEs with.

SignSGD (Bernstein et al. 2018, arXiv:1802.04434) moves every parameter by
``lr · sign(gradient)``: steepest descent in the L∞ norm. Schedule-free averaging
(Defazio et al. 2024, "The Road Less Scheduled", arXiv:2405.15682) keeps three sequences
per parameter and needs no learning-rate decay:

    z_{t+1} = z_t − lr_t · sign(∇f(y_t))                 (the base SignSGD iterate)
    c_{t+1} = w_{t+1} / Σ_{i≤t+1} w_i,  w_t = lr_max,t ** weight_lr_power
    x_{t+1} = (1 − c_{t+1}) · x_t + c_{t+1} · z_{t+1}      (weighted average of the z's)
    y_{t+1} = (1 − β) · z_{t+1} + β · x_{t+1}            (where the gradient is taken)

with momentum β (0.95 in sparsify) and x_0 = z_0 = y_0 the initial parameters.

The *averaged* x is the model to evaluate and export; y is only where gradients are
taken. As in ``schedulefree.ScheduleFreeWrapper`` (which sparsify uses), the parameters
hold y while the optimizer is in train mode and x after ``eval()``; the state holds z
(x is recovered as (y − (1 − β)·z) / β). Edits made to the parameters between steps
(sparsify's decoder renormalization, dead-latent resampling) are therefore edits of y,
exactly as in sparsify. ``step`` raises in eval mode; ``state_dict`` records the mode.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from interp.sae.functional import _blocks

__all__ = ["ScheduleFreeSignSGD"]


class ScheduleFreeSignSGD(torch.optim.Optimizer):
    """Schedule-free SignSGD. Starts in train mode (parameters = y); call ``eval()`` to
    put the averaged x into the parameters and ``train()`` to go back.

    Args:
        params: parameters or parameter groups.
        lr: step size of the sign update (sparsify: 5e-3 / sqrt(d_sae / 2**14)).
        momentum: β, the interpolation between the average x and the iterate z.
        weight_lr_power: averaging weight of a step is ``lr_max ** weight_lr_power``
            (``lr_max``: the largest lr so far), so warm-up steps count less.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.95,
        weight_lr_power: float = 2.0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 < momentum < 1:
            raise ValueError(f"momentum must be in (0, 1), got {momentum}")
        if not weight_lr_power >= 0:
            raise ValueError(f"weight_lr_power must be ≥ 0, got {weight_lr_power}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_lr_power": weight_lr_power,
            "k": 0,
            "lr_max": 0.0,
            "weight_sum": 0.0,
            "train_mode": True,
        }
        super().__init__(params, defaults)

    @property
    def train_mode(self) -> bool:
        return bool(self.param_groups[0]["train_mode"])

    @torch.no_grad()
    def eval(self) -> None:
        """Parameters y → x (the average): what to evaluate, save and export."""
        for group in self.param_groups:
            if group["train_mode"]:
                beta = group["momentum"]
                for p in group["params"]:
                    z = self.state[p].get("z")
                    if z is not None:
                        p.lerp_(z, 1 - 1 / beta)  # x = (y − (1 − β) z) / β
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Parameters x → y (where gradients are taken)."""
        for group in self.param_groups:
            if not group["train_mode"]:
                beta = group["momentum"]
                for p in group["params"]:
                    z = self.state[p].get("z")
                    if z is not None:
                        p.lerp_(z, 1 - beta)  # y = β x + (1 − β) z
                group["train_mode"] = True

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        if closure is not None:
            raise ValueError("ScheduleFreeSignSGD.step takes no closure")
        for group in self.param_groups:
            if not group["train_mode"]:
                raise RuntimeError(
                    "ScheduleFreeSignSGD.step called in eval mode (parameters hold the "
                    "average x); call .train() first"
                )
            lr, beta = group["lr"], group["momentum"]
            group["lr_max"] = lr_max = max(lr, group["lr_max"])
            weight = lr_max ** group["weight_lr_power"]
            group["weight_sum"] = weight_sum = group["weight_sum"] + weight
            c = weight / weight_sum if weight_sum > 0 else 0.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "z" not in state:
                    state["z"] = p.detach().clone()
                # Block by block (elementwise, so the result does not depend on blocking):
                # the four passes then read each block of grad, z and y from cache.
                for g, z, y in _blocks(p.grad, state["z"], p):
                    sign = g.sign()
                    z.add_(sign, alpha=-lr)
                    # y' = β x' + (1 − β) z' with x' = (1 − c) x + c z', x = (y − (1 − β) z)
                    # / β and z = z' + lr·sign reduce to one update of y, in place:
                    y.lerp_(z, c).add_(sign, alpha=-(1 - c) * (1 - beta) * lr)
            group["k"] += 1
        return None

    @torch.no_grad()
    def set_state_(self, p: Tensor, index: Any) -> None:
        """Make z equal the parameter at ``index`` (after the caller overwrote those
        entries of y, e.g. resampled latents): then x = y = z there."""
        z = self.state.get(p, {}).get("z")
        if z is not None:
            z[index] = p.detach()[index]
