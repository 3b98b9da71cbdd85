"""TopK SAE training: ``interp.sae.train_sae`` against EleutherAI's sparsify and SAELens.

    python benchmarks/sae_throughput.py [--device cpu] [--d-in 576 --d-sae 4608 --k 32]
        [--batch 4096] [--steps 20] [--warmup 3] [--data synthetic|gaussian|PATH|DIR]
        [--exclude-first 1] [--eval-tokens 73728,368640] [--held-out-rows 40960]
        [--interp-optimizer signsgd --interp-init sparsify --interp-b-dec-init mean]
        [--interp-encoder auto|bf16-screen|fp32] [--interp-dead-tokens N]
        [--no-saelens] [--no-sparsify] [--ablation] [--out benchmarks/results/sae_throughput.json]
    python benchmarks/sae_throughput.py --capture DIR [--model smollm2-135m-instruct]
        [--hook blocks.15.hook_resid_post]       # cache real activations once (resumable)

The committed result (real activations, 368,640 training tokens, with the ablation)::

    python benchmarks/sae_throughput.py --capture /tmp/sae_acts
    python benchmarks/sae_throughput.py --data /tmp/sae_acts --exclude-first 1 \
        --steps 87 --warmup 3 --eval-tokens 73728 --held-out-rows 40960 --ablation \
        --extra-seeds 1,2

Peers, all on the same batches in the same order, on the same device and threads:

* ``interp``: the real ``interp.sae.train_sae`` loop with the options given (by default
  the library's: schedule-free SignSGD, sparsify init, geometric-median b_dec), fed by a
  generator that runs the peers' steps around each of our steps, so every group of steps
  runs back to back under the same machine conditions (interp's place in the group
  rotates).
* ``sparsify`` (PyPI ``eai-sparsify``), once with each optimizer: its default
  (``signum``: ``ScheduleFreeWrapper(SignSGD, momentum=0.95)``, lr 5e-3/√(d_sae/2^14), no
  warm-up) and ``adam`` (lr 2e-4/√(d_sae/2^14), ``get_linear_schedule_with_warmup(1000,
  num_batches)``). Its step is the per-batch code path of ``sparsify.Trainer.fit`` for
  ``loss_fn="fvu"`` (the trainer itself needs a Hugging Face model and dataset): b_dec
  = batch mean on the first step, decoder rows renormalized before the forward,
  ``SparseCoder.forward`` with the batch's total variance, loss = FVU + auxk_alpha·AuxK
  (sparsify's default auxk_alpha is 0), backward, gradient component parallel to the
  decoder rows removed, optimizer step, zero_grad, scheduler step, dead-latent counters.
  Held-out evaluation of the schedule-free SAE switches the optimizer to ``eval()`` (the
  averaged weights) and back, as sparsify's ``save`` does.
* ``sae-lens``: ``SAETrainer.step`` on a ``TopKTrainingSAE`` (the code path of
  ``SAETrainer.fit``), Adam at interp's default lr, no warm-up.

Reported: tokens/s from the median step time; per peer, the median of per-group speed
ratios (peer step time / interp step time) with min–max; held-out FVU (Σ‖x−x̂‖² over
Σ‖x−mean‖², the mean over the whole held-out set) after each of ``--eval-tokens``
training tokens (interp: the run is checkpointed there, evaluated, and resumed, which
``train_sae`` guarantees equals uninterrupted training); the load average at start and
end. Target (issue 16 item 5): ≥ 2× sparsify's tokens/s and held-out FVU ≤ that of
sparsify's best optimizer at every evaluation point.

``--interp-encoder`` chooses interp's TopK selection (the bf16 screen where the CPU has bf16
arithmetic, always, or the plain fp32 GEMM; the title counts the rows the screen had to
widen or recompute), and ``--interp-dead-tokens`` lowers interp's dead-latent threshold so
that its steps run AuxK (sparsify's default runs none).

``--ablation`` then trains interp variants (init, b_dec init, optimizer, lr, warm-up,
normalization, AuxK) on the same batches, untimed, and tabulates their held-out FVU at
the same points next to sparsify's.

Data: ``synthetic`` (default) draws activations from a random sparse dictionary plus
noise, ``gaussian`` is isotropic noise, a ``.pt``/``.npy``/``.safetensors`` tensor
``[n, d_in]``, or a ``capture_dataset(..., to=DIR)`` folder of one hook (then
``--exclude-first n`` drops each sequence's first n tokens, and the held-out rows are
the last sequences, disjoint from the training ones).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import harness  # before torch: it sets OMP_WAIT_POLICY, read once when torch loads OpenMP
import torch

from interp.sae import TopKSAE, train_sae
from interp.sae import functional as SF

# Issue 16 item 5: at least 2× sparsify's tokens/s, and held-out FVU ≤ sparsify's best.
TARGET_SPEEDUP = 2.0


# ---- data ----------------------------------------------------------------------------------


def stdlib_doc_texts(chars: int = 2000) -> list[str]:
    """English text that is on every machine with Python: the ``pydoc`` topics and the
    docstrings (> 200 characters) of the standard library's modules, classes and
    functions (test packages excluded), packed into ~``chars``-character chunks on
    paragraph boundaries (~550 SmolLM2 tokens each; 821 chunks with Python 3.11)."""
    import ast
    import pydoc_data.topics as topics
    import sysconfig

    out = [topics.topics[k] for k in sorted(topics.topics)]
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "idle_test"}
    for f in sorted(p for p in lib.rglob("*.py") if not skip & set(p.parts)):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    out.append(doc)
    chunks, cur = [], ""
    for text in out:
        for para in text.split("\n\n"):
            cur += para + "\n\n"
            if len(cur) >= chars:
                chunks.append(cur.strip())
                cur = ""
    return chunks


def capture(args) -> None:
    """Cache ``--hook`` of ``--model`` on ``stdlib_doc_texts()`` into ``--capture DIR``
    (resumable: rerun the same command after an interruption)."""
    from interp.runs import capture_dataset

    model = harness.load_model(args.model, args.device)
    texts = stdlib_doc_texts()
    print(f"{len(texts)} texts -> {args.capture} ({args.hook})", flush=True)
    capture_dataset(
        model, texts, args.hook, batch_size=8, dtype=torch.float32, to=args.capture, progress=True
    )


def load_activations(path: str, d_in: int, exclude_first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[n, d_in]`` and each row's sequence index (-1 when unknown)."""
    p = Path(path)
    example = None
    if p.is_dir():
        from interp.runs import ShardedActivations

        ds = ShardedActivations(p, json.loads((p / "meta.json").read_text())).load()
        (name,) = ds.names
        acts = ds[name]
        keep = ds.position >= exclude_first
        acts, example = acts[keep], ds.example[keep]
    elif p.suffix == ".npy":
        import numpy as np

        acts = torch.from_numpy(np.load(p, mmap_mode="r")[:])
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        acts = next(iter(load_file(str(p)).values()))
    else:
        acts = torch.load(p, map_location="cpu", weights_only=True)
    acts = acts.reshape(-1, acts.shape[-1]).float()
    if acts.shape[-1] != d_in:
        raise SystemExit(f"{path}: activations have width {acts.shape[-1]}, --d-in is {d_in}")
    if example is None:
        example = torch.full((acts.shape[0],), -1)
    return acts, example


