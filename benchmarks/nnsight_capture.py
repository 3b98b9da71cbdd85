"""nnsight's capture, in a file of its own: nnsight compiles the body of a ``trace`` block
from source, so it must live in a file (not a lambda or stdin)."""

from __future__ import annotations


def nnsight_capture(lm, ids, n_layers: int):
    saved = []
    with lm.trace(ids):
        for i in range(n_layers):
            saved.append(lm.model.layers[i].output.save())
    return saved


def nnsight_pattern(lm, ids, n_layers: int):
    """The attention weights of every layer; ``lm`` wraps a model on eager attention
    (whose attention modules return ``(output, weights)``)."""
    saved = []
    with lm.trace(ids):
        for i in range(n_layers):
            saved.append(lm.model.layers[i].self_attn.output[1].save())
    return saved
