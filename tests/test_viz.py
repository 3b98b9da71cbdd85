"""interp.viz: offline circuitsvis renders (checked in headless Chromium) and PNG figures."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import interp
from interp import viz
from interp.moe import RoutingTrace

pytest.importorskip("circuitsvis")
pytest.importorskip("matplotlib")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.path.exists("/usr/bin/chromium"):
    CHROMIUM = "/usr/bin/chromium"

_SCRIPT = re.compile(r"<script\b.*?</script>", re.DOTALL | re.IGNORECASE)
_PROPS = re.compile(r"CircuitsVis\.render\(\s*\"[^\"]+\",\s*CircuitsVis\.(\w+),\s*(\{.*\})\s*\)")


def props(h: viz.Html) -> tuple[str, dict]:
    """The component name and the props JSON a render passes to CircuitsVis.render."""
    m = _PROPS.search(h.fragment)
    assert m is not None
    return m.group(1), json.loads(m.group(2))


def without_scripts(page: str) -> str:
    return _SCRIPT.sub("", page)


@pytest.fixture(scope="module")
def trace() -> RoutingTrace:
    """A hand-made routing trace: 2 examples (5 and 3 tokens), 3 MoE layers, top-2 of 6."""
    g = torch.Generator().manual_seed(0)
    n_tok, n_layers, k = 8, 3, 2
    indices = torch.stack([torch.randperm(6, generator=g)[:k] for _ in range(n_layers * n_tok)])
    weights = torch.rand(n_layers * n_tok, k, generator=g).softmax(-1)
    return RoutingTrace(
        layers=(1, 3, 5),
        n_experts=6,
        indices=indices.reshape(n_layers, n_tok, k).to(torch.int8),
        weights=weights.reshape(n_layers, n_tok, k).half(),
        lengths=torch.tensor([5, 3]),
        positions=torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]),
    )


# -- self-contained HTML --------------------------------------------------------------------------
def test_render_is_inlined_and_offline(tmp_path):
    h = viz.token_values_html(["a", "b"], torch.tensor([0.5, -1.0]))
    assert "CircuitsVis.render(" in h.fragment and "unpkg" not in h.fragment
    assert "sourceMappingURL" not in h.fragment
    assert h.fragment.lstrip().startswith("<div") and "/>" not in h.fragment[:120]
    path = h.save(tmp_path / "t.html", title="x <y>")
    page = path.read_text(encoding="utf-8")
    viz.assert_self_contained(page)
    assert re.search(r"<script[^>]*\bsrc\s*=", page, re.IGNORECASE) is None
    assert not re.search(r"""from\s*["']https?://""", page)
    assert "<title>x &lt;y&gt;</title>" in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.html"]  # no temp file left


def test_cdn_render_is_refused(tmp_path):
    import circuitsvis.tokens

    rendered = circuitsvis.tokens.colored_tokens(["a"], [1.0])
    with pytest.raises(ValueError, match="remote script"):
        viz.save_html(rendered.cdn_src, tmp_path / "cdn.html")
    assert not (tmp_path / "cdn.html").exists()
    for remote in (
        '<script src="//cdn.example/x.js"></script>',
        "<SCRIPT type=module src='https://cdn.example/x.js'></SCRIPT>",
        '<script type="module">const m = await import("https://a.b/c.js")</script>',
        '<link rel="stylesheet" href="https://cdn.example/x.css">',
    ):
        with pytest.raises(ValueError, match="remote script"):
            viz.assert_self_contained(remote)
    viz.assert_self_contained('<a href="https://example.com">a link is fine</a>')
    # A circuitsvis RenderedHTML itself is saved through its inlined variant.
    page = viz.save_html(rendered, tmp_path / "local.html").read_text(encoding="utf-8")
    viz.assert_self_contained(page)