def make_batches(args, n_batches: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``n_batches`` training batches and the held-out rows."""
    g = torch.Generator().manual_seed(args.seed)
    total = n_batches * args.batch
    n_held = args.held_out_rows
    if args.data in ("gaussian", "synthetic"):
        rows = total + n_held
        if args.data == "gaussian":
            data = torch.randn(rows, args.d_in, generator=g)
        else:
            # Sparse superposition: each token mixes ~k true directions with exponential
            # magnitudes, plus a shared offset and small isotropic noise.
            dictionary = torch.randn(args.d_sae, args.d_in, generator=g)
            dictionary /= dictionary.norm(dim=1, keepdim=True)
            offset = torch.randn(args.d_in, generator=g)
            idx = torch.randint(0, args.d_sae, (rows, args.k), generator=g)
            mags = torch.empty(rows, args.k).exponential_(1.0, generator=g)
            x = torch.nn.functional.embedding_bag(
                idx, dictionary, per_sample_weights=mags, mode="sum"
            )
            data = x + offset + 0.05 * torch.randn(rows, args.d_in, generator=g)
        train, held = data[:total], data[total:]
    else:
        data, example = load_activations(args.data, args.d_in, args.exclude_first)
        if bool((example >= 0).all()):
            # held out: the last sequences (disjoint from the training ones)
            order = torch.argsort(example, stable=True)
            data, example = data[order], example[order]
            cut = int(example[-n_held]) if n_held < len(example) else 0
            held_mask = example >= cut
            held, pool = data[held_mask], data[~held_mask]
        else:
            perm = torch.randperm(data.shape[0], generator=g)
            held, pool = data[perm[:n_held]], data[perm[n_held:]]
        if pool.shape[0] < total:
            raise SystemExit(
                f"{args.data}: need {total} training rows for this run, found {pool.shape[0]}"
            )
        train = pool[torch.randperm(pool.shape[0], generator=g)[:total]]
    return [b.to(args.device) for b in train.split(args.batch)], held.to(args.device)


@torch.no_grad()
def held_out_fvu(reconstruct: Callable[[torch.Tensor], torch.Tensor], held: torch.Tensor) -> float:
    """Σ‖x − x̂‖² / Σ‖x − mean‖² over the whole held-out set (float64 sums)."""
    sse = 0.0
    for x in held.split(4096):
        sse += float((x - reconstruct(x)).double().pow(2).sum())
    xd = held.double()
    return sse / float((xd - xd.mean(0)).pow(2).sum())


# ---- peers ---------------------------------------------------------------------------------


class SparsifyPeer:
    """sparsify's per-batch training step (``Trainer.fit``, ``loss_fn="fvu"``, one process)."""

    def __init__(self, args, optimizer: str, num_batches: int) -> None:
        from sparsify import SparseCoder, SparseCoderConfig
        from sparsify.config import TrainConfig

        self.name = f"sparsify ({'signum' if optimizer == 'signum' else 'adam'})"
        self.cfg = TrainConfig(
            SparseCoderConfig(num_latents=args.d_sae, k=args.k), optimizer=optimizer
        )
        torch.manual_seed(args.seed)  # sparsify seeds the global RNG before building
        self.sae = SparseCoder(args.d_in, self.cfg.sae, args.device, dtype=torch.float32)
        scale = (self.sae.num_latents / 2**14) ** 0.5
        self.schedulers = []
        if optimizer == "adam":
            from transformers import get_linear_schedule_with_warmup

            self.lr = 2e-4 / scale
            self.opt = torch.optim.Adam(self.sae.parameters(), lr=self.lr)
            self.schedulers = [
                get_linear_schedule_with_warmup(self.opt, self.cfg.lr_warmup_steps, num_batches)
            ]
        elif optimizer == "signum":
            from schedulefree import ScheduleFreeWrapper
            from sparsify.sign_sgd import SignSGD

            self.lr = 5e-3 / scale
            self.opt = ScheduleFreeWrapper(
                SignSGD(self.sae.parameters(), lr=self.lr), momentum=0.95
            )
            self.opt.train()
        else:
            raise ValueError(optimizer)
        self.step_count = 0
        self.tokens_since_fired = torch.zeros(self.sae.num_latents, dtype=torch.long)
        self.did_fire = torch.zeros(self.sae.num_latents, dtype=torch.bool)
        self.fvus: list[float] = []

    def step(self, x: torch.Tensor) -> None:
        sae, cfg = self.sae, self.cfg
        if self.step_count == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = (
            self.tokens_since_fired > cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
        )
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        self.did_fire[out.latent_indices.flatten()] = True
        self.fvus.append(float(out.fvu.detach()))  # its logging reads the FVU every step
        loss = out.fvu + cfg.auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        for scheduler in self.schedulers:
            scheduler.step()
        with torch.no_grad():
            self.tokens_since_fired += x.shape[0]
            self.tokens_since_fired[self.did_fire] = 0
            self.did_fire.zero_()
        self.step_count += 1

    @torch.no_grad()
    def fvu(self, held: torch.Tensor) -> float:
        averaged = hasattr(self.opt, "eval")
        if averaged:
            self.opt.eval()
        try:
            return held_out_fvu(lambda x: self.sae(x).sae_out, held)
        finally:
            if averaged:
                self.opt.train()


class SAELensPeer:
    """SAELens's ``SAETrainer.step`` on a ``TopKTrainingSAE`` (Adam, interp's lr)."""

    name = "sae-lens"

    def __init__(self, args, lr: float, num_batches: int) -> None:
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer

        torch.manual_seed(args.seed)  # SAELens initializes from the global RNG
        sae = TopKTrainingSAE(
            TopKTrainingSAEConfig(
                d_in=args.d_in,
                d_sae=args.d_sae,
                k=args.k,
                device=args.device,
                use_sparse_activations=args.saelens_sparse,
            )
        )
        cfg = SAETrainerConfig(
            total_training_samples=num_batches * args.batch,
            train_batch_size_samples=args.batch,
            lr=lr,
            lr_end=lr / 10,  # unused by the constant schedule; SAETrainer asserts it is set
            lr_warm_up_steps=0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            device=args.device,
        )
        self.trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))

    def step(self, x: torch.Tensor) -> None:
        self.trainer.step(x)
        self.trainer.n_training_steps += 1  # what SAETrainer.fit does after step()

    @torch.no_grad()
    def fvu(self, held: torch.Tensor) -> float:
        sae = self.trainer.sae
        return held_out_fvu(lambda x: sae.decode(sae.encode(x)), held)


