"""Visualization: circuitsvis renders that work offline, and matplotlib figures for reports.

Design
------
Nothing here is imported by the core; ``circuitsvis`` and ``matplotlib`` are imported
inside the functions that need them (``pip install "interp[viz]"``).

**Offline HTML.** circuitsvis's default HTML (``str(render)``, ``show_code()``) imports
its JavaScript from unpkg.com, so a saved file shows nothing without internet. The
package also ships the same bundle (``circuitsvis/dist/cdn/iife.js``) and renders it
inline through ``circuitsvis.utils.render.render_local`` — that is the ``local_src`` of
the ``RenderedHTML`` every circuitsvis function returns. :class:`Html` keeps only that
inlined render (the ``//# sourceMappingURL`` comment is dropped), and :func:`save_html`
writes it as a standalone page after :func:`assert_self_contained` has checked that no
script is loaded from a remote URL. Each render carries the ~1.3 MB bundle.

* :func:`token_values_html` — tokens colored by one value each (SAE feature
  activations, projections onto a direction), or by several named series with a
  selector (``ColoredTokens`` / ``ColoredTokensMulti``).
* :func:`expert_choices_html` — per-token MoE expert choices: one selectable series
  per (layer, expert) whose value is the gate weight the token gave that expert (0 when
  not routed there); hovering a token lists all of them.
* :func:`attention_html` — attention patterns ``[heads, dest, src]`` (``AttentionHeads``,
  or ``AttentionPatterns`` with ``kind="patterns"``).
* :func:`attention_view` — the same from a capture: one layer's ``attn.hook_pattern`` of
  one batch row, run from a model or read from an ``ActivationCache``, with the row's
  tokens from the tokenizer and its padding (left or right) stripped by the batch's
  attention mask (:func:`attention_row` returns the stripped tokens and pattern).

**Figures.** :func:`heatmap`, :func:`line_with_band` and :func:`bars_with_interval`
draw on a ``matplotlib.figure.Figure`` bound to the Agg canvas directly — not through
``pyplot`` — so they never change the global backend, need no display and leak no
figures. With ``path=`` they write a PNG atomically (temp file + rename) and return the
path; without it they return the ``Figure``.
"""

from __future__ import annotations

import html as _html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.cache import atomic_write
from interp.moe.trace import RoutingTrace

__all__ = [
    "AttentionRow",
    "Html",
    "assert_self_contained",
    "attention_html",
    "attention_row",
    "attention_view",
    "bars_with_interval",
    "expert_choices_html",
    "heatmap",
    "line_with_band",
    "paired_differences",
    "save_html",
    "save_png",
    "str_tokens",
    "token_values_html",
]

ArrayLike = Tensor | np.ndarray | Sequence[Any]

# A <script src=...>, a stylesheet <link href=...>, or an ES import/import() of an absolute
# or protocol-relative URL.
_REMOTE_SCRIPT = re.compile(
    r"""<script\b[^>]*\bsrc\s*=\s*["']?\s*(?:https?:)?//"""
    r"""|<link\b[^>]*\bhref\s*=\s*["']?\s*(?:https?:)?//"""
    r"""|\bimport\b[^;<>]{0,300}?\bfrom\s*["']\s*(?:https?:)?//"""
    r"""|\bimport\s*\(\s*["']\s*(?:https?:)?//""",
    re.IGNORECASE,
)
_SOURCE_MAP = re.compile(r"^//# sourceMappingURL=\S*\s*$", re.MULTILINE)
# circuitsvis opens its target as `<div id=… />`; HTML has no self-closing div, so the
# script and any following render would nest inside it and be wiped by the first render.
_SELF_CLOSED_DIV = re.compile(r"<div(\s[^<>]*?)\s*/>")