def test_save_html_replaces_atomically(tmp_path):
    target = tmp_path / "page.html"
    viz.save_html("<p>old</p>", target)
    with pytest.raises(ValueError):
        viz.save_html('<script type="module">import {x} from "https://a.b/c.js"</script>', target)
    assert "<p>old</p>" in target.read_text(encoding="utf-8")
    with pytest.raises(TypeError):
        viz.save_html(3, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]


def test_token_values_single_and_multi():
    name, p = props(viz.token_values_html(["x", "y", "z"], [1, 2, 3], max_value=3.0))
    assert name == "ColoredTokens" and p["tokens"] == ["x", "y", "z"]
    assert p["values"] == [1.0, 2.0, 3.0] and p["maxValue"] == 3.0
    name, p = props(viz.token_values_html(["x", "y"], {"L0": [1.0, 0.0], "L1": np.array([2, 3])}))
    assert name == "ColoredTokensMulti" and p["labels"] == ["L0", "L1"]
    assert p["values"] == [[1.0, 2.0], [0.0, 3.0]]
    with pytest.raises(ValueError, match="2 tokens but values has 3"):
        viz.token_values_html(["x", "y"], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="labels"):
        viz.token_values_html(["x"], torch.ones(1, 2), labels=["a"])
    with pytest.raises(ValueError, match="single series"):
        viz.token_values_html(["x"], torch.ones(1, 2), max_value=1.0)


def test_expert_choices_from_trace_and_tensors(trace):
    toks = ["<s>", "Hi", " ze", "bra", "!"]
    name, p = props(viz.expert_choices_html(toks, trace))
    tr = trace.select([0])
    assert name == "ColoredTokensMulti" and p["tokens"] == toks
    values = torch.tensor(p["values"])
    # Reference: the dense gate weight of every (layer, expert) at every token.
    col = 0
    for li, layer in enumerate(tr.layers):
        dense = torch.zeros(len(toks), tr.n_experts)
        for t in range(len(toks)):
            for j in range(tr.top_k):
                dense[t, int(tr.indices[li, t, j])] += float(tr.weights[li, t, j])
        for e in range(tr.n_experts):
            if bool((tr.indices[li] == e).any()):
                assert p["labels"][col] == f"L{layer} E{e}"
                torch.testing.assert_close(values[:, col], dense[:, e])
                col += 1
    assert col == len(p["labels"])
    # Tensors of one layer, without weights: 1 where chosen.
    _, q = props(viz.expert_choices_html(toks, tr.indices[1], layer_labels=["mlp1"]))
    chosen = torch.tensor(q["values"])
    assert set(chosen.unique().tolist()) <= {0.0, 1.0}
    assert (chosen.sum(1) == tr.top_k).all() and q["labels"][0].startswith("mlp1 E")
    _, r = props(viz.expert_choices_html(toks, trace, layers=[5]))
    assert r["labels"] and all(lab.startswith("L5 ") for lab in r["labels"])
    # The second example of the trace: its own 3 tokens.
    _, s = props(viz.expert_choices_html(["a", "b", "c"], trace, example=1))
    assert len(s["values"]) == 3
    with pytest.raises(ValueError, match="5 tokens but indices has 3"):
        viz.expert_choices_html(toks, trace, example=1)
    with pytest.raises(ValueError, match="expert ids"):
        viz.expert_choices_html(["a"], torch.tensor([[5]]), n_experts=4)


def test_attention_shapes():
    name, p = props(viz.attention_html(["a", "b"], torch.tensor([[1.0, 0.0], [0.5, 0.5]])))
    assert name == "AttentionHeads" and len(p["attention"]) == 1 and p["maskUpperTri"] is True
    with pytest.raises(ValueError, match="pattern"):
        viz.attention_html(["a", "b"], torch.ones(2, 2, 3))
    with pytest.raises(ValueError, match="head names"):
        viz.attention_html(["a", "b"], torch.ones(2, 2, 2), head_names=["h"])


