"""Tiny random models of every supported family, built offline from configs.

Each family gets a config small enough for a unit test (2–3 layers, d_model 64)
and a byte-level tokenizer with a ChatML chat template, so nothing is fetched
from a hub. Weights come from a seeded ``torch.Generator``-free path: we seed
the global RNG only inside ``torch.random.fork_rng`` so callers' RNG state is
left untouched.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FAMILIES", "MOE_FAMILIES", "byte_tokenizer", "tiny", "tiny_hf"]

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

# Per-family overrides on top of _COMMON. Kept deliberately small: every MoE
# family has 4 experts with top-2 routing so selection rules are exercised.
_FAMILY_KWARGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64},
    "gpt2": {"n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 256, "n_inner": 128},
    "gpt_neox": {"rotary_pct": 0.5, "use_parallel_residual": True},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "head_dim": 16,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v2": {
        "num_key_value_heads": 4,  # MLA: one KV head per query head
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "n_group": 2,
        "topk_group": 1,
        "topk_method": "group_limited_greedy",
        "q_lora_rank": None,
        "kv_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
    },
}
# DeepSeek-V3: sigmoid scores with a learned correction bias, group-limited top-k.
_FAMILY_KWARGS["deepseek_v3"] = {
    **{k: v for k, v in _FAMILY_KWARGS["deepseek_v2"].items() if k != "topk_method"},
    "routed_scaling_factor": 2.5,
}

FAMILIES: tuple[str, ...] = tuple(_FAMILY_KWARGS)
MOE_FAMILIES: tuple[str, ...] = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 byte tokens + 3 specials).

    It is a real fast tokenizer (offsets, padding, chat template) that needs no
    files, so tiny models are fully offline.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = _CHATML
    return tok


def tiny_hf(family: str, seed: int = 0, *, dtype: Any = None, **overrides: Any):
    """The raw ``transformers`` model and tokenizer of a tiny random ``family`` model.

    ``dtype`` (a ``torch.dtype`` or a name as in ``interp.load``; default float32): the
    weights are drawn in float32 from ``seed`` and then cast, so a bf16 tiny model is the
    float32 one rounded.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from interp.models import parse_dtype

    dtype = parse_dtype(dtype)
    if dtype == "auto":
        dtype = None  # built in float32: that is its own dtype
    if family not in _FAMILY_KWARGS:
        raise ValueError(f"unknown family {family!r}; interp.tiny supports: {', '.join(FAMILIES)}")
    tok = byte_tokenizer()
    kwargs = {**_COMMON, **_FAMILY_KWARGS[family], **overrides}
    kwargs.update(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    config = AutoConfig.for_model(family, **kwargs)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        for module in model.modules():
            # Zero-initialized in HF; random here so tests see it matter for selection.
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:
                with torch.no_grad():
                    bias.normal_(0.0, 0.5)
    if dtype is not None and dtype != torch.float32:
        model.to(dtype)  # asked for: the one cast, at construction
        model.config.dtype = dtype
    model.eval()
    return model, tok


def tiny(family: str, seed: int = 0, *, dtype: Any = None, **overrides: Any):
    """A small random ``HookedModel`` of ``family`` (see ``FAMILIES``), built offline;
    ``dtype`` as in ``tiny_hf`` (``"bfloat16"``, ``torch.float16`` …)."""
    from interp.adapters.hf import HFHookedModel

    model, tok = tiny_hf(family, seed=seed, dtype=dtype, **overrides)
    return HFHookedModel(model, tok)
