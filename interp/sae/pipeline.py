"""The SAE pipeline as one resumable command: cache → train → export → evaluate → report.

``python -m interp.sae --data texts.jsonl --hook blocks.15.hook_resid_post --out run/``
(flags or a ``--config`` JSON/YAML file; see ``python -m interp.sae --help``) runs, for a
model (``interp.load``; the embedded SmolLM2-135M by default):

1. **data**: ``interp.data.read_dataset`` (text, JSONL, CSV, parquet or a saved dataset)
   and its ``column``; the last ``eval_texts`` texts are held out for evaluation, and
   training texts are taken from the start until they hold ``capture_tokens`` counted
   tokens (real, non-special tokens after truncation to ``max_length``);
2. **cache**: ``interp.runs.capture_dataset(..., to=out/activations)`` writes one
   safetensors shard per text batch (special tokens and padding excluded) — the one way
   data becomes activation rows; its shards make this stage resumable by themselves;
3. **train**: ``train_sae`` on shuffled ``batch_size`` batches of those rows (a seeded
   shuffling buffer over the shards in a seeded order; more epochs when ``tokens`` exceeds
   the rows cached), checkpointing to ``out/train/checkpoint.pt``;
4. **export**: ``save_saelens`` to ``out/sae`` (``sae_lens.SAE.load_from_disk`` reads it);
5. **evaluate**: ``evaluate_on_model`` on the held-out texts (L0, FVU, CE loss recovered
   over real tokens, dead/dense latents) → ``out/eval.json``, top-activating examples →
   ``out/top_examples.json``;
6. **report**: ``out/report.json`` with settings, data sizes, training summary, metrics
   and each stage's wall and CPU seconds.

Data parallel: under ``torchrun --nproc_per_node N -m interp.sae ...`` (gloo on CPU, nccl
with one GPU per process) ``capture_dataset`` deals the text batches out over the ranks
into the one shard folder, every rank draws the same global batches from it and trains on
its 1/N slice (``train_sae`` sums gradients: the result is one-process training's), and
rank 0 exports, evaluates and writes the report.

Rerunning the same command resumes: every stage whose output is complete is skipped and
training continues from its last checkpoint, replaying the same batches, so an
interrupted run ends with the same SAE and metrics as an uninterrupted one.
``out/config.json`` records the settings; rerunning into the same folder with different
settings raises, naming the fields that differ. Every file is written atomically.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interp.cache import atomic_write
from interp.sae.evaluation import evaluate_on_model, top_examples_json
from interp.sae.model import INITS, TopKSAE
from interp.sae.saelens import load_topk_saelens, save_saelens
from interp.sae.store import _ShuffleBuffer
from interp.sae.train import (
    B_DEC_INITS,
    CHECKPOINT_NAME,
    OPTIMIZERS,
    SAETrainConfig,
    StepMetrics,
    train_sae,
)

__all__ = ["QUICK", "PipelineConfig", "run_pipeline"]

# Settings that do not change results: a resumed run may change them freely.
_RUNTIME_FIELDS = ("out", "device", "progress", "checkpoint_every")


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of ``run_pipeline``; each is also a ``python -m interp.sae`` flag.

    ``tokens`` are training tokens (steps = tokens // batch_size); ``capture_tokens``
    (default ``tokens``) how many dataset tokens are cached; with fewer cached rows than
    training tokens the trainer makes several passes. ``lr`` None: ``default_lr(d_sae,
    optimizer)``. ``optimizer`` (``"adam"`` | ``"signsgd"``: schedule-free SignSGD),
    ``init`` (``"gao"`` | ``"sparsify"``) and ``b_dec_init`` (``"geometric_median"`` |
    ``"mean"``) are ``SAETrainConfig``'s / ``TopKSAE``'s options (defaults: schedule-free
    SignSGD, sparsify's init); ``warmup_steps`` None is the optimizer's default (none for
    SignSGD; 1,000 for Adam: set it for short Adam runs).
    ``dead_tokens``: a latent not fired for that many training tokens gets the AuxK loss.
    ``exclude_first``: leave each text's first n tokens out of training rows and
    evaluation (the default 1 drops the attention-sink first token of models without BOS,
    see ``evaluate_on_model``; with a BOS it drops only the BOS, which special-token
    masking leaves out anyway).
    """

    out: str = "sae_run"
    model: str = "smollm2-135m-instruct"
    hook_name: str = "blocks.15.hook_resid_post"
    data: str | None = None
    column: str = "text"
    tokens: int = 2_000_000
    capture_tokens: int | None = None
    eval_texts: int = 64
    max_length: int = 256
    exclude_first: int = 1
    d_sae: int = 4608
    k: int = 32
    batch_size: int = 4096
    lr: float | None = None
    optimizer: str = "signsgd"
    init: str = "sparsify"
    b_dec_init: str = "geometric_median"
    warmup_steps: int | None = None
    dead_tokens: int = 1_000_000
    text_batch_size: int = 8
    buffer_rows: int = 65536
    checkpoint_every: int = 25
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    top_n: int = 10
    dead_threshold: float = 0.0
    dense_threshold: float = 0.1
    progress: bool = True

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"PipelineConfig: {msg}")

        for name in (
            "tokens",
            "d_sae",
            "k",
            "batch_size",
            "text_batch_size",
            "eval_texts",
            "max_length",
            "buffer_rows",
            "checkpoint_every",
            "dead_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(f"{name} must be a positive int, got {value!r}")
        if self.capture_tokens is not None and self.capture_tokens < 1:
            bad(f"capture_tokens must be a positive int or None, got {self.capture_tokens}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            bad(f"warmup_steps must be ≥ 0, got {self.warmup_steps}")
        if isinstance(self.exclude_first, bool) or self.exclude_first < 0:
            bad(f"exclude_first must be an int ≥ 0, got {self.exclude_first!r}")
        if self.k > self.d_sae:
            bad(f"k={self.k} must be ≤ d_sae={self.d_sae}")
        if self.tokens < self.batch_size:
            bad(f"tokens={self.tokens} is less than one batch (batch_size={self.batch_size})")
        if self.lr is not None and not self.lr > 0:
            bad(f"lr must be > 0 or None, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.init not in INITS:
            bad(f"init must be one of {INITS}, got {self.init!r}")
        if self.b_dec_init not in B_DEC_INITS:
            bad(f"b_dec_init must be one of {B_DEC_INITS}, got {self.b_dec_init!r}")
        if "*" in self.hook_name or "?" in self.hook_name:
            bad(f"hook_name must be one hook, not a pattern: {self.hook_name!r}")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    def result_settings(self) -> dict[str, Any]:
        """The settings that determine the results (``config.json``)."""
        return {k: v for k, v in asdict(self).items() if k not in _RUNTIME_FIELDS}


# ``--quick``: a few minutes end to end on the embedded model on a 2-core CPU.
QUICK: dict[str, Any] = {
    "tokens": 65_536,
    "capture_tokens": 32_768,
    "eval_texts": 32,
    "max_length": 128,
    "d_sae": 2304,
    "k": 32,
    "batch_size": 1024,
    "dead_tokens": 32_768,
    "buffer_rows": 8192,
    "checkpoint_every": 8,
    "top_n": 5,
}


# ---- helpers -------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class _Clock:
    """Wall and process-CPU seconds of each stage."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], Any], *, skipped: bool = False) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        self.stages[name] = {
            "wall_s": round(time.perf_counter() - wall, 3),
            "cpu_s": round(time.process_time() - cpu, 3),
            "skipped": skipped,
        }
        return out


def _check_settings(out: Path, cfg: PipelineConfig) -> None:
    path = out / "config.json"
    settings = cfg.result_settings()
    if path.exists():
        # a setting missing from an older config.json had its default then
        defaults = {
            f.name: f.default for f in fields(PipelineConfig) if f.name not in _RUNTIME_FIELDS
        }
        saved = {**defaults, **json.loads(path.read_text())}
        differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if differ:
            detail = ", ".join(f"{k}: {saved.get(k)!r} → {settings.get(k)!r}" for k in differ)
            raise ValueError(
                f"{out} holds a run with different settings ({detail}); resume with the "
                "same settings or use a new --out"
            )
    else:
        _write_json(path, settings)


def _read_texts(cfg: PipelineConfig) -> list[str]:
    if cfg.data is None:
        raise ValueError("no dataset: pass --data (a .txt, .jsonl, .csv, .parquet file)")
    from interp.data import read_dataset

    ds = read_dataset(cfg.data)
    if cfg.column not in ds.column_names:
        raise KeyError(
            f"{cfg.data} has no column {cfg.column!r}; columns: {ds.column_names} (--column)"
        )
    texts = [t for t in ds[cfg.column] if isinstance(t, str) and t.strip()]
    if len(texts) <= cfg.eval_texts:
        raise ValueError(
            f"{cfg.data} has {len(texts)} non-empty texts in {cfg.column!r}; need more than "
            f"eval_texts={cfg.eval_texts} (the held-out evaluation texts)"
        )
    return texts


def _encode(model: Any, texts: list[str], max_length: int) -> dict[str, Tensor]:
    enc = model.tokenizer(
        texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _select_train_texts(
    model: Any, pool: list[str], budget: int, max_length: int, exclude_first: int
) -> tuple[list[str], int]:
    """Texts from the start of ``pool`` until they hold ``budget`` counted tokens."""
    from interp.runs import special_ids

    specials = torch.tensor(special_ids(model.tokenizer), dtype=torch.long)
    chosen, total = [], 0
    for start in range(0, len(pool), 256):
        chunk = pool[start : start + 256]
        enc = _encode(model, chunk, max_length)
        attn = enc["attention_mask"].bool()
        counted = attn & ~torch.isin(enc["input_ids"], specials)
        counted &= attn.long().cumsum(1) > exclude_first
        for text, n in zip(chunk, counted.sum(1).tolist(), strict=True):
            if total >= budget:
                return chosen, total
            chosen.append(text)
            total += int(n)
    return chosen, total


class _ShardBatches:
    """Shuffled ``[batch_size, d]`` batches over ``capture_dataset`` shards, forever:
    each pass visits the shards in a seeded order through one shuffling buffer."""

    def __init__(self, acts: Any, hook: str, batch_size: int, buffer_rows: int, seed: int):
        self.acts, self.hook = acts, hook
        self.batch_size, self.seed = batch_size, seed
        rows = len(acts)
        self.capacity = max(2 * batch_size, min(buffer_rows, rows))

    def __iter__(self) -> Iterator[Tensor]:
        from interp.runs.capture import _read_shard

        gen = torch.Generator().manual_seed(self.seed)
        shards = list(self.acts.meta["shards"])
        buf: _ShuffleBuffer | None = None
        for _ in itertools.count():
            for i in torch.randperm(len(shards), generator=gen).tolist():
                rows = _read_shard(self.acts.path / shards[i]).acts[self.hook]
                if buf is None:
                    buf = _ShuffleBuffer(
                        self.capacity, rows.shape[1], rows.dtype, self.batch_size, gen
                    )
                yield from buf.add(rows)


# ---- the pipeline --------------------------------------------------------------------------


def run_pipeline(
    cfg: PipelineConfig,
    *,
    model: Any = None,
    on_step: Callable[[StepMetrics], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the pipeline into ``cfg.out``; returns the report (also written to
    ``out/report.json``). ``model``: an already loaded ``HookedModel`` (default:
    ``interp.load(cfg.model, dtype=cfg.dtype, device=cfg.device)``). ``on_step`` is passed
    to ``train_sae``."""
    from interp.runs import capture_dataset

    started = time.perf_counter()
    cpu_started = time.process_time()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out = Path(cfg.out)
    texts = _read_texts(cfg)  # first: a bad --data fails before any file or model load
    rank, world = _world()
    if cfg.batch_size % world:
        raise ValueError(
            f"batch_size={cfg.batch_size} must divide evenly over the {world} processes"
        )
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _check_settings(out, cfg)
    _barrier(world)
    if rank != 0:
        _check_settings(out, cfg)
    clock = _Clock()

    if model is None:
        import interp

        model = clock.run(
            "load_model", lambda: interp.load(cfg.model, dtype=cfg.dtype, device=cfg.device)
        )
    if model.tokenizer is None:
        raise ValueError("the pipeline needs a model with a tokenizer")
    resolved = model.resolve(cfg.hook_name)
    if list(resolved) != [cfg.hook_name]:
        raise ValueError(f"hook_name {cfg.hook_name!r} resolves to {resolved}, not one hook")

    eval_texts, pool = texts[-cfg.eval_texts :], texts[: -cfg.eval_texts]
    budget = cfg.capture_tokens if cfg.capture_tokens is not None else cfg.tokens
    train_texts, n_counted = _select_train_texts(
        model, pool, budget, cfg.max_length, cfg.exclude_first
    )

    # ---- cache ----
    act_dir = out / "activations"
    cached = (act_dir / "meta.json").exists()

    def cache() -> Any:
        from interp.positions import Batch

        enc = _encode(model, train_texts, cfg.max_length)
        attn = enc["attention_mask"].bool()
        rows = attn & (attn.long().cumsum(1) > cfg.exclude_first)
        batch = Batch(enc["input_ids"], enc["attention_mask"], masks={"sae_rows": rows})
        return capture_dataset(
            model,
            batch.to(model.device),
            [cfg.hook_name],
            positions="sae_rows",
            batch_size=cfg.text_batch_size,
            to=act_dir,
            progress=cfg.progress,
        )

    acts = clock.run("cache", cache, skipped=cached)
    n_rows = len(acts)
    if n_rows == 0:
        raise ValueError("the training texts gave no activation rows (all special/padding?)")

    # ---- train ----
    ckpt = out / "train" / CHECKPOINT_NAME
    trained = ckpt.exists() and _checkpoint_step(ckpt) >= cfg.steps
    d_in = int(next(iter(acts)).acts[cfg.hook_name].shape[1])

    def train() -> Any:
        sae = TopKSAE(
            d_in,
            cfg.d_sae,
            cfg.k,
            hook_name=cfg.hook_name,
            model_name=cfg.model,
            generator=torch.Generator().manual_seed(cfg.seed),
            init=cfg.init,
        )
        device = cfg.device if cfg.device is not None else str(model.device)
        sae.to(device)
        train_cfg = SAETrainConfig(
            lr=cfg.lr,
            optimizer=cfg.optimizer,
            b_dec_init=cfg.b_dec_init,
            warmup_steps=None if cfg.warmup_steps is None else min(cfg.warmup_steps, cfg.steps),
            dead_tokens=cfg.dead_tokens,
            max_steps=cfg.steps,
            seed=cfg.seed,
            checkpoint_dir=out / "train",
            checkpoint_every=cfg.checkpoint_every,
            progress=cfg.progress,
        )
        batches = _ShardBatches(acts, cfg.hook_name, cfg.batch_size, cfg.buffer_rows, cfg.seed)
        # data parallel: every rank draws the same global batches and trains on its slice
        mine = batches if world == 1 else (b.chunk(world)[rank] for b in batches)
        return train_sae(sae, mine, train_cfg, on_step=on_step)

    result = clock.run("train", train, skipped=trained)
    if rank != 0:  # rank 0 exports, evaluates and reports
        _barrier(world)
        return json.loads((out / "report.json").read_text())
    sae = result.sae

    # ---- export ----
    sae_dir = out / "sae"
    exported = trained and (sae_dir / "cfg.json").exists()
    if exported:
        clock.run("export", lambda: None, skipped=True)
    else:
        clock.run("export", lambda: save_saelens(sae, sae_dir))
    sae = load_topk_saelens(sae_dir).to(sae.W_enc.device)  # evaluate what was exported

    # ---- evaluate ----
    eval_path = out / "eval.json"
    if eval_path.exists() and exported:
        metrics = clock.run("evaluate", lambda: json.loads(eval_path.read_text()), skipped=True)
    else:

        def evaluate() -> dict[str, Any]:
            report = evaluate_on_model(
                model,
                sae,
                eval_texts,
                cfg.hook_name,
                batch_size=cfg.text_batch_size,
                max_length=cfg.max_length,
                exclude_first=cfg.exclude_first,
                dead_threshold=cfg.dead_threshold,
                dense_threshold=cfg.dense_threshold,
                top_n=cfg.top_n,
                progress=cfg.progress,
            )
            _write_json(out / "top_examples.json", top_examples_json(report))
            summary = report.summary()
            summary["dead_latents"] = report.dead_latents
            summary["dense_latents"] = report.dense_latents
            _write_json(eval_path, summary)
            return summary

        metrics = clock.run("evaluate", evaluate)

    history = result.history
    last = history[-1] if history else None
    report = {
        "settings": asdict(cfg),
        "data": {
            "texts": len(texts),
            "train_texts": len(train_texts),
            "eval_texts": len(eval_texts),
            "train_tokens_available": n_counted,
            "activation_rows": n_rows,
            "epochs": round(result.tokens / n_rows, 3),
        },
        "train": {
            "steps": result.steps,
            "tokens": result.tokens,
            "final_fvu": None if last is None else last.fvu,
            "final_l0": None if last is None else last.l0,
            "final_dead_fraction": None if last is None else last.dead_fraction,
        },
        "eval": metrics,
        "paths": {
            "sae": str(sae_dir),
            "activations": str(act_dir),
            "checkpoint": str(ckpt),
            "eval": str(eval_path),
            "top_examples": str(out / "top_examples.json"),
        },
        "timing": {
            "stages": clock.stages,
            "wall_s": round(time.perf_counter() - started, 3),
            "cpu_s": round(time.process_time() - cpu_started, 3),
            "load_average_start": load_start,
            "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": str(sae.W_enc.device),
        },
    }
    report["timing"]["processes"] = world
    _write_json(out / "report.json", report)
    _barrier(world)
    return report


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


# ---- command line --------------------------------------------------------------------------


def _parse_value(f: Any, text: str) -> Any:
    kind = str(f.type)
    if text.lower() == "none" and "None" in kind:
        return None
    if "bool" in kind:
        return text.lower() in ("1", "true", "yes")
    if "int" in kind:
        return int(float(text)) if "e" in text.lower() else int(text)
    if "float" in kind:
        return float(text)
    return text


def config_from_args(argv: list[str] | None = None) -> PipelineConfig:
    """``PipelineConfig`` from command-line flags: explicit flag > ``--config`` file >
    ``--quick`` preset > default."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m interp.sae",
        description="Cache activations, train a TopK SAE, export it in SAELens format, "
        "evaluate it on the model and write report.json; rerun to resume.",
    )
    parser.add_argument("--config", help="a JSON or YAML file of settings (field names)")
    parser.add_argument("--quick", action="store_true", help=f"small preset: {QUICK}")
    aliases = {"hook_name": ["--hook"], "data": ["--dataset"], "batch_size": ["--batch"]}
    for f in fields(PipelineConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "progress":
            parser.add_argument("--no-progress", dest="progress", action="store_const", const=False)
            continue
        parser.add_argument(
            flag, *aliases.get(f.name, []), dest=f.name, default=None, help=f"default {f.default!r}"
        )
    args = parser.parse_args(argv)
    settings: dict[str, Any] = {}
    if args.quick:
        settings.update(QUICK)
    if args.config:
        settings.update(_read_config_file(Path(args.config)))
    by_name = {f.name: f for f in fields(PipelineConfig)}
    for name, f in by_name.items():
        value = getattr(args, name)
        if value is not None:
            settings[name] = value if name == "progress" else _parse_value(f, value)
    return PipelineConfig(**settings)


def _read_config_file(path: Path) -> Mapping[str, Any]:
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in fields(PipelineConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
    return data


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(argv)
    group = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launched by torchrun
    if group:
        import torch.distributed as dist

        on_gpu = (cfg.device is None and torch.cuda.is_available()) or str(cfg.device).startswith(
            "cuda"
        )
        if on_gpu:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            cfg = replace(cfg, device=f"cuda:{local}")
        dist.init_process_group("nccl" if on_gpu else "gloo")
    try:
        report = run_pipeline(cfg)
    finally:
        if group:
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    ev = report["eval"]
    print(
        f"{cfg.out}: FVU {ev['fvu']:.4f}, L0 {ev['l0']:.1f}, CE loss recovered "
        f"{ev['ce_loss_recovered']:.4f}, dead {ev['dead_fraction']:.3f}, "
        f"dense {ev['dense_fraction']:.3f}; wall {report['timing']['wall_s']:.1f} s, "
        f"CPU {report['timing']['cpu_s']:.1f} s"
    )
    return 0