def test_heavy_imports_are_inside_functions():
    """`import interp.viz` must not import circuitsvis or matplotlib (module-level imports)."""
    import ast

    tree = ast.parse(Path(viz.__file__).read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert names and not [m for m in names if m.split(".")[0] in {"circuitsvis", "matplotlib"}]
    assert "viz" in interp.__all__


# -- the render really runs in a browser -------------------------------------------------------------
def dump_dom(path: Path, tmp_path: Path, budget_ms: int = 10000) -> str:
    """The page's DOM after headless Chromium ran its scripts (``budget_ms`` of virtual
    time), scripts removed."""
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / f'profile{budget_ms}'}",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return without_scripts(out.stdout)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_renders_in_headless_chromium(tmp_path, trace, tiny_model):
    from interp.positions import tokenize

    words = ["zebraqx", "quokkaqx", "narwhalqx"]
    feature = viz.token_values_html(words, torch.tensor([0.2, -0.7, 1.0]))
    toks = ["<s>", "Hi", " ze", "bra", "!"]
    experts = viz.expert_choices_html(toks, trace, layer_labels=["mooselayer0", "m1", "m2"])
    heads = ["okapihead0", "okapihead1"]
    attn = viz.attention_html(words, torch.rand(2, 3, 3).softmax(-1), head_names=heads)
    # Attention views from a capture of a left-padded batch: row 0 is 16 pads, then "zebra".
    batch = tokenize(tiny_model, TEXTS, padding_side="left")
    captured = viz.attention_view(tiny_model, batch, 1, heads=[0, 3])
    patterns = viz.attention_view(tiny_model, batch, 1, kind="patterns")
    path = viz.save_html([feature, experts, attn, captured, patterns], tmp_path / "page.html")
    page = path.read_text(encoding="utf-8")

    # Before JavaScript runs, these strings exist only inside the <script> props.
    static = without_scripts(page)
    for s in [*words, *heads, "mooselayer0 E"]:
        assert s in page and s not in static

    rendered = dump_dom(path, tmp_path)
    if not re.search(r'<canvas width="5" height="5"', rendered):
        # On a loaded machine the pattern canvases may not be drawn within the first budget
        # (seen once in a parallel run): dump once more with a longer one.
        rendered = dump_dom(path, tmp_path, budget_ms=30000)
    # ColoredTokens puts every token in its own <span>.
    for w in words:
        assert re.search(rf"<span[^>]*>{w}</span>", rendered), w
    assert 'class="colored-tokens"' in rendered
    # ColoredTokensMulti: one selector per (layer, expert) series, then the tokens.
    first = trace.select([0]).indices[0]
    assert rendered.count("mooselayer0 E") == len(first.unique())
    # AttentionHeads: a titled canvas per head.
    for h in heads:
        assert h in rendered
    assert rendered.count("<canvas") >= len(heads)
    # The captured AttentionHeads: a titled thumbnail per head, the first one zoomed.
    assert "L1H0" in rendered and "L1H3" in rendered and "L1H0 Zoomed" in rendered
    assert "L1H0" not in static
    # AttentionPatterns: 5 x 5 canvases (the row without its padding; the head thumbnails
    # may not be drawn yet when the DOM is dumped, so no count), and one button per token.
    sizes = re.findall(r'<canvas width="(\d+)" height="(\d+)"', rendered)
    assert sizes and set(sizes) == {("5", "5")}
    token_panel = rendered[rendered.index('<div class="tokens">') :]
    assert re.findall(r"<button[^>]*>([^<]*)</button>", token_panel) == list("zebra")


# -- attention views from a capture ------------------------------------------------------------------
TEXTS = ["zebra", "a longer line of text"]  # the tiny tokenizer is byte-level: 5 and 21 tokens


