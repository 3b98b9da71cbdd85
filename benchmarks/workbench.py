"""The workbench loops (``interp.runs``) against the loops they replace, on the embedded
model:

* ``runs.generate`` vs a plain ``model.model.generate`` loop over the same prompts: same
  batches (prompts sorted by length, as ``runs.generate`` sorts them), left padding,
  greedy, ``max_new_tokens = min_new_tokens`` so EOS cannot end a row early and every row
  gets the same number of tokens; tokenizing and decoding are inside both loops. Without
  and with a steering hook (``add_direction`` at one layer; ``model.hooks`` around the
  plain loop, ``hooks=`` for ``runs.generate``). Target: ``runs.generate`` ≥ 0.98× the
  plain loop's tokens/s, i.e. a time ratio ≤ 1/0.98.
* ``runs.capture_dataset`` (every token of ``hook_resid_post`` at one layer) vs a plain
  loop of right-padded forward passes with a torch forward hook on that decoder layer
  keeping the real tokens' rows (a full forward, and one stopped after the layer by an
  exception), and vs SAELens's ``ActivationsStore`` on the same texts through its Hugging
  Face path (``HookedProxyLM`` over a copy of the same model: it packs the texts into
  ``--context``-token windows and stops after the layer); one epoch of
  ``get_filtered_llm_batch``, without its shuffling buffer. The store's windows hold a
  different number of tokens, so its comparison is per token. An extra variant runs
  ``capture_dataset`` in input order (``length_window=1``): what its default sorting by
  length within windows saves in padding.
* ``runs.score`` (per-token log-probabilities, per-example mean NLL) vs a naive loop (one
  forward + float32 log-softmax per example) and a plain batched loop.

Every group checks that the variants compute the same thing (same generated tokens, same
activations, same NLL) before timing them.

    python benchmarks/workbench.py [--device cpu] [--rounds 15] [--quick] [--model NAME]
        [--prompts 16] [--texts 32] [--batch-size 8] [--new-tokens 32] [--context 128]
        [--no-saelens] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import harness

import interp
from interp import runs
from interp.interventions import add_direction
from interp.runs._rows import _pad_id
from interp.runs.generation import _eos_ids

CONTRAST = ["I love weddings, brides and grooms.", "I like the weather today."]
GEN_TARGET = round(1 / 0.98, 4)  # time ratio ≤ 1.0204 ⇔ tokens/s ≥ 0.98× the plain loop


class _Stop(Exception):
    pass


def pair(res: dict, name: str, base: str, per: dict[str, int] | None = None) -> dict:
    """Median per-round ratio of ``name`` to ``base`` (per token when ``per`` gives each
    variant's token count), with min–max and the seeded bootstrap 95% interval."""
    scale = (per[name] / per[base]) if per else 1.0
    ratios = [
        t / b / scale for t, b in zip(res[name]["times_s"], res[base]["times_s"], strict=True)
    ]
    return {
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_ci95": list(harness.bootstrap_median_ci(ratios)),
        "rounds": len(ratios),
        "of": name,
        "to": base,
        "per_token": bool(per),
    }


# ---- generate ---------------------------------------------------------------------------------
def generate_group(model, args, layer: int, sync) -> dict:
    tok = model.tokenizer
    prompts = harness.calibration_texts("prompt", args.prompts)
    # runs.generate sorts prompts by length (longest first, stable): give the plain loop
    # the same order so both run the same batches.
    prompts = sorted(prompts, key=lambda p: -len(tok(p)["input_ids"]))
    name = f"blocks.{layer}.hook_resid_post"
    with torch.no_grad():
        cache = interp.capture(model, CONTRAST, name)
    mask = interp.positions.as_batch(model, CONTRAST).attention_mask.to(model.device)
    a = cache[name]
    means = (a * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    hooks = [(name, add_direction((means[0] - means[1]).detach(), scale=args.scale))]
    eos = _eos_ids(model)
    pad = _pad_id(model)
    n, bs = args.new_tokens, args.batch_size
    gen = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": pad}
    if eos:
        gen["eos_token_id"] = eos

    def plain():
        out = []
        for s in range(0, len(prompts), bs):
            enc = tok(prompts[s : s + bs], padding=True, padding_side="left", return_tensors="pt")
            enc = enc.to(model.device)
            ids = model.model.generate(**enc, **gen)
            new = ids[:, enc["input_ids"].shape[1] :]
            out.extend(new.cpu().tolist())
            tok.batch_decode(new, skip_special_tokens=True)
        return out

    def plain_steered():
        with model.hooks(fwd=hooks):
            return plain()

    def ours(h=()):
        return runs.generate(
            model,
            prompts,
            max_new_tokens=n,
            min_new_tokens=n,
            batch_size=bs,
            hooks=list(h),
            progress=False,
        )

    variants = {
        "plain generate loop": plain,
        "runs.generate": ours,
        "plain generate loop, steered": plain_steered,
        "runs.generate, steered": lambda: ours(hooks),
    }
    with torch.no_grad():
        p, g = plain(), ours()
        ps, gs = plain_steered(), ours(hooks)
    check = {
        "rows": len(prompts),
        "new_tokens_per_row": sorted({len(r) for r in [*p, *g.token_ids]}),
        "same_tokens": p == g.token_ids,
        "same_tokens_steered": ps == gs.token_ids,
        "steering_changed_tokens": ps != p,
    }
    print(f"generate: {len(prompts)} prompts × {n} new tokens, batch {bs}; {check}", flush=True)
    with torch.no_grad():
        res = harness.interleaved(
            variants, "plain generate loop", args.rounds, 2, sync, clock=args.clock
        )
    tokens = len(prompts) * n
    for r in res.values():
        r["tokens"] = tokens
        r["tokens_per_s"] = tokens / r["median_s"]
    pairs = {
        "runs.generate / plain loop": pair(res, "runs.generate", "plain generate loop"),
        "runs.generate / plain loop, steered": pair(
            res, "runs.generate, steered", "plain generate loop, steered"
        ),
    }
    for r in pairs.values():
        r["verdict"] = harness.judge(r, GEN_TARGET)
    return {
        "prompts": len(prompts),
        "batch_size": bs,
        "new_tokens": n,
        "layer": layer,
        "check": check,
        "results": res,
        "pairs": pairs,
    }


# ---- capture_dataset --------------------------------------------------------------------------
def _saelens_store(model, texts, layer, args, specials):
    """SAELens's ActivationsStore on ``texts`` through its Hugging Face path (offline: the
    model object is passed in, nothing is downloaded)."""
    from datasets import Dataset
    from sae_lens.load_model import HookedProxyLM
    from sae_lens.training.activations_store import ActivationsStore

    block = model._layers[layer]
    hook = next(n for n, m in model.model.named_modules() if m is block)  # model.layers.L
    proxy = HookedProxyLM(copy.deepcopy(model.model), model.tokenizer, hook_names=[hook])
    with warnings.catch_warnings():  # a small in-memory dataset, not pre-tokenized: expected
        warnings.simplefilter("ignore", UserWarning)
        store = ActivationsStore(
            model=proxy,
            dataset=Dataset.from_dict({"text": texts}),
            streaming=False,
            hook_name=hook,
            hook_head_index=None,
            context_size=args.context,
            d_in=model.cfg.d_model,
            n_batches_in_buffer=2,
            total_training_tokens=10**9,
            store_batch_size_prompts=args.batch_size,
            train_batch_size_tokens=4096,
            prepend_bos=False,
            normalize_activations="none",
            device=torch.device(args.device),
            dtype="float32",
            exclude_special_tokens=torch.tensor(specials, dtype=torch.long),
            sequence_separator_token=None,
        )
    return proxy, store


def _saelens_epoch(store) -> int:
    """One pass over the texts: every full batch of windows, special tokens filtered."""
    store.reset_input_dataset()
    store.iterable_sequences = store._iterate_tokenized_sequences()
    rows = 0
    while True:
        try:
            rows += store.get_filtered_llm_batch(raise_on_epoch_end=True).shape[0]
        except StopIteration:
            return rows


def capture_group(model, args, layer: int, sync) -> dict:
    tok = model.tokenizer
    texts = harness.calibration_texts("text", args.texts)
    bs = args.batch_size
    name = f"blocks.{layer}.hook_resid_post"
    block = model._layers[layer]
    specials = runs.special_ids(tok)

    def padded_tokens(items: list[str]) -> int:
        lengths = [len(tok(t)["input_ids"]) for t in items]
        return sum(
            len(lengths[s : s + bs]) * max(lengths[s : s + bs]) for s in range(0, len(items), bs)
        )

    padded = padded_tokens(texts)

    def plain(stop: bool = False):
        out = []
        for s in range(0, len(texts), bs):
            enc = tok(texts[s : s + bs], padding=True, padding_side="right", return_tensors="pt")
            enc = enc.to(model.device)
            keep = enc["attention_mask"].bool()
            for sid in specials:
                keep &= enc["input_ids"] != sid

            def hook(module, inputs, output, keep=keep):
                x = output[0] if isinstance(output, tuple) else output
                out.append(x.detach()[keep].cpu())
                if stop:
                    raise _Stop

            handle = block.register_forward_hook(hook)
            try:
                model.model(**enc)
            except _Stop:
                pass
            finally:
                handle.remove()
        return torch.cat(out)

    def ours(window: int = 16):  # 16: the default length-sorting window (batches)
        return runs.capture_dataset(
            model, texts, name, batch_size=bs, length_window=window, progress=False
        )

    by_length = sorted(texts, key=lambda t: -len(tok(t)["input_ids"]))

    variants = {
        "plain forward loop (torch hook)": plain,
        f"plain forward loop, stopped after layer {layer}": lambda: plain(stop=True),
        "runs.capture_dataset": ours,
        "runs.capture_dataset, input order (length_window=1)": lambda: ours(1),
    }
    with torch.no_grad():
        ref, mine = plain(), ours()[name]
    tokens = {v: int(ref.shape[0]) for v in variants}
    check = {
        "texts": len(texts),
        "tokens": int(ref.shape[0]),
        "padded_tokens_forwarded": padded,
        "padded_tokens_forwarded_sorted": padded_tokens(by_length),
        "rows_equal": tuple(ref.shape) == tuple(mine.shape),
        "max_abs_diff": float((ref - mine).abs().max()) if ref.shape == mine.shape else None,
    }
    saelens: dict = {"ran": False}
    proxy = None
    if not args.no_saelens:
        try:
            proxy, store = _saelens_store(model, texts, layer, args, specials)
            with torch.no_grad():
                n_rows = _saelens_epoch(store)
                # Same activations? The first window of the store vs the plain forward.
                window = store.get_batch_tokens(1)
                theirs = store.get_activations(window)[0]
                got = []
                h = block.register_forward_hook(
                    lambda m, i, o: got.append(o[0] if isinstance(o, tuple) else o)
                )
                try:
                    model.model(window.to(model.device))
                finally:
                    h.remove()
            saelens = {
                "ran": True,
                "path": "HookedProxyLM (SAELens's AutoModelForCausalLM path) over a copy of "
                "the loaded model; Dataset.from_dict of the texts",
                "context_size": args.context,
                "store_batch_size_prompts": bs,
                "tokens_per_epoch": n_rows,
                "max_abs_diff_first_window": float((got[0][0] - theirs).abs().max()),
            }
            variants["SAELens ActivationsStore"] = lambda: _saelens_epoch(store)
            tokens["SAELens ActivationsStore"] = n_rows
        except Exception as e:
            saelens = {"ran": False, "error": f"{type(e).__name__}: {e}"[:500]}
    check["saelens"] = saelens
    print(f"capture_dataset: {len(texts)} texts, batch {bs}, {name}; {check}", flush=True)
    with torch.no_grad():
        res = harness.interleaved(variants, "plain forward loop (torch hook)", args.rounds, 2, sync)
    for v, r in res.items():
        r["tokens"] = tokens[v]
        r["tokens_per_s"] = tokens[v] / r["median_s"]
    base = "plain forward loop (torch hook)"
    pairs = {
        "runs.capture_dataset / plain forward loop": pair(res, "runs.capture_dataset", base),
        "runs.capture_dataset / plain loop stopped after the layer": pair(
            res, "runs.capture_dataset", f"plain forward loop, stopped after layer {layer}"
        ),
    }
    pairs["runs.capture_dataset, length-sorted (default) / input order"] = pair(
        res, "runs.capture_dataset", "runs.capture_dataset, input order (length_window=1)"
    )
    if "SAELens ActivationsStore" in res:
        pairs["runs.capture_dataset / SAELens ActivationsStore, per token"] = pair(
            res, "runs.capture_dataset", "SAELens ActivationsStore", per=tokens
        )
    del proxy
    return {
        "texts": len(texts),
        "batch_size": bs,
        "hook": name,
        "check": check,
        "results": res,
        "pairs": pairs,
    }


# ---- score ------------------------------------------------------------------------------------
def score_group(model, args, sync) -> dict:
    tok = model.tokenizer
    texts = harness.calibration_texts("text", args.texts)
    bs = args.batch_size

    def naive():
        out = []
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"].to(model.device)
            logits = model.model(ids).logits[0, :-1]
            lp = logits.float().log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(float(-lp.mean()))
        return torch.tensor(out)

    def batched():
        out = []
        for s in range(0, len(texts), bs):
            enc = tok(texts[s : s + bs], padding=True, padding_side="right", return_tensors="pt")
            enc = enc.to(model.device)
            logits = model.model(**enc).logits[:, :-1]
            ids, m = enc["input_ids"][:, 1:], enc["attention_mask"][:, 1:].bool()
            lp = logits.float().log_softmax(-1).gather(-1, ids[..., None])[..., 0]
            out.append(-(lp * m).sum(1) / m.sum(1))
        return torch.cat(out).cpu()

    def ours():
        return runs.score(model, texts, batch_size=bs, progress=False).nll

    variants = {"naive loop": naive, "plain batched loop": batched, "runs.score": ours}
    with torch.no_grad():
        a, b, c = naive(), batched(), ours()
    tokens = sum(len(tok(t)["input_ids"]) - 1 for t in texts)
    check = {
        "texts": len(texts),
        "scored_tokens": tokens,
        "max_abs_diff_nll_vs_naive": float((c - a).abs().max()),
        "max_abs_diff_batched_vs_naive": float((b - a).abs().max()),
    }
    print(f"score: {len(texts)} texts, batch {bs}; {check}", flush=True)
    with torch.no_grad():
        res = harness.interleaved(variants, "naive loop", args.rounds, 2, sync)
    for r in res.values():
        r["tokens"] = tokens
        r["tokens_per_s"] = tokens / r["median_s"]
    pairs = {
        "runs.score / naive loop": pair(res, "runs.score", "naive loop"),
        "runs.score / plain batched loop": pair(res, "runs.score", "plain batched loop"),
    }
    return {"texts": len(texts), "batch_size": bs, "check": check, "results": res, "pairs": pairs}


# ---- main -------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="3 rounds")
    p.add_argument("--prompts", type=int, default=16, help="prompts for generate")
    p.add_argument("--texts", type=int, default=32, help="texts for capture_dataset and score")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--context", type=int, default=128, help="SAELens store context_size")
    p.add_argument("--scale", type=float, default=4.0, help="steering scale")
    p.add_argument("--only", default="generate,capture,score", help="groups to run")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="cpu",
        help="generate group's clock: cpu (process CPU seconds: robust to neighbours on a "
        "shared machine; default) or wall (on CUDA, wall is used whatever this says)",
    )
    p.add_argument("--no-saelens", action="store_true", help="skip SAELens's store")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds = min(args.rounds, 3)
    if args.device != "cpu":
        args.clock = "wall"  # CUDA work is asynchronous: this process's CPU time misses it
    groups = [g for g in args.only.split(",") if g]
    torch.manual_seed(0)
    machine = harness.machine_info()
    model = harness.load_model(args.model, device=args.device)
    sync = harness.sync_for(args.device)
    payload: dict = {
        "benchmark": "workbench",
        "machine": machine,
        "device": args.device,
        "model": args.model,
        "rounds": args.rounds,
        "generate_clock": args.clock,
        "target": {"generate_max_time_ratio": GEN_TARGET, "generate_min_throughput": 0.98},
    }
    if "generate" in groups:
        payload["generate"] = generate_group(model, args, model.cfg.n_layers // 3, sync)
    if "capture" in groups:
        payload["capture"] = capture_group(model, args, model.cfg.n_layers // 2, sync)
    if "score" in groups:
        payload["score"] = score_group(model, args, sync)
    harness.finish(machine)

    rows = []
    for g in ("generate", "capture", "score"):
        if g not in payload:
            continue
        d = payload[g]
        for v, r in d["results"].items():
            rows.append(
                [g, v, f"{r['median_s'] * 1e3:.0f} ms", f"{r['tokens_per_s']:,.0f}", "", ""]
            )
        for k, r in d["pairs"].items():
            rows.append([g, k, "", "", harness.fmt_ratio(r), r.get("verdict", "")])
    header = ["group", "variant / pair", "median", "tokens/s", harness.RATIO_HEADER, "verdict"]
    notes = [
        f"Model `{args.model}`, batch size {args.batch_size}, {args.rounds} interleaved rounds "
        "per group. Ratios are time ratios (≤ 1: interp is faster); the SAELens pair is per "
        f"token. Target: `runs.generate` time ratio ≤ {GEN_TARGET} (≥ 0.98× tokens/s).",
    ]
    if "generate" in payload:
        d = payload["generate"]
        notes.append(
            f"generate: {d['prompts']} prompts, {d['new_tokens']} new tokens each "
            f"(min_new_tokens = max_new_tokens), steering at layer {d['layer']}; timed on the "
            f"{args.clock} clock ({'process CPU seconds' if args.clock == 'cpu' else 'wall'}); "
            f"checks {d['check']}."
        )
    if "capture" in payload:
        d = payload["capture"]
        notes.append(
            f"capture_dataset: {d['texts']} texts, `{d['hook']}`; checks {d['check']}. The "
            "plain loops and capture_dataset forward right-padded batches in input order "
            "(`padded_tokens_forwarded`); SAELens's store packs the texts into full windows "
            "(texts share a window's context; the last partial batch of windows is dropped)."
        )
    if "score" in payload:
        notes.append(f"score: checks {payload['score']['check']}.")
    notes.append(harness.load_line(machine))
    harness.publish("workbench", payload, rows, header, notes[1:], intro=notes[0], out=args.out)
    return payload


if __name__ == "__main__":
    main()
