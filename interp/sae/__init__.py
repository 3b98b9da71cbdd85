"""Sparse autoencoders: TopK model, sparse kernels, trainer, SAELens interchange, splicing,
evaluation on a model, and the end-to-end pipeline (``python -m interp.sae``).

``TopKSAE`` (Gao et al. 2024) keeps its latents as k (index, value) pairs; encoder and
decoder backward passes touch only the selected latents (``functional``).
``train_sae`` (module ``interp.sae.train``) fits it on any iterable of activation
batches (checkpoint/resume, data parallel); ``save``/``load`` use SAELens's directory
format; ``splice`` puts it into a model through a TransformerLens-style hook;
``pooled_splice`` edits through an SAE trained on pooled rows and ``matched_features``
draws firing-rate-matched control latents, ``train_on_rows`` fits an SAE to rows held in
memory and ``ablation_nll`` gives Δ NLL per ablated latent set (``pooled``);
``ActivationStore`` streams shuffled activations from a model (or
``cache_activations``/``CachedActivations`` through disk). ``StandardSAE``/``JumpReLUSAE``
(``archs``) are SAELens's ReLU and JumpReLU SAEs for inference
(``load_saelens``/``from_saelens`` dispatch on the architecture);
``evaluate_on_model`` (``evaluation``) reports L0, FVU, CE loss recovered over real tokens,
dead/dense latents and top-activating examples; ``pipeline`` caches, trains, evaluates
and exports in one resumable command.
"""

from __future__ import annotations

from interp.sae.archs import SAE, DenseSAEConfig, JumpReLUSAE, StandardSAE
from interp.sae.evaluation import ModelEvalReport, TopExample, evaluate_on_model
from interp.sae.functional import (
    TopKActivations,
    auxk_loss,
    dense_decode,
    fvu,
    geometric_median,
    pre_activations,
    sparse_decode,
    topk_encode,
    topk_encode_dense,
)
from interp.sae.model import SAEOutput, TopKSAE, TopKSAEConfig
from interp.sae.pipeline import PipelineConfig, run_pipeline
from interp.sae.pooled import ablation_nll, matched_features, pooled_splice, train_on_rows
from interp.sae.saelens import (
    from_saelens,
    load_saelens,
    load_topk_saelens,
    save_saelens,
    to_saelens,
)
from interp.sae.splice import ce_loss_recovered, splice
from interp.sae.store import ActivationStore, CachedActivations, cache_activations
from interp.sae.train import (
    EvalMetrics,
    SAETrainConfig,
    SAETrainResult,
    StepMetrics,
    default_lr,
    evaluate,
    train_sae,
)

__all__ = [
    "SAE",
    "ActivationStore",
    "CachedActivations",
    "DenseSAEConfig",
    "EvalMetrics",
    "JumpReLUSAE",
    "ModelEvalReport",
    "PipelineConfig",
    "SAEOutput",
    "SAETrainConfig",
    "SAETrainResult",
    "StandardSAE",
    "StepMetrics",
    "TopExample",
    "TopKActivations",
    "TopKSAE",
    "TopKSAEConfig",
    "ablation_nll",
    "auxk_loss",
    "cache_activations",
    "ce_loss_recovered",
    "default_lr",
    "dense_decode",
    "evaluate",
    "evaluate_on_model",
    "from_saelens",
    "fvu",
    "geometric_median",
    "load_saelens",
    "load_topk_saelens",
    "matched_features",
    "pooled_splice",
    "pre_activations",
    "run_pipeline",
    "save_saelens",
    "sparse_decode",
    "splice",
    "to_saelens",
    "topk_encode",
    "topk_encode_dense",
    "train_on_rows",
    "train_sae",
]