@pytest.fixture(scope="module")
def tiny_model():
    return interp.tiny("llama", seed=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_row_strips_padding_on_either_side(tiny_model, side):
    from interp.positions import tokenize

    model = tiny_model
    batch = tokenize(model, TEXTS, padding_side=side)
    T = batch.input_ids.shape[1]
    assert T == 21 and batch.attention_mask[0].sum() == 5  # row 0 is padded by 16
    _, cache = model.run_with_cache(batch, names_filter="blocks.1.attn.hook_pattern")
    for row, text in enumerate(TEXTS):
        alone = tokenize(model, text)  # the row run by itself: no padding at all
        ref = interp.capture(model, alone, "blocks.1.attn.hook_pattern")
        ref = ref["blocks.1.attn.hook_pattern"][0]
        got = viz.attention_row(
            cache["pattern", 1], batch, model.tokenizer, row=row, heads=[3, 0], layer=1
        )
        n = len(text)
        assert got.pattern.shape == (2, n, n) and len(got.tokens) == n
        assert got.tokens == viz.str_tokens(model.tokenizer, alone.input_ids[0]) == list(text)
        torch.testing.assert_close(got.pattern, ref[[3, 0]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.pattern.sum(-1), torch.ones(2, n))  # rows still sum to 1
        assert got.head_names == ["L1H3", "L1H0"] and got.heads == (3, 0)
        pad = T - n
        start = pad if side == "left" and row == 0 else 0
        assert got.columns.tolist() == list(range(start, start + n))


def test_attention_view_from_a_model_and_from_a_cache(tiny_model):
    from interp.positions import tokenize

    model = tiny_model
    batch = tokenize(model, TEXTS, padding_side="left")
    name, p = props(viz.attention_view(model, batch, 2, heads=[1, 2]))
    assert name == "AttentionHeads" and p["tokens"] == list("zebra")
    assert p["attentionHeadNames"] == ["L2H1", "L2H2"] and p["maskUpperTri"] is True
    attention = torch.tensor(p["attention"])
    assert attention.shape == (2, 5, 5)
    _, cache = model.run_with_cache(batch)
    by_cache = viz.attention_view(cache, batch, -1, heads=[1, 2], tokenizer=model.tokenizer)
    _, q = props(by_cache)
    assert q["tokens"] == p["tokens"] and q["attentionHeadNames"] == p["attentionHeadNames"]
    torch.testing.assert_close(torch.tensor(q["attention"]), attention)
    # Text is tokenized by the model (right padding); the long row has no padding.
    name, r = props(viz.attention_view(model, TEXTS, 0, row=1, kind="patterns"))
    assert name == "AttentionPatterns" and r["tokens"] == list(TEXTS[1])
    assert torch.tensor(r["attention"]).shape == (model.cfg.n_heads, 21, 21)
    ids = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    _, s = props(viz.attention_view(cache, ids, 2, heads=[1, 2], tokenizer=model.tokenizer))
    assert s["tokens"] == p["tokens"]


def test_attention_view_wrong_input_names_the_shapes(tiny_model):
    from interp.positions import tokenize

    model = tiny_model
    batch = tokenize(model, TEXTS)
    _, cache = model.run_with_cache(batch, names_filter="blocks.*.attn.hook_pattern")
    pattern = cache["pattern", 0]  # [2, 4, 21, 21]
    tok = model.tokenizer
    with pytest.raises(ValueError, match=r"\(2, 4, 21, 20\).*\[batch=2, heads, 21, 21\]"):
        viz.attention_row(pattern[..., :20], batch, tok)
    with pytest.raises(ValueError, match=r"\(1, 4, 21, 21\).*input_ids of shape \(2, 21\)"):
        viz.attention_row(pattern[:1], batch, tok)
    last = interp.capture(model, batch, "blocks.0.attn.hook_pattern", positions=-1)
    with pytest.raises(ValueError, match=r"\(2, 4, 21\).*every position"):
        viz.attention_view(last, batch, 0, tokenizer=tok)
    with pytest.raises(ValueError, match="row must be an int in"):
        viz.attention_row(pattern, batch, tok, row=2)
    with pytest.raises(ValueError, match=r"heads must be ints in \[0, 4\)"):
        viz.attention_row(pattern, batch, tok, heads=[4])
    with pytest.raises(ValueError, match="layer must be an int"):
        viz.attention_view(model, batch, 3)
    with pytest.raises(KeyError, match=r"blocks\.1\.attn\.hook_pattern"):
        viz.attention_view(last, batch, 1, tokenizer=tok)
    with pytest.raises(TypeError, match="text needs the model"):
        viz.attention_view(cache, TEXTS, 0, tokenizer=tok)
    with pytest.raises(TypeError, match="tokenizer="):
        viz.attention_view(cache, batch, 0)
    with pytest.raises(ValueError, match="kind must be"):
        viz.attention_view(model, batch, 0, kind="head")
    with pytest.raises(ValueError, match="no head names"):
        viz.attention_html(["a"], torch.ones(1, 1, 1), kind="patterns", head_names=["h"])


# -- figures ---------------------------------------------------------------------------------------
PNG = b"\x89PNG\r\n\x1a\n"


def test_figures_write_pngs_without_touching_pyplot(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    m = torch.tensor([[0.1, -0.4, float("nan")], [0.3, 0.0, 0.2]])
    paths = [
        viz.heatmap(m, ["a", "b", "c"], ["r0", "r1"], "t", tmp_path / "h.png", annotate=True),
        viz.heatmap(np.abs(np.random.default_rng(0).normal(size=(4, 4))), path=tmp_path / "p.png"),
        viz.line_with_band(
            [0, 1, 2],
            {"cond a": [0.1, 0.2, 0.3], "cond b": torch.tensor([0.0, 0.1, 0.0])},
            [-0.1, -0.1, -0.1],
            [0.1, 0.1, 0.1],
            tmp_path / "sub" / "l.png",
            hline=0.0,
        ),
        viz.line_with_band(
            [0, 1], {"a": [1.0, 2.0]}, {"a": [0.5, 1.5]}, {"a": [1.5, 2.5]}, tmp_path / "l2.png"
        ),
        viz.bars_with_interval(
            ["x", "y"], [0.3, -0.2], [0.1, -0.5], [0.4, 0.0], tmp_path / "b.png"
        ),
    ]
    for p in paths:
        assert isinstance(p, Path) and p.read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "b.png",
        "h.png",
        "l2.png",
        "p.png",
        "sub",
    ]
    fig = viz.heatmap([[1, 2], [3, 4]])
    assert type(fig).__name__ == "Figure"
    assert viz.save_png(fig, tmp_path / "f.png").read_bytes()[:8] == PNG
    assert matplotlib.get_backend() == backend
    assert (
        "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()
    )


def test_figure_validation():
    with pytest.raises(ValueError, match="2-D"):
        viz.heatmap([1.0, 2.0])
    with pytest.raises(ValueError, match="xlabels"):
        viz.heatmap([[1.0, 2.0]], xlabels=["a"])
    with pytest.raises(ValueError, match="points"):
        viz.line_with_band([0, 1], {"a": [1.0]})
    with pytest.raises(ValueError, match="both"):
        viz.line_with_band([0, 1], {"a": [1.0, 2.0]}, band_low=[0.0, 0.0])
    with pytest.raises(ValueError, match="labels"):
        viz.bars_with_interval(["a"], [1.0, 2.0])


def test_str_tokens_decodes_each_id_and_drops_padding():
    class Tok:
        def decode(self, ids):
            return "".join(f"<{i}>" for i in ids)

    ids = torch.tensor([[0, 7, 8]])
    assert viz.str_tokens(Tok(), ids[0]) == ["<0>", "<7>", "<8>"]
    assert viz.str_tokens(Tok(), ids, torch.tensor([[0, 1, 1]])) == ["<7>", "<8>"]