# -- offline HTML ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Html:
    """A circuitsvis render with its JavaScript inlined, so it works without internet.

    Attributes:
        fragment: a ``<div>`` plus the ``<script>`` that renders into it; embed it in any
            page, display it in a notebook (``_repr_html_``) or write it with ``save``.
    """

    fragment: str

    def _repr_html_(self) -> str:
        return self.fragment

    def __html__(self) -> str:
        return self.fragment

    def document(self, title: str = "interp") -> str:
        """A complete standalone HTML page around the fragment."""
        return _document([self.fragment], title)

    def save(self, path: str | Path, title: str = "interp") -> Path:
        """Write the standalone page atomically (see :func:`save_html`)."""
        return save_html(self, path, title=title)


def _local(rendered: Any) -> Html:
    """The inlined render of a circuitsvis ``RenderedHTML`` (never its CDN variant)."""
    src = _SELF_CLOSED_DIV.sub(r"<div\1></div>", rendered.local_src, count=1)
    return Html(_SOURCE_MAP.sub("", src))


def _document(fragments: Sequence[str], title: str) -> str:
    body = "\n".join(fragments)
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_html.escape(title)}</title>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def assert_self_contained(html: str) -> None:
    """Raise ``ValueError`` if ``html`` loads a script (or a stylesheet) from a remote URL."""
    m = _REMOTE_SCRIPT.search(html)
    if m is not None:
        start = max(0, m.start() - 40)
        raise ValueError(
            "HTML loads a remote script and would render nothing offline: "
            f"…{html[start : m.end() + 60]!r}…"
        )


def save_html(obj: Any, path: str | Path, *, title: str = "interp") -> Path:
    """Write one render or several (a list) as a standalone HTML page, atomically.

    ``obj`` is an :class:`Html`, a circuitsvis ``RenderedHTML`` (its inlined
    ``local_src`` is used), an HTML string, or a sequence of these (stacked in order).
    Raises ``ValueError`` if the page would load a script from a remote URL.
    """
    items = list(obj) if isinstance(obj, list | tuple) else [obj]
    fragments = []
    for item in items:
        if isinstance(item, Html):
            fragments.append(item.fragment)
        elif hasattr(item, "local_src"):
            fragments.append(_local(item).fragment)
        elif isinstance(item, str):
            fragments.append(item)
        else:
            raise TypeError(
                f"save_html takes Html, a circuitsvis render or a str, got {type(item).__name__}"
            )
    page = _document(fragments, title)
    assert_self_contained(page)
    data = page.encode("utf-8")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def str_tokens(
    tokenizer: Any, ids: Tensor | Sequence[int], attention_mask: Tensor | None = None
) -> list[str]:
    """Display strings of one row of token ids (each id decoded alone; padding dropped)."""
    t = torch.as_tensor(ids).reshape(-1)
    if attention_mask is not None:
        t = t[torch.as_tensor(attention_mask).reshape(-1).bool()]
    return [tokenizer.decode([int(i)]) for i in t.tolist()]


def _as_tensor(x: ArrayLike, name: str) -> Tensor:
    try:
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x.detach())
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a tensor, an array or a (nested) list: {exc}") from None
    return t.cpu()


def _check_tokens(tokens: Sequence[str], n: int, what: str) -> list[str]:
    tokens = [str(t) for t in tokens]
    if len(tokens) != n:
        raise ValueError(f"{len(tokens)} tokens but {what} has {n} positions")
    return tokens