# ---- interp, driven step by step ---------------------------------------------------------


def interp_kwargs(args, **over) -> dict:
    kw = dict(
        optimizer=args.interp_optimizer,
        b_dec_init=args.interp_b_dec_init,
        init=args.interp_init,
        lr=args.interp_lr,
        warmup_steps=args.interp_warmup,
    )
    if args.interp_dead_tokens is not None:
        kw["dead_tokens"] = args.interp_dead_tokens
    kw.update(over)
    return kw


def run_interp(
    args,
    batches: list[torch.Tensor],
    held: torch.Tensor,
    eval_steps: list[int],
    peers: list,
    times: dict[str, list[float]],
    fvus: dict[str, dict[int, float]],
    *,
    init: str = "gao",
    name: str = "interp",
    **train_kwargs,
) -> dict:
    """Train interp on ``batches`` (checkpointed, evaluated and resumed at each of
    ``eval_steps``); around each of its steps run every peer's step on the same batch."""
    pending: list = []
    mark = [0.0]
    current = [0]

    def run_peers(i: int, group: list) -> None:
        for peer in group:
            t0 = time.perf_counter()
            peer.step(batches[i])
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[peer.name].append(dt)

    def stream(start: int):
        for i, batch in enumerate(batches):
            if i < start:  # the batches a resumed train_sae skips
                yield batch
                continue
            if pending:
                run_peers(*pending)
                pending.clear()
            group = peers[i % len(peers) :] + peers[: i % len(peers)] if peers else []
            cut = i % (len(peers) + 1)  # interp's place in the group rotates
            run_peers(i, group[:cut])
            pending.extend([i, group[cut:]])
            current[0] = i
            mark[0] = time.perf_counter()
            yield batch

    def on_step(m) -> None:
        dt = time.perf_counter() - mark[0]
        if current[0] >= args.warmup:
            times[name].append(dt)
        if args.verbose:
            print(f"step {m.step:4d} {name}: {dt * 1e3:8.1f} ms  fvu {m.fvu:.4f}", flush=True)

    history = []
    with tempfile.TemporaryDirectory(prefix="sae_bench_") as ckpt:
        start = 0
        for stop in eval_steps:
            sae = TopKSAE(
                args.d_in,
                args.d_sae,
                args.k,
                generator=torch.Generator().manual_seed(args.seed),
                init=init,
            ).to(args.device)
            result = train_sae(
                sae,
                stream(start),
                checkpoint_dir=ckpt,
                checkpoint_every=10**9,
                max_steps=stop,
                progress=False,
                on_step=on_step,
                **train_kwargs,
            )
            if pending:
                run_peers(*pending)
                pending.clear()
            tokens = stop * args.batch
            trained = result.sae
            fvus[name][tokens] = held_out_fvu(lambda x, m=trained: m.decode(m.encode(x)), held)
            for peer in peers:
                fvus[peer.name][tokens] = peer.fvu(held)
            history = result.history
            start = stop
    return {
        "train_fvu_last": history[-1].fvu if history else math.nan,
        "dead_fraction_last": history[-1].dead_fraction if history else math.nan,
    }


