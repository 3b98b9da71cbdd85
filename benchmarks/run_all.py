"""Run every benchmark suite in turn (``make bench``); each prints its table and writes
``benchmarks/results/<suite>.json``. Then write the combined table of all committed results
to ``benchmarks/results/summary.md`` (and ``summary.json``, which the docs page renders).

    python benchmarks/run_all.py [--device cuda] [--quick] [--only a,b] [--skip a,b]
        [--summary-only] [--out-dir DIR] [extra args passed to every suite]

``--quick`` is passed to every suite (fewer rounds; for ``sae_throughput.py``, which has no
such flag, it becomes ``--steps 5 --warmup 1``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

RESULTS = HERE / "results"
SUITES = [
    "hook_overhead",
    "grad_capture",
    "steering",
    "router_tracing",
    "memory",
    "scaling",
    "sae_throughput",
    "workbench",
    "patching",
    "data_parallel",
]
QUICK = {"sae_throughput": ["--steps", "5", "--warmup", "1"]}


def _ci(r: dict) -> str:
    ci = r.get("ratio_ci95")
    return f"{r['ratio']:.3f}× [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{r['ratio']:.3f}×"


def _load(machine: dict | None) -> str:
    if not machine:
        return "n/a"
    a = machine.get("loadavg_start") or machine.get("load_average_at_start")
    b = machine.get("loadavg_end")
    fmt = lambda x: f"{x[0]:.2f}" if x else "?"  # noqa: E731
    return f"{fmt(a)} → {fmt(b)}" if b else fmt(a)


def _variants(group: dict) -> dict:
    """The timing entries of a group (``_memory``, ``_trace`` … are not variants)."""
    return {
        k: v
        for k, v in group.items()
        if not k.startswith("_") and isinstance(v, dict) and "median_s" in v and "ratio" in v
    }


def summary_rows(results_dir: Path = RESULTS) -> list[list[str]]:
    """One row per headline number of every results file present."""
    rows: list[list[str]] = []

    def read(name: str) -> dict | None:
        path = results_dir / f"{name}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def add(suite, size, what, result, target="", verdict="", load=""):
        rows.append([suite, size, what, result, target, verdict, load])

    def per_size(suite: str, d: dict, target_key: str, is_target, key: str = "sizes") -> None:
        """Rows of a suite timed per batch×tokens size against a bare forward; the variants
        ``is_target`` accepts carry the target and its verdict."""
        load, tgt = _load(d.get("machine")), d.get("target", {})
        t = tgt.get(target_key)
        for size, group in d.get(key, {}).items():
            for name, r in _variants(group).items():
                if name == "bare forward":
                    continue
                mine = is_target(name)
                verdict = (tgt.get("verdicts") or {}).get(size, "") if mine else ""
                if mine and not verdict and t:
                    verdict = harness.judge(r, t)
                target = f"≤ {t}×" if mine and t else ""
                add(suite, size, f"{name} / bare forward", _ci(r), target, verdict, load)

    if d := read("hook_overhead"):
        per_size("hook_overhead", d, "interp_capture_max_ratio", lambda n: n == "interp capture")
        per_size("hook_overhead", d, "", lambda n: False, key="pattern_sizes")
    if d := read("grad_capture"):
        load, t = _load(d.get("machine")), d.get("target", {}).get("max_ratio")
        key = "interp capture_grads (1 position, all layers)"
        r = d.get("vs_forward_backward", {}).get(key)
        if r:
            verdict = harness.judge(r, t) if t else ""
            add(
                "grad_capture",
                d.get("size", ""),
                "capture_grads / fwd+bwd",
                _ci(r),
                f"≤ {t}×" if t else "",
                verdict,
                load,
            )
        r = d.get("vs_activations_only", {}).get(key)
        if r:
            add(
                "grad_capture",
                d.get("size", ""),
                "capture_grads / fwd+bwd (activations only)",
                _ci(r),
                load=load,
            )
    if d := read("steering"):
        load = _load(d.get("machine"))
        size = f"{d.get('prompt_tokens')}+{d.get('new_tokens')} tokens"
        for name, r in _variants(d.get("results", {})).items():
            if name != "bare generate":
                add("steering", size, f"{name} / bare generate", _ci(r), load=load)
    if d := read("router_tracing"):
        per_size(
            "router_tracing",
            d,
            "trace_max_ratio",
            lambda n: n.startswith("moe.trace") and "with logits" in n,
        )
    if d := read("memory"):
        load = _load(d.get("machine"))
        for size, per in d.get("sizes", {}).items():
            bare = per.get("bare forward", {}).get("peak_bytes")
            for name, r in per.items():
                if name == "bare forward":
                    add("memory", size, "peak, bare forward", f"{bare / 2**20:.1f} MiB", load=load)
                    continue
                extra = r.get("extra_peak_over_bare_bytes", 0)
                stored = r.get("stored_bytes") or 0
                add(
                    "memory",
                    size,
                    f"extra peak over bare, {name}",
                    f"{extra / 2**20:+.1f} MiB (cache tensors {stored / 2**20:.1f} MiB)",
                    load=load,
                )
    if d := read("scaling"):
        load = _load(d.get("machine"))
        for size, group in d.get("sizes", {}).items():
            for name, r in _variants(group).items():
                if name != "bare forward":
                    add("scaling", size, f"{name} / bare forward", _ci(r), load=load)
    if d := read("sae_throughput"):
        load = _load(d.get("machine"))
        sp, cfg = d.get("speedup", {}), d.get("config", {})
        size = f"d_sae {cfg.get('d_sae')}, k {cfg.get('k')}, batch {cfg.get('batch')}"
        if sp:
            add(
                "sae_throughput",
                size,
                "interp.sae.train speed / SAELens step",
                f"{sp['median']:.2f}× ({sp['min']:.2f}–{sp['max']:.2f})",
                load=load,
            )
        target = d.get("target", {})
        for peer, r in d.get("peers", {}).items():
            sr = r.get("speed_ratio")
            if peer.startswith("sparsify") and sr:
                verdict = "met" if target.get("speed_met") else "not met"
                ratio = f"{sr['median']:.2f}× ({sr['min']:.2f}–{sr['max']:.2f})"
                add("sae_throughput", size, f"interp speed / {peer}", ratio, "≥ 2×", verdict, load)
        peers = {"interp": d.get("interp", {}), **d.get("peers", {})}
        for lib, r in peers.items():
            for tokens, fvu in r.get("fvu_held_out_by_tokens", {}).items():
                add(
                    "sae_throughput",
                    size,
                    f"held-out FVU after {int(tokens):,} tokens, {lib}",
                    f"{fvu:.4f}",
                    load=load,
                )
    if d := read("workbench"):
        load, t = _load(d.get("machine")), d.get("target", {}).get("generate_max_time_ratio")
        for group in ("generate", "capture", "score"):
            g = d.get(group) or {}
            size = f"{g.get('texts')} texts, batch {g.get('batch_size')}"
            if group == "generate":
                size = f"{g.get('prompts')}×{g.get('new_tokens')} new tokens, batch {g.get('batch_size')}"
            for what, r in g.get("pairs", {}).items():
                if group == "generate" and t:
                    add(
                        "workbench",
                        size,
                        f"{what} (time)",
                        _ci(r),
                        f"≤ {t}×",
                        harness.judge(r, t),
                        load,
                    )
                else:
                    add("workbench", size, f"{what} (time)", _ci(r), load=load)
    if d := read("workbench_generate"):  # the generate group alone, more rounds
        load, t = _load(d.get("machine")), d.get("target", {}).get("generate_max_time_ratio")
        g = d.get("generate") or {}
        size = f"{g.get('prompts')}×{g.get('new_tokens')} new tokens, batch {g.get('batch_size')}"
        clock = d.get("generate_clock", "wall")
        for what, r in g.get("pairs", {}).items():
            verdict = harness.judge(r, t) if t else ""
            add(
                "workbench",
                size,
                f"{what} ({clock} time, {r['rounds']} rounds)",
                _ci(r),
                f"≤ {t}×" if t else "",
                verdict,
                load,
            )
    if d := read("patching"):
        load, size, tgt = _load(d.get("machine")), d.get("size", ""), d.get("target", {})
        r = d.get("timing", {}).get("interp activation patching")
        if r and tgt:
            t = tgt.get("interp_vs_transformer_lens_max_ratio")
            what = "interp activation patching / TransformerLens get_act_patch_resid_pre"
            add("patching", size, what, _ci(r), f"≤ {t}×", tgt.get("verdict", ""), load)
        if r := d.get("attribution_vs_activation"):
            add("patching", size, "attribution / activation patching (interp)", _ci(r), load=load)
        for what, rho in d.get("spearman", {}).items():
            add("patching", size, f"Spearman {what}", f"{rho:.3f}", load=load)
    if d := read("data_parallel"):
        load, procs = _load(d.get("machine")), d.get("procs")
        for what, r in d.get("results", {}).items():
            add(
                "data_parallel",
                f"{procs} processes × 1 thread vs 1 × {procs}",
                f"{what}: {r['unit']}/s, torchrun / one process",
                f"{r['speedup']:.2f}× ({r['speedup_min']:.2f}–{r['speedup_max']:.2f})",
                load=load,
            )
    return rows


HEADER = ["suite", "size", "measurement", "result", "target", "verdict", "load avg 1-min"]


def write_summary(results_dir: Path = RESULTS) -> Path:
    rows = summary_rows(results_dir)
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    table = "\n".join(lines)
    intro = (
        "Ratios are medians of per-round ratios to the baseline with a seeded bootstrap 95% "
        "interval in brackets; targets are judged on the median. Load average: 1-minute "
        "value at the start → end of each suite (it counts the suite's own threads, so ≈2 "
        "on a quiet 2-core machine). Generated by `benchmarks/run_all.py` from "
        "`benchmarks/results/*.json`."
    )
    md = f"# Benchmark summary\n\n{intro}\n\n{table}\n"
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "summary.md"
    path.write_text(md, encoding="utf-8")
    payload = {"benchmark": "Summary (all suites)", "markdown": [intro, table]}
    (results_dir / "summary.json").write_text(
        json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    )
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="", help="comma-separated suite names")
    p.add_argument("--skip", default="", help="comma-separated suite names")
    p.add_argument("--summary-only", action="store_true", help="only rewrite summary.md")
    p.add_argument(
        "--out-dir", default=None, help="write JSON and summary there (default: results/)"
    )
    args, extra = p.parse_known_args(argv)
    only = [s for s in args.only.split(",") if s]
    skip = {s for s in args.skip.split(",") if s}
    suites = [s for s in (only or SUITES) if s not in skip]
    failed, took = [], {}
    for suite in [] if args.summary_only else suites:
        cmd = [sys.executable, str(HERE / f"{suite}.py"), *extra]
        if args.device:
            cmd += ["--device", args.device]
        if args.quick:
            cmd += QUICK.get(suite, ["--quick"])
        if args.out_dir:
            cmd += ["--out", str(Path(args.out_dir).resolve() / f"{suite}.json")]
        print(f"\n=== {suite} ===", flush=True)
        t0 = time.perf_counter()
        if subprocess.call(cmd, cwd=HERE.parent) != 0:
            failed.append(suite)
        took[suite] = time.perf_counter() - t0
    for suite, s in took.items():
        print(f"{suite}: {s / 60:.1f} min")
    print(f"wrote {write_summary(Path(args.out_dir) if args.out_dir else RESULTS)}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