def token_values_html(
    tokens: Sequence[str],
    values: ArrayLike | Mapping[str, ArrayLike],
    *,
    labels: Sequence[str] | None = None,
    min_value: float | None = None,
    max_value: float | None = None,
    negative_color: str | None = None,
    positive_color: str | None = None,
) -> Html:
    """Tokens colored by their values: feature activations, projections onto a direction, …

    Args:
        tokens: display strings, one per position (see :func:`str_tokens`).
        values: ``[pos]`` — one value per token (circuitsvis ``ColoredTokens``); or
            ``[pos, n]`` / a mapping ``label -> [pos]`` — ``n`` named series with a
            selector, hovering a token lists all its values (``ColoredTokensMulti``).
        labels: names of the ``n`` series of a ``[pos, n]`` tensor.
        min_value: lower end of the color scale of a single series (default: symmetric
            around 0).
        max_value: upper end of the color scale of a single series.
        negative_color: CSS color of negative values (single series; default red).
        positive_color: CSS color of positive values (single series; default blue).
    """
    if isinstance(values, Mapping):
        if labels is not None:
            raise ValueError("give labels either as mapping keys or as labels=, not both")
        labels = [str(k) for k in values]
        cols = [_as_tensor(v, f"values[{k!r}]").reshape(-1) for k, v in values.items()]
        if not cols:
            raise ValueError("values is an empty mapping")
        v = torch.stack([c.double() for c in cols], dim=1)
    else:
        v = _as_tensor(values, "values").double()
    if v.ndim == 1:
        if labels is not None:
            raise ValueError("labels= names the columns of [pos, n] values; values are [pos]")
        import circuitsvis.tokens

        toks = _check_tokens(tokens, v.shape[0], "values")
        return _local(
            circuitsvis.tokens.colored_tokens(
                toks,
                v.tolist(),
                min_value=min_value,
                max_value=max_value,
                negative_color=negative_color,
                positive_color=positive_color,
            )
        )
    if v.ndim != 2:
        raise ValueError(f"values must be [pos] or [pos, n], got shape {tuple(v.shape)}")
    if labels is not None and len(labels) != v.shape[1]:
        raise ValueError(f"{len(labels)} labels for {v.shape[1]} value columns")
    if any(x is not None for x in (min_value, max_value, negative_color, positive_color)):
        raise ValueError("color-scale options apply to a single series ([pos] values) only")
    import circuitsvis.tokens

    toks = _check_tokens(tokens, v.shape[0], "values")
    return _local(
        circuitsvis.tokens.colored_tokens_multi(
            toks, v.float(), list(labels) if labels is not None else None
        )
    )


def expert_choices_html(
    tokens: Sequence[str],
    indices: Tensor | RoutingTrace,
    weights: Tensor | None = None,
    *,
    example: int = 0,
    layers: Sequence[int] | None = None,
    n_experts: int | None = None,
    layer_labels: Sequence[str] | None = None,
) -> Html:
    """Which experts each token was routed to, one selectable series per (layer, expert).

    A series' value at a token is the gate weight that token gave the expert (1 if no
    ``weights`` are given) and 0 if the expert was not in its top-k; only (layer, expert)
    pairs chosen by at least one token get a series. Hovering a token lists them all.

    Args:
        tokens: display strings of the routed tokens.
        indices: ``[pos, k]`` (one layer) or ``[n_layers, pos, k]`` expert ids — e.g. a
            ``blocks.{l}.mlp.hook_expert_indices`` capture of one row — or a
            :class:`~interp.moe.RoutingTrace`, of which example ``example`` is shown with
            its gate weights, labelled by decoder layer.
        weights: gate weights shaped like ``indices`` (ignored for a trace).
        layers: keep only these layers (decoder layer ids for a trace, positions on the
            ``n_layers`` axis for a tensor).
        n_experts: experts per layer (default: the trace's, or max id + 1).
        layer_labels: names of the layers axis (default ``L{layer}``).
    """
    if isinstance(indices, RoutingTrace):
        tr = indices.select([example])
        idx, w = tr.indices.long(), tr.weights.float()
        labels = [f"L{layer}" for layer in tr.layers] if layer_labels is None else layer_labels
        keep = (
            list(range(len(tr.layers)))
            if layers is None
            else [tr.layer_index(layer) for layer in layers]
        )
        n_experts = tr.n_experts if n_experts is None else n_experts
    else:
        idx = _as_tensor(indices, "indices").long()
        if idx.ndim == 2:
            idx = idx[None]
        if idx.ndim != 3:
            raise ValueError(f"indices must be [pos, k] or [n_layers, pos, k], got {idx.ndim}-D")
        if weights is None:
            w = torch.ones(idx.shape)
        else:
            w = _as_tensor(weights, "weights").float().reshape(idx.shape)
        labels = [f"L{i}" for i in range(idx.shape[0])] if layer_labels is None else layer_labels
        keep = list(range(idx.shape[0])) if layers is None else list(layers)
    if len(labels) != idx.shape[0]:
        raise ValueError(f"{len(labels)} layer labels for {idx.shape[0]} layers")
    n_experts = int(idx.max()) + 1 if n_experts is None else n_experts
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_experts):
        raise ValueError(f"expert ids must lie in [0, {n_experts})")
    n_pos = idx.shape[1]
    series: dict[str, Tensor] = {}
    for li in keep:
        dense = torch.zeros(n_pos, n_experts)
        dense.scatter_add_(1, idx[li], w[li])
        for e in range(n_experts):
            if bool((idx[li] == e).any()):
                series[f"{labels[li]} E{e}"] = dense[:, e]
    if not series:
        raise ValueError("no expert choices to show (no layers or no tokens)")
    return token_values_html(_check_tokens(tokens, n_pos, "indices"), series)


