"""TransformerLens models carrying the weights of interp's tiny Hugging Face models, for the
tests that compare the two backends on identical weights."""

from __future__ import annotations

from typing import Any


def hooked_gpt2(hf: Any, hooked_transformer_cls: Any, **config: Any) -> Any:
    """A ``HookedTransformer`` with the weights of the tiny Hugging Face GPT-2 ``hf``
    (``b_U`` stays zero: GPT-2 has no unembedding bias); ``config`` overrides fields of its
    ``HookedTransformerConfig``."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_ctx=c.n_positions,
        d_head=c.n_embd // c.n_head,
        n_heads=c.n_head,
        d_mlp=c.n_inner,
        d_vocab=c.vocab_size,
        act_fn="gelu_new",
        normalization_type="LN",
        eps=c.layer_norm_epsilon,
        **config,
    )
    ht = hooked_transformer_cls(cfg)
    ht.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    return ht
