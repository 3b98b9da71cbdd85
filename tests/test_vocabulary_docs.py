"""The hook-name table in docs/concepts.md says what the code does: every documented name
exists on tiny models and has the documented shape."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import interp

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = Path(__file__).parent.parent / "docs" / "concepts.md"
ROW = re.compile(r"^\| `([^`]+)` \| `\[([^\]]+)\]` \|")


def documented() -> list[tuple[str, list[str]]]:
    text = DOC.read_text(encoding="utf-8")
    table = text[text.index("| name | shape | what |") :].split("\n\n")[0]
    rows = [ROW.match(line) for line in table.splitlines()]
    return [(m.group(1), [d.strip() for d in m.group(2).split(",")]) for m in rows if m]


def test_the_table_is_not_empty():
    names = [n for n, _ in documented()]
    assert len(names) >= 25 and "blocks.{l}.attn.hook_pattern" in names


@pytest.mark.parametrize("family", ["qwen2", "mixtral"])
def test_every_documented_name_exists_with_the_documented_shape(family):
    model = interp.tiny(family)
    ids = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    dims = {
        "batch": 2,
        "pos": 7,
        "q": 7,
        "k": 7,
        "1": 1,
        "d_model": 64,
        "n_heads": 4,
        "n_kv_heads": 2,
        "d_head": 16,
        "d_mlp": 128,
        "d_vocab": model.cfg.d_vocab,
        "n_experts": model.cfg.n_experts,
        "top_k": model.cfg.experts_per_token,
    }
    layer = model.cfg.moe_layers[0] if model.cfg.is_moe else 0
    cache = interp.capture(model, ids, list(model.hook_names))
    checked = 0
    for pattern, shape in documented():
        name = pattern.replace("{l}", str(layer))
        router = ".mlp.hook_router" in name or ".mlp.hook_expert" in name
        mlp_inside = ".mlp.hook_p" in name
        if router and not model.cfg.is_moe:
            assert name not in model.hook_names
            continue
        if mlp_inside and model.cfg.is_moe:  # MoE block's input / output, as the Bridge
            if name.endswith("hook_pre_linear"):
                assert name not in model.hook_names
            else:
                assert tuple(cache[name].shape) == (2, 7, 64), name
            continue
        value = cache[name]
        assert tuple(value.shape) == tuple(dims[d] for d in shape), name
        checked += 1
    assert checked >= 20