ABLATION = [
    # (label, TopKSAE init, train_sae options)
    (
        "Adam, Gao init, geometric-median b_dec, 1,000 warm-up steps (interp's former default)",
        "gao",
        {"optimizer": "adam"},
    ),
    ("Adam + sparsify init", "sparsify", {"optimizer": "adam"}),
    ("Adam + sparsify init + mean b_dec", "sparsify", {"optimizer": "adam", "b_dec_init": "mean"}),
    ("Adam, no warm-up", "gao", {"optimizer": "adam", "warmup_steps": 0}),
    (
        "Adam, no warm-up + sparsify init + mean b_dec",
        "sparsify",
        {"optimizer": "adam", "warmup_steps": 0, "b_dec_init": "mean"},
    ),
    ("Adam, no warm-up, lr ×10", "gao", {"optimizer": "adam", "warmup_steps": 0, "lr_mult": 10}),
    ("SignSGD (schedule-free), Gao init, geometric-median b_dec", "gao", {"optimizer": "signsgd"}),
    ("SignSGD + sparsify init (interp's default)", "sparsify", {"optimizer": "signsgd"}),
    (
        "SignSGD + sparsify init + mean b_dec (sparsify's recipe)",
        "sparsify",
        {"optimizer": "signsgd", "b_dec_init": "mean"},
    ),
    (
        "  … without AuxK (sparsify's auxk_alpha 0)",
        "sparsify",
        {"optimizer": "signsgd", "b_dec_init": "mean", "auxk_alpha": 0.0},
    ),
    (
        "  … without decoder normalization/projection",
        "sparsify",
        {"optimizer": "signsgd", "b_dec_init": "mean", "normalize_decoder": False},
    ),
    ("  … lr ×0.5", "sparsify", {"optimizer": "signsgd", "b_dec_init": "mean", "lr_mult": 0.5}),
    ("  … lr ×2", "sparsify", {"optimizer": "signsgd", "b_dec_init": "mean", "lr_mult": 2.0}),
]


