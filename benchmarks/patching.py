"""Patching on the embedded model: activation patching of ``hook_resid_pre`` over layers ×
positions (1×32 tokens) by ``interp.patching`` vs TransformerLens's
``patching.get_act_patch_resid_pre`` on the same weights as a ``TransformerBridge``;
attribution patching's wall time as a ratio of activation patching's; and how well
attribution patching ranks the sites activation patching finds (Spearman over all
(layer, position) sites of ``hook_resid_pre`` and all (layer, head) sites of
``attn.hook_z``, plus AtP* variants: GradDrop on the positions, the QK fix on query heads).

    python benchmarks/patching.py [--device cpu] [--rounds 5] [--tokens 32] [--quick]
        [--model NAME] [--sites-per-forward 16] [--out FILE]

Both activation-patching variants include what a user runs: the clean run's cache
(TransformerLens's ``run_with_cache``; interp captures clean and corrupted runs itself) and
one patched forward per site (TransformerLens) or per ``--sites-per-forward`` sites
(interp, stacked along the batch axis). The metric is the logit difference between the
clean and the corrupted answer at the last token.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness

from interp import patching
from interp.stats import spearman

TARGET = 1.0  # interp activation patching / TransformerLens: no slower
FACTS = (
    "Facts. The Eiffel Tower is in Paris. The Colosseum is in Rome. Big Ben is in London. "
    "The Prado is in Madrid. The Brandenburg Gate is in Berlin. "
)
CLEAN, CORRUPTED = ("Spain", " Madrid"), ("Italy", " Rome")


def prompts(model, tokens: int, device: str):
    """Clean / corrupted ids of ``tokens`` tokens differing in the country; answer ids."""
    tok = model.tokenizer

    def ids(country: str) -> torch.Tensor:
        text = FACTS * 4 + f"The capital of {country} is"
        return torch.tensor(tok(text, add_special_tokens=False)["input_ids"][-tokens:])

    clean, corrupted = ids(CLEAN[0]), ids(CORRUPTED[0])
    if clean.shape != corrupted.shape or len(clean) < tokens:
        raise SystemExit(f"prompts do not tokenize to {tokens} tokens each")
    a, b = (tok(x, add_special_tokens=False)["input_ids"] for x in (CLEAN[1], CORRUPTED[1]))
    i = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    return clean[None].to(device), corrupted[None].to(device), (a[i], b[i])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sites-per-forward", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="2 rounds, no extra warm-up")
    p.add_argument("--no-peers", action="store_true", help="skip TransformerLens")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    warmup = 1
    if args.quick:  # the agreement and rank-correlation runs before the timing warm up
        args.rounds, warmup = min(args.rounds, 2), 0
    torch.manual_seed(0)
    machine = harness.machine_info()
    model = harness.load_model(args.model, device=args.device)
    clean, corrupted, (a_clean, a_corr) = prompts(model, args.tokens, args.device)

    def metric(logits, batch=None):
        return logits[:, -1, a_clean] - logits[:, -1, a_corr]

    spf = args.sites_per_forward
    sweep = patching.layers_x_positions("hook_resid_pre")

    def interp_act():
        return patching.activation_patching(
            model, clean, corrupted, metric, sweep, sites_per_forward=spf, progress=False
        )

    def interp_atp():
        return patching.attribution_patching(model, clean, corrupted, metric, sweep)

    variants = {"interp activation patching": interp_act, "interp attribution patching": interp_atp}
    bridge = None
    if not args.no_peers:
        from transformer_lens import patching as tl_patching
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(
            args.model,
            hf_model=copy.deepcopy(model.model),
            tokenizer=copy.deepcopy(model.tokenizer),
        )

        def tl_act():
            with torch.no_grad():
                _, cache = bridge.run_with_cache(clean)
                return tl_patching.get_act_patch_resid_pre(
                    bridge, corrupted, cache, lambda logits: metric(logits).mean()
                )

        variants["TransformerLens get_act_patch_resid_pre (Bridge)"] = tl_act

    # Agreement and rank correlations (outside the timed rounds).
    act = interp_act()
    atp = interp_atp()
    results: dict = {
        "benchmark": "patching",
        "machine": machine,
        "device": args.device,
        "model": args.model,
        "size": f"1x{args.tokens}",
        "sites_per_forward": spf,
        "n_sites": {"layers_x_positions": int(act.values.numel())},
        "metric": {"clean": act.clean_metric.item(), "corrupted": act.corrupted_metric.item()},
    }
    if bridge is not None:
        tl_values = variants["TransformerLens get_act_patch_resid_pre (Bridge)"]()
        results["max_abs_diff_vs_transformer_lens"] = (act.values - tl_values).abs().max().item()
    heads = patching.layers_x_heads("attn.hook_z")
    act_h = patching.activation_patching(
        model, clean, corrupted, metric, heads, sites_per_forward=spf, progress=False
    )
    atp_h = patching.attribution_patching(model, clean, corrupted, metric, heads)
    gd = patching.attribution_patching(model, clean, corrupted, metric, sweep, graddrop=True)
    q_heads = patching.layers_x_heads("attn.hook_q")
    act_q = patching.activation_patching(
        model, clean, corrupted, metric, q_heads, sites_per_forward=spf, progress=False
    )
    atp_q = patching.attribution_patching(model, clean, corrupted, metric, q_heads)
    qk_q = patching.attribution_patching(model, clean, corrupted, metric, q_heads, qk_fix=True)

    def rho(a, b, start: int = 0) -> float:
        return float(spearman(a.effect[:, start:].flatten(), b.effect[:, start:].flatten()))

    # Columns before the first corrupted token patch nothing: they tie at 0 in both, so the
    # rank correlation is also given over the sites the corruption can reach.
    first = int((clean != corrupted)[0].nonzero().min())
    results["spearman"] = {
        "AtP vs activation, (layer, position) of hook_resid_pre": rho(atp, act),
        "AtP vs activation, (layer, position) from the first corrupted token on": rho(
            atp, act, first
        ),
        "AtP+GradDrop vs activation, (layer, position)": rho(gd, act),
        "AtP vs activation, (layer, head) of attn.hook_z": rho(atp_h, act_h),
        "AtP vs activation, (layer, head) of attn.hook_q": rho(atp_q, act_q),
        "AtP+QK fix vs activation, (layer, head) of attn.hook_q": rho(qk_q, act_q),
    }
    results["n_sites"]["layers_x_heads"] = int(act_h.values.numel())

    sync = harness.sync_for(args.device)
    baseline = "TransformerLens get_act_patch_resid_pre (Bridge)" if bridge else None
    baseline = baseline or "interp activation patching"
    print(f"1x{args.tokens}: {len(variants)} variants × {args.rounds} rounds …", flush=True)
    timing = harness.interleaved(variants, baseline, rounds=args.rounds, warmup=warmup, sync=sync)
    act_t = timing["interp activation patching"]["times_s"]
    atp_t = timing["interp attribution patching"]["times_s"]
    ratios = [b / a for a, b in zip(act_t, atp_t, strict=True)]
    atp_vs_act = {
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_ci95": list(harness.bootstrap_median_ci(ratios)),
        "rounds": args.rounds,
    }
    results["timing"] = timing
    results["attribution_vs_activation"] = atp_vs_act
    harness.finish(machine)
    rows = [
        [name, f"{r['median_s']:.2f} s", harness.fmt_ratio(r) if bridge else ""]
        for name, r in timing.items()
    ]
    rows.append(["attribution / activation patching (interp)", "", harness.fmt_ratio(atp_vs_act)])
    notes = []
    if bridge:
        r = timing["interp activation patching"]
        verdict = harness.judge(r, TARGET)
        results["target"] = {
            "interp_vs_transformer_lens_max_ratio": TARGET,
            "judged_on": "median per-round ratio",
            "met": r["ratio"] <= TARGET,
            "verdict": verdict,
        }
        notes.append(
            f"- target interp activation patching ≤ {TARGET}× TransformerLens: {verdict}; "
            f"max |interp − TransformerLens| over the sweep "
            f"{results['max_abs_diff_vs_transformer_lens']:.2e}"
        )
    notes += [f"- Spearman {k}: {v:.3f}" for k, v in results["spearman"].items()]
    notes.append(
        f"- {results['n_sites']['layers_x_positions']} (layer, position) sites, "
        f"{results['n_sites']['layers_x_heads']} (layer, head) sites; metric clean "
        f"{results['metric']['clean']:.3f}, corrupted {results['metric']['corrupted']:.3f}"
    )
    header = ["variant", "median", "ratio to TransformerLens [bootstrap 95% CI] (min–max)"]
    harness.publish(
        "patching",
        results,
        rows,
        header,
        ["\n".join(notes), harness.load_line(machine)],
        intro=(
            f"Layers × positions of `hook_resid_pre`, 1×{args.tokens} tokens, "
            f"{spf} sites per forward (interp), {args.rounds} interleaved rounds."
        ),
        out=args.out,
    )
    return results


if __name__ == "__main__":
    main()