def attention_html(
    tokens: Sequence[str],
    pattern: ArrayLike,
    *,
    head_names: Sequence[str] | None = None,
    kind: str = "heads",
    mask_upper_tri: bool = True,
    min_value: float | None = None,
    max_value: float | None = None,
) -> Html:
    """Attention patterns ``[heads, dest, src]`` (or one ``[dest, src]``) as heatmaps per head.

    ``kind="heads"`` is circuitsvis's ``attention_heads`` (a thumbnail per head, one
    enlarged; ``head_names``, ``mask_upper_tri`` — hiding the future half of causal
    attention — and the color range apply); ``kind="patterns"`` is ``attention_patterns``
    (the tokens, colored by the attention of the token hovered, per head), which takes
    none of those options.
    """
    if kind not in ("heads", "patterns"):
        raise ValueError(f"kind must be 'heads' or 'patterns', got {kind!r}")
    p = _as_tensor(pattern, "pattern").float()
    if p.ndim == 2:
        p = p[None]
    if p.ndim != 3 or p.shape[1] != p.shape[2]:
        raise ValueError(f"pattern must be [heads, pos, pos] or [pos, pos], got {tuple(p.shape)}")
    if head_names is not None and len(head_names) != p.shape[0]:
        raise ValueError(f"{len(head_names)} head names for {p.shape[0]} heads")
    import circuitsvis.attention

    toks = _check_tokens(tokens, p.shape[1], "pattern")
    if kind == "patterns":
        if head_names is not None or min_value is not None or max_value is not None:
            raise ValueError(
                "kind='patterns' (circuitsvis attention_patterns) takes no head names or color "
                "range; use kind='heads'"
            )
        return _local(circuitsvis.attention.attention_patterns(toks, p))
    return _local(
        circuitsvis.attention.attention_heads(
            p,
            toks,
            attention_head_names=list(head_names) if head_names is not None else None,
            max_value=max_value,
            min_value=min_value,
            mask_upper_tri=mask_upper_tri,
        )
    )


@dataclass(frozen=True)
class AttentionRow:
    """One batch row's attention pattern at one layer, padding stripped.

    Attributes:
        tokens: the row's display strings (:func:`str_tokens`), padding left out.
        pattern: ``[head, pos, pos]`` (query, key) over those tokens only, float32.
        heads: the head index of each entry of ``pattern``.
        columns: the batch columns kept (where the row's attention mask is 1).
        layer: the block the pattern belongs to.
    """

    tokens: list[str]
    pattern: Float[Tensor, "head pos pos"]
    heads: tuple[int, ...]
    columns: Int[Tensor, " pos"]
    layer: int

    @property
    def head_names(self) -> list[str]:
        """``"L{layer}H{head}"`` per entry of ``pattern``."""
        return [f"L{self.layer}H{h}" for h in self.heads]