def ablation(args, batches, held, eval_steps) -> list[dict]:
    from interp.sae import default_lr

    rows = []
    for label, init, opts in ABLATION:
        opts = dict(opts)
        mult = opts.pop("lr_mult", None)
        if mult is not None:
            opts["lr"] = mult * default_lr(args.d_sae, opts.get("optimizer", "adam"))
        times: dict[str, list[float]] = {"interp": []}
        fvus: dict[str, dict[int, float]] = {"interp": {}}
        t0 = time.perf_counter()
        run_interp(args, batches, held, eval_steps, [], times, fvus, init=init, **opts)
        row = {
            "variant": label,
            "init": init,
            "options": {k: v for k, v in opts.items()},
            "fvu_held_out": fvus["interp"],
            "median_step_s": statistics.median(times["interp"]) if times["interp"] else None,
            "wall_s": time.perf_counter() - t0,
        }
        print(
            f"ablation: {label}: "
            + ", ".join(f"{t:,} tok {f:.4f}" for t, f in row["fvu_held_out"].items()),
            flush=True,
        )
        rows.append(row)
    return rows


def seed_spread(args, batches, held, eval_steps, seeds: list[int]) -> list[dict]:
    """Held-out FVU of interp (the timed options) and of sparsify's default optimizer
    with other initialization seeds (untimed), to tell a difference from seed noise."""
    rows = []
    for seed in seeds:
        a = argparse.Namespace(**{**vars(args), "seed": seed})
        kw = interp_kwargs(a)
        init = kw.pop("init")
        fvus: dict[str, dict[int, float]] = {"interp": {}}
        run_interp(a, batches, held, eval_steps, [], {"interp": []}, fvus, init=init, **kw)
        row = {"seed": seed, "interp": fvus["interp"]}
        if not args.no_sparsify:
            peer = SparsifyPeer(a, "signum", len(batches))
            row["sparsify (signum)"] = {}
            for i, batch in enumerate(batches):
                peer.step(batch)
                if i + 1 in eval_steps:
                    row["sparsify (signum)"][(i + 1) * args.batch] = peer.fvu(held)
        print(f"seed {seed}: {row}", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--data", default="synthetic", help="synthetic | gaussian | PATH | DIR")
    parser.add_argument(
        "--exclude-first",
        type=int,
        default=1,
        help="(capture folder) drop each sequence's first n tokens",
    )
    parser.add_argument("--held-out-rows", type=int, default=4096)
    parser.add_argument(
        "--eval-tokens",
        default="",
        help="comma-separated training-token counts (multiples of --batch) at which held-out FVU is measured; the end always",
    )
    parser.add_argument("--interp-optimizer", default="signsgd", choices=["adam", "signsgd"])
    parser.add_argument("--interp-init", default="sparsify", choices=["gao", "sparsify"])
    parser.add_argument(
        "--interp-b-dec-init", default="geometric_median", choices=["geometric_median", "mean"]
    )
    parser.add_argument(
        "--interp-lr", type=float, default=None, help="default: default_lr(d_sae, optimizer)"
    )
    parser.add_argument("--interp-warmup", type=int, default=None, help="default: the optimizer's")
    parser.add_argument(
        "--interp-dead-tokens",
        type=int,
        default=None,
        help="interp's dead-latent threshold (default: train_sae's 10M); small values make "
        "latents dead early, so interp's steps include AuxK (sparsify's default runs none)",
    )
    parser.add_argument(
        "--interp-encoder",
        default="auto",
        choices=["auto", "bf16-screen", "fp32"],
        help="interp's TopK selection: the bf16 screen where the CPU has bf16 arithmetic "
        "(auto), always, or the plain fp32 GEMM",
    )
    parser.add_argument("--no-sparsify", action="store_true")
    parser.add_argument("--no-saelens", action="store_true")
    parser.add_argument(
        "--saelens-sparse", action="store_true", help="SAELens use_sparse_activations=True"
    )
    parser.add_argument(
        "--ablation", action="store_true", help="also train the interp ablation variants"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--extra-seeds",
        default="",
        help="comma-separated init seeds: held-out FVU of interp and sparsify (signum) again",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/sae_throughput.json")
    parser.add_argument(
        "--capture",
        metavar="DIR",
        help="only cache --hook of --model on the stdlib documentation texts into DIR, then exit",
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--hook", default="blocks.15.hook_resid_post")
    parser.add_argument("--data-note", default="", help="what --data is (goes into the title)")
    args = parser.parse_args(argv)
    if args.capture:
        capture(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    SF._BF16_SCREEN = {"auto": None, "bf16-screen": True, "fp32": False}[args.interp_encoder]

    machine = harness.machine_info()
    n_total = args.warmup + args.steps
    eval_steps = sorted(
        {int(t) // args.batch for t in args.eval_tokens.split(",") if t} | {n_total}
    )
    if any(s < 1 or s > n_total for s in eval_steps) or any(
        int(t) % args.batch for t in args.eval_tokens.split(",") if t
    ):
        raise SystemExit(f"--eval-tokens must be multiples of --batch within the {n_total} steps")
    batches, held = make_batches(args, n_total)

    peers: list = []
    notes: list[str] = []
    if not args.no_sparsify:
        try:
            import schedulefree  # noqa: F401
            import sparsify  # noqa: F401
        except ImportError as e:  # not in the project's offline package index
            notes.append(f"sparsify not run: {e} (pip install eai-sparsify)")
            print(notes[-1], flush=True)
        else:
            peers += [SparsifyPeer(args, "signum", n_total), SparsifyPeer(args, "adam", n_total)]
    if not args.no_saelens:
        from interp.sae import default_lr

        peers.append(SAELensPeer(args, default_lr(args.d_sae), n_total))
    names = ["interp"] + [p.name for p in peers]
    times: dict[str, list[float]] = {n: [] for n in names}
    fvus: dict[str, dict[int, float]] = {n: {} for n in names}
    kw = interp_kwargs(args)
    init = kw.pop("init")
    SF._SCREEN_STATS.reset()
    extra = run_interp(args, batches, held, eval_steps, peers, times, fvus, init=init, **kw)
    machine_timed_end = harness.loadavg()
    screen = {
        "used": SF._SCREEN_STATS.rows > 0,
        "rows": SF._SCREEN_STATS.rows,  # training and held-out encodings of the timed run
        "rows_screened_again_wider": SF._SCREEN_STATS.widened,  # counted per widening
        "rows_recomputed_fp32": SF._SCREEN_STATS.redone,
    }

    rows = ablation(args, batches, held, eval_steps) if args.ablation else []
    seeds = [int(s) for s in args.extra_seeds.split(",") if s]
    spread = seed_spread(args, batches, held, eval_steps, seeds) if seeds else []
    harness.finish(machine)
    machine["loadavg_end_timed_part"] = machine_timed_end

    ours = times["interp"]
    med = {n: statistics.median(t) for n, t in times.items()}
    ratios = {p.name: [b / a for a, b in zip(ours, times[p.name], strict=True)] for p in peers}
    speed = {
        n: {"median": statistics.median(r), "min": min(r), "max": max(r), "pairs": len(r)}
        for n, r in ratios.items()
    }
    tokens = sorted(fvus["interp"])
    sparsify_names = [p.name for p in peers if p.name.startswith("sparsify")]
    best_sparsify = (
        {t: min(fvus[n][t] for n in sparsify_names) for t in tokens} if sparsify_names else {}
    )
    fvu_met = all(fvus["interp"][t] <= best_sparsify[t] for t in tokens) if best_sparsify else None
    speed_met = (
        all(speed[n]["median"] >= TARGET_SPEEDUP for n in sparsify_names)
        if sparsify_names
        else None
    )
    met = bool(speed_met and fvu_met)

    opts = f"optimizer={args.interp_optimizer}, init={args.interp_init}, b_dec_init={args.interp_b_dec_init}"
    if args.interp_dead_tokens is not None:
        opts += (
            f", dead_tokens={args.interp_dead_tokens:,} (AuxK on; final dead fraction "
            f"{extra['dead_fraction_last']:.3f})"
        )
    if screen["used"]:
        opts += (
            f", bf16-screened TopK ({screen['rows']:,} rows; {screen['rows_screened_again_wider']:,} "
            f"screened again with more candidates, {screen['rows_recomputed_fp32']:,} recomputed "
            "in fp32)"
        )
    else:
        opts += ", fp32 TopK"
    title = (
        f"TopK SAE training, d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch}, "
        f"{args.device}, {torch.get_num_threads()} threads, data={args.data}"
        + (f" ({args.data_note})" if args.data_note else "")
        + (
            f" (first {args.exclude_first} token(s) of each sequence excluded)"
            if Path(args.data).is_dir()
            else ""
        )
        + f", {held.shape[0]:,} held-out rows; {len(ours)} timed step groups after {args.warmup} "
        f"warm-up; interp: {opts}"
    )
    head = (
        "| trainer | median step (ms) | tokens/s | step time / interp's (median, min–max) | "
        + " | ".join(f"held-out FVU after {t:,} tokens" for t in tokens)
        + " |"
    )
    lines = [head, "|---|---:|---:|---:|" + "---:|" * len(tokens)]
    for n in names:
        rel = (
            "1"
            if n == "interp"
            else f"{speed[n]['median']:.2f}× ({speed[n]['min']:.2f}–{speed[n]['max']:.2f})"
        )
        label = f"interp.sae.train ({opts})" if n == "interp" else n
        lines.append(
            f"| {label} | {med[n] * 1e3:.1f} | {args.batch / med[n]:,.0f} | {rel} | "
            + " | ".join(f"{fvus[n][t]:.4f}" for t in tokens)
            + " |"
        )
    markdown = [title, "\n".join(lines)]
    if sparsify_names:
        markdown.append(
            "interp's tokens/s over sparsify's (median of per-group ratios): "
            + ", ".join(
                f"{n} **{speed[n]['median']:.2f}×** ({speed[n]['min']:.2f}–{speed[n]['max']:.2f})"
                for n in sparsify_names
            )
            + f"; held-out FVU ≤ sparsify's best optimizer at {', '.join(f'{t:,}' for t in tokens)} tokens: "
            + ", ".join(f"{fvus['interp'][t]:.4f} vs {best_sparsify[t]:.4f}" for t in tokens)
            + f". Target ≥ {TARGET_SPEEDUP:g}× and FVU ≤ sparsify's best: **{'met' if met else 'not met'}**"
            + f" (speed {'met' if speed_met else 'not met'}, FVU {'met' if fvu_met else 'not met'}). "
            + harness.load_line(machine)
        )
    if rows:
        ab = [
            "| variant | " + " | ".join(f"FVU after {t:,} tokens" for t in tokens) + " |",
            "|---|" + "---:|" * len(tokens),
        ]
        for r in rows:
            ab.append(
                f"| {r['variant']} | "
                + " | ".join(f"{r['fvu_held_out'][t]:.4f}" for t in tokens)
                + " |"
            )
        for n in sparsify_names:
            ab.append(
                f"| {n} (its own trainer, timed run above) | "
                + " | ".join(f"{fvus[n][t]:.4f}" for t in tokens)
                + " |"
            )
        markdown.append("\n".join(ab))
    if spread:
        cols = ["interp"] + (["sparsify (signum)"] if not args.no_sparsify else [])
        first = {"seed": args.seed, "interp": fvus["interp"]}
        if not args.no_sparsify:
            first["sparsify (signum)"] = fvus.get("sparsify (signum)", {})
        sp = [
            "| init seed | "
            + " | ".join(f"{c}, FVU after {t:,} tokens" for c in cols for t in tokens)
            + " |",
            "|---:|" + "---:|" * (len(cols) * len(tokens)),
        ]
        for r in [first, *spread]:
            sp.append(
                f"| {r['seed']} | "
                + " | ".join(f"{r[c][t]:.4f}" for c in cols for t in tokens)
                + " |"
            )
        markdown.append("\n".join(sp))

    markdown += notes
    payload = {
        "benchmark": "sae_throughput",
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": machine,
        "markdown": markdown,
        "target": {
            "speedup_min_vs_sparsify": TARGET_SPEEDUP,
            "fvu": "≤ sparsify's best optimizer at every evaluation point",
            "speed_met": speed_met,
            "fvu_met": fvu_met,
            "met": met,
        },
        "eval_tokens": tokens,
        "held_out_rows": int(held.shape[0]),
        "interp": {
            "options": {**kw, "init": init},
            "bf16_screen": screen,
            "median_step_s": med["interp"],
            "tokens_per_s": args.batch / med["interp"],
            "fvu_held_out": fvus["interp"][tokens[-1]],  # after all the training tokens
            "fvu_held_out_by_tokens": fvus["interp"],
            **extra,
            "step_s": ours,
        },
        "peers": {
            p.name: {
                "median_step_s": med[p.name],
                "tokens_per_s": args.batch / med[p.name],
                "fvu_held_out": fvus[p.name][tokens[-1]],
                "fvu_held_out_by_tokens": fvus[p.name],
                "speed_ratio": speed[p.name],
                "step_s": times[p.name],
            }
            for p in peers
        },
        "ablation": rows,
        "seed_spread": spread,
    }
    if "sae-lens" in speed:  # run_all's summary reads these (interp vs SAELens)
        payload["speedup"] = speed["sae-lens"]
        payload["sae_lens"] = {"fvu_held_out": fvus["sae-lens"][tokens[-1]]}
    out = harness.write("sae_throughput", payload, args.out)
    print()
    print("\n\n".join(markdown))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