def _row_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` of a ``Batch``, a dict or an id tensor (no text)."""
    from interp.positions import Batch

    if isinstance(batch, Batch):
        return batch.input_ids, batch.attention_mask
    if isinstance(batch, Mapping) and "input_ids" in batch:
        ids = torch.as_tensor(batch["input_ids"])
        mask = batch.get("attention_mask")
        return ids, torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
    if isinstance(batch, Tensor) and not batch.is_floating_point():
        ids = batch[None] if batch.ndim == 1 else batch
        return ids, torch.ones_like(ids)
    raise TypeError(
        "with a cache, pass the batch it was captured from (an interp Batch, a dict with "
        f"input_ids / attention_mask, or [batch, pos] ids), got {type(batch).__name__}; text "
        "needs the model (pass the model instead of the cache)"
    )


def attention_row(
    pattern: Float[Tensor, "..."],  # [batch, head, pos, pos]; checked below, naming the shapes
    batch: Any,
    tokenizer: Any,
    *,
    row: int = 0,
    heads: Sequence[int] | None = None,
    layer: int = 0,
) -> AttentionRow:
    """One row of a captured ``attn.hook_pattern``, its padding stripped, with its tokens.

    Args:
        pattern: ``[batch, head, pos, pos]``, captured at every position.
        batch: the ``Batch`` (or dict / ids) the pattern was captured from; its attention
            mask says which columns of ``row`` are tokens (padding on either side, or
            anywhere, is dropped from both the query and the key axis).
        tokenizer: decodes each kept token id (:func:`str_tokens`).
        row: the batch row.
        heads: keep these heads (default: all), in this order.
        layer: the block, for the head names.
    """
    ids, mask = _row_batch(batch)
    p = pattern.detach() if isinstance(pattern, Tensor) else torch.as_tensor(pattern)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(
            f"input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} must both be "
            "[batch, pos]"
        )
    B, T = ids.shape
    if p.ndim != 4 or p.shape[0] != B or p.shape[2] != T or p.shape[3] != T:
        raise ValueError(
            f"pattern of shape {tuple(p.shape)} does not fit the batch: expected [batch={B}, "
            f"heads, {T}, {T}] for input_ids of shape {(B, T)} (capture attn.hook_pattern at "
            "every position, positions=None, from this batch)"
        )
    if isinstance(row, bool) or not isinstance(row, int) or not -B <= row < B:
        raise ValueError(f"row must be an int in [-{B}, {B}) for a batch of {B} rows, got {row!r}")
    n_heads = p.shape[1]
    wanted = tuple(range(n_heads)) if heads is None else tuple(heads)
    bad = [h for h in wanted if isinstance(h, bool) or not isinstance(h, int)]
    bad += [h for h in wanted if isinstance(h, int) and not -n_heads <= h < n_heads]
    if bad or not wanted:
        raise ValueError(f"heads must be ints in [0, {n_heads}) for this pattern, got {heads!r}")
    wanted = tuple(h % n_heads for h in wanted)
    keep = mask[row].reshape(-1).bool().cpu()
    columns = keep.nonzero().flatten()
    q = p[row].cpu().float()[list(wanted)]
    q = q[:, columns][:, :, columns]
    tokens = str_tokens(tokenizer, ids[row].cpu(), keep)
    return AttentionRow(tokens, q, wanted, columns, layer)


def attention_view(
    source: Any,
    batch: Any,
    layer: int,
    *,
    row: int = 0,
    heads: Sequence[int] | None = None,
    kind: str = "heads",
    tokenizer: Any = None,
    mask_upper_tri: bool = True,
    min_value: float | None = None,
    max_value: float | None = None,
) -> Html:
    """circuitsvis attention view of one layer for one batch row, from a capture.

    The TransformerLens recipe ``cv.attention.attention_heads(cache["pattern", layer][0],
    model.to_str_tokens(text))`` in one call, with padding stripped (:func:`attention_row`):

    * ``attention_view(model, text_or_batch, layer)`` runs ``model`` on the batch and
      captures ``blocks.{layer}.attn.hook_pattern``; the tokenizer is the model's.
    * ``attention_view(cache, batch, layer, tokenizer=model.tokenizer)`` reads an
      ``ActivationCache`` (``run_with_cache``, ``capture`` at every position) holding that
      pattern; ``batch`` is the ``Batch`` (or ids) it came from.

    Args:
        layer: the block (negative counts from the end).
        row: the batch row shown; its padding (per the attention mask) is left out.
        heads: the heads shown (default: all), named ``"L{layer}H{head}"``.
        kind: ``"heads"`` (circuitsvis ``attention_heads``) or ``"patterns"``
            (``attention_patterns``); see :func:`attention_html`.
        tokenizer: for a cache source (default: the model's).
        mask_upper_tri, min_value, max_value: as in :func:`attention_html` (``"heads"``).
    """
    if isinstance(source, Mapping):
        if tokenizer is None:
            raise TypeError("a cache source needs tokenizer= (e.g. model.tokenizer)")
        n_layers = getattr(source, "meta", {}).get("n_layers")
        if layer < 0 and n_layers is not None:
            layer += int(n_layers)
        name = f"blocks.{layer}.attn.hook_pattern"
        if name not in source:
            raise KeyError(
                f"the cache has no {name!r}; capture it at every position, e.g. "
                f"interp.capture(model, batch, {name!r})"
            )
        pattern = source[name]
    else:
        from interp.activations import capture
        from interp.positions import as_batch

        n_layers = source.cfg.n_layers
        if (
            isinstance(layer, bool)
            or not isinstance(layer, int)
            or not -n_layers <= layer < n_layers
        ):
            raise ValueError(
                f"layer must be an int in [-{n_layers}, {n_layers}) for this {n_layers}-layer "
                f"model, got {layer!r}"
            )
        layer %= n_layers
        batch = as_batch(source, batch)
        name = f"blocks.{layer}.attn.hook_pattern"
        pattern = capture(source, batch, name)[name]
        tokenizer = source.tokenizer if tokenizer is None else tokenizer
    view = attention_row(pattern, batch, tokenizer, row=row, heads=heads, layer=layer)
    names = view.head_names if kind == "heads" else None
    return attention_html(
        view.tokens,
        view.pattern,
        head_names=names,
        kind=kind,
        mask_upper_tri=mask_upper_tri,
        min_value=min_value,
        max_value=max_value,
    )


# -- matplotlib --------------------------------------------------------------------------------
def _figure(figsize: tuple[float, float]) -> Any:
    """A Figure on the Agg canvas, outside pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | Path, *, dpi: int = 150) -> Path:
    """Write a matplotlib ``Figure`` as PNG atomically (temp file + rename)."""

    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def _finish(fig: Any, path: str | Path | None, dpi: int) -> Any:
    return fig if path is None else save_png(fig, path, dpi=dpi)


def _np(x: ArrayLike, name: str) -> np.ndarray:
    return _as_tensor(x, name).double().numpy()


def heatmap(
    matrix: ArrayLike,
    xlabels: Sequence[Any] | None = None,
    ylabels: Sequence[Any] | None = None,
    title: str = "",
    path: str | Path | None = None,
    *,
    xlabel: str = "",
    ylabel: str = "",
    colorbar_label: str = "",
    cmap: str | None = None,
    center: float | None = None,
    annotate: bool = False,
    fmt: str = "{:.2f}",
    figsize: tuple[float, float] | None = None,
    dpi: int = 150,
) -> Any:
    """A ``[rows, cols]`` matrix as a heatmap (rows top to bottom); NaNs show as gray.

    The color scale is diverging and symmetric around ``center`` when given, or around 0
    when the matrix has both signs (``RdBu_r``); otherwise sequential (``viridis``).
    ``annotate`` writes each value in its cell. Returns the ``Figure``, or the path
    written when ``path`` is given.
    """
    m = _np(matrix, "matrix")
    if m.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {m.shape}")
    rows, cols = m.shape
    for labels, n, what in ((xlabels, cols, "xlabels"), (ylabels, rows, "ylabels")):
        if labels is not None and len(labels) != n:
            raise ValueError(
                f"{len(labels)} {what} for {n} {'columns' if what[0] == 'x' else 'rows'}"
            )
    finite = m[np.isfinite(m)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if center is None and lo < 0 < hi:
        center = 0.0
    if center is not None:
        r = max(abs(hi - center), abs(center - lo)) or 1.0
        vmin, vmax, cmap = center - r, center + r, cmap or "RdBu_r"
    else:
        vmin, vmax, cmap = lo, hi, cmap or "viridis"
    import matplotlib

    cm = matplotlib.colormaps[cmap].with_extremes(bad="0.85")
    fig = _figure(figsize or (min(2 + 0.45 * cols, 16), min(1.5 + 0.35 * rows, 14)))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cm, vmin=vmin, vmax=vmax, aspect="auto")
    cb = fig.colorbar(im, ax=ax)
    if colorbar_label:
        cb.set_label(colorbar_label)
    if xlabels is not None:
        ax.set_xticks(range(cols), [str(s) for s in xlabels], rotation=90 if cols > 8 else 0)
    if ylabels is not None:
        ax.set_yticks(range(rows), [str(s) for s in ylabels])
    if annotate:
        mid = (vmin + vmax) / 2
        for i in range(rows):
            for j in range(cols):
                if np.isfinite(m[i, j]):
                    dark = abs(m[i, j] - mid) > 0.3 * (vmax - vmin)
                    ax.text(
                        j,
                        i,
                        fmt.format(m[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if dark else "black",
                    )
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return _finish(fig, path, dpi)


def line_with_band(
    x: ArrayLike,
    ys_by_label: Mapping[str, ArrayLike],
    band_low: ArrayLike | Mapping[str, ArrayLike] | None = None,
    band_high: ArrayLike | Mapping[str, ArrayLike] | None = None,
    path: str | Path | None = None,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    band_label: str = "null band",
    hline: float | None = None,
    markers: bool = True,
    figsize: tuple[float, float] = (6.4, 4.0),
    dpi: int = 150,
) -> Any:
    """One line per label over ``x``, with shaded bands.

    Bands are either per line (mappings ``label -> low/high``, shaded in the line's color,
    e.g. bootstrap intervals) or one shared band (arrays, shaded gray and labelled
    ``band_label``, e.g. a random-direction null). ``hline`` draws a dotted reference
    line (e.g. 0). Returns the ``Figure``, or the path written when ``path`` is given.
    """
    xs = _np(x, "x").reshape(-1)
    if (band_low is None) != (band_high is None):
        raise ValueError("give both band_low and band_high, or neither")
    per_line = isinstance(band_low, Mapping)
    if band_low is not None and per_line != isinstance(band_high, Mapping):
        raise ValueError("band_low and band_high must both be mappings or both arrays")
    fig = _figure(figsize)
    ax = fig.add_subplot()
    if band_low is not None and not per_line:
        lo, hi = _np(band_low, "band_low").reshape(-1), _np(band_high, "band_high").reshape(-1)
        if lo.shape != xs.shape or hi.shape != xs.shape:
            raise ValueError(f"band has {lo.size}/{hi.size} points for {xs.size} x values")
        ax.fill_between(xs, lo, hi, color="0.6", alpha=0.3, linewidth=0, label=band_label)
    for label, y in ys_by_label.items():
        ys = _np(y, f"ys_by_label[{label!r}]").reshape(-1)
        if ys.shape != xs.shape:
            raise ValueError(f"{label!r} has {ys.size} points for {xs.size} x values")
        (line,) = ax.plot(xs, ys, marker="o" if markers else None, markersize=3, label=label)
        if per_line and label in band_low:
            lo = _np(band_low[label], f"band_low[{label!r}]").reshape(-1)
            hi = _np(band_high[label], f"band_high[{label!r}]").reshape(-1)
            if lo.shape != xs.shape or hi.shape != xs.shape:
                raise ValueError(f"band of {label!r} has {lo.size}/{hi.size} points")
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    if hline is not None:
        ax.axhline(hline, color="0.3", linestyle=":", linewidth=1)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if ys_by_label or band_low is not None:
        ax.legend(fontsize=8)
    return _finish(fig, path, dpi)


def bars_with_interval(
    labels: Sequence[Any],
    values: ArrayLike,
    low: ArrayLike | None = None,
    high: ArrayLike | None = None,
    path: str | Path | None = None,
    *,
    title: str = "",
    xlabel: str = "",
    vline: float | None = 0.0,
    figsize: tuple[float, float] | None = None,
    dpi: int = 150,
) -> Any:
    """Horizontal bars (first label on top) with optional ``[low, high]`` interval whiskers.

    For effect sizes with bootstrap intervals, or ranked experts' risk differences.
    Returns the ``Figure``, or the path written when ``path`` is given.
    """
    v = _np(values, "values").reshape(-1)
    if len(labels) != v.size:
        raise ValueError(f"{len(labels)} labels for {v.size} values")
    if (low is None) != (high is None):
        raise ValueError("give both low and high, or neither")
    fig = _figure(figsize or (6.4, min(1.2 + 0.3 * v.size, 14)))
    ax = fig.add_subplot()
    ypos = np.arange(v.size)
    xerr = None
    if low is not None:
        lo, hi = _np(low, "low").reshape(-1), _np(high, "high").reshape(-1)
        if lo.shape != v.shape or hi.shape != v.shape:
            raise ValueError("low/high must have one value per bar")
        xerr = np.stack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])
    ax.barh(ypos, v, xerr=xerr, color="tab:blue", alpha=0.8, capsize=2)
    ax.set_yticks(ypos, [str(s) for s in labels])
    ax.invert_yaxis()
    if vline is not None:
        ax.axvline(vline, color="0.3", linewidth=0.8)
    ax.set(title=title, xlabel=xlabel)
    return _finish(fig, path, dpi)


def paired_differences(
    differences: Mapping[str, Any],
    path: str | Path | None = None,
    *,
    level: float | None = None,
    title: str = "",
    xlabel: str = "after - before (no whisker: degenerate)",
    dpi: int = 150,
) -> Any:
    """Bars of :func:`interp.stats.paired_difference` results by name (the
    ``PairedDifference`` objects or their ``as_dict()``), whiskers at the interval of
    ``level`` (default: the highest level each one has).

    A difference without intervals (degenerate: every resample equal, e.g. no row changed)
    gets a bar without whisker; one without an estimate, or without the requested
    ``level`` among its intervals, raises ``ValueError``. Returns the ``Figure``, or the
    path written when ``path`` is given.
    """
    values, low, high = [], [], []
    for name, d in differences.items():
        d = d if isinstance(d, Mapping) else d.as_dict()
        if d["estimate"] is None:
            raise ValueError(f"difference {name!r} has no estimate (undefined): leave it out")
        intervals = {float(k): v for k, v in d["intervals"].items()}
        lo, hi = d["estimate"], d["estimate"]
        if intervals:
            at = max(intervals) if level is None else float(level)
            if at not in intervals:
                raise ValueError(f"difference {name!r} has no interval at level {at}")
            lo, hi = intervals[at]
        values.append(d["estimate"])
        low.append(lo)
        high.append(hi)
    return bars_with_interval(
        list(differences), values, low, high, path, title=title, xlabel=xlabel, dpi=dpi
    )
