"""interp.probes.held_out_layer_probe (layer chosen on validation rows, one test with baselines,
cluster bootstrap by group, Holm) and token_counts (a bag of tokens)."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from interp import stats
from interp.probes import fit_probe, held_out_layer_probe, token_counts


def naive_auroc(p: torch.Tensor, y: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted half, over every pair."""
    pos, neg = p[y].tolist(), p[~y].tolist()
    wins = sum((a > b) + 0.5 * (a == b) for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def planted(n_groups: int = 40, k: int = 4, d: int = 64, seed: int = 0):
    """``k`` rows per group; groups dealt val / test / train / train; only layer 2 carries the
    label (every layer can fit the training rows perfectly: d > rows per split)."""
    g = torch.Generator().manual_seed(seed)
    n = n_groups * k
    groups = [f"p{i // k}" for i in range(n)]
    split = [("val", "test", "train", "train")[(i // k) % 4] for i in range(n)]
    y = torch.rand(n, generator=g) < 0.5
    acts = torch.randn(4, n, d, generator=g)
    acts[2, :, 0] += 3.0 * y
    counts = torch.poisson(torch.full((n, 30), 2.0), generator=g)
    return acts, counts, y, groups, split


def test_the_layer_is_chosen_on_validation_and_compared_with_a_bag_of_words():
    acts, counts, y, groups, split = planted()
    opts = dict(n_boot=200, n_perm=200, seed=0)
    res = held_out_layer_probe(acts, y, split, groups, {"layer0": acts[0], "bow": counts}, **opts)
    assert res.best_layer == 2
    assert res.test["probe"]["auroc"]["estimate"] > 0.9
    assert res.differences["probe_minus_bow"]["low"] > 0.2
    assert res.test["probe"]["p_holm"] < 0.05 and res.test["bow"]["p_holm"] > 0.05
    assert res.n == {"train": 80, "val": 40, "test": 40} and res.n_test_groups == 10
    assert set(res.as_dict()) == {
        "best_layer",
        "validation_auroc_by_layer",
        "test",
        "differences",
        "n",
        "n_test_groups",
    }
    # the label in the token counts instead: the bag of words wins
    counts[:, 5] += 4.0 * y
    acts[2, :, 0] -= 3.0 * y
    res = held_out_layer_probe(acts, y, split, groups, {"layer0": acts[0], "bow": counts}, **opts)
    assert res.test["bow"]["auroc"]["estimate"] > 0.9
    assert res.differences["probe_minus_bow"]["high"] < 0


def test_equals_a_naive_reference():
    """Layer choice, validation and test AUROCs, permutation p-values and Holm recomputed by
    hand (pairwise AUROC, fits on the named rows only)."""
    acts, counts, y, groups, split = planted(n_groups=24, seed=3)
    res = held_out_layer_probe(
        acts, y, split, groups, {"bow": counts}, l2=0.1, n_boot=50, n_perm=99
    )
    rows = {s: torch.tensor([q == s for q in split]) for s in ("train", "val", "test")}
    tr, va, te = rows["train"], rows["val"], rows["test"]
    val = [naive_auroc(fit_probe(a[tr], y[tr], l2=0.1).predict_proba(a[va]), y[va]) for a in acts]
    assert res.validation_auroc_by_layer == pytest.approx(val, abs=1e-12)
    assert res.best_layer == max(range(4), key=lambda i: val[i])
    fit, yt = tr | va, y[te]
    p_raw = []
    for name, x in (("probe", acts[res.best_layer]), ("bow", counts)):
        p = fit_probe(x[fit], y[fit], l2=0.1).predict_proba(x[te])
        assert res.test[name]["auroc"]["estimate"] == pytest.approx(naive_auroc(p, yt), abs=1e-12)
        ref = stats.permutation_test(
            p[yt].double(),
            p[~yt].double(),
            statistic=stats.auroc,
            n_perm=99,
            alternative="greater",
            seed=0,
        )
        assert res.test[name]["permutation"]["p_value"] == ref.p_value
        p_raw.append(ref.p_value)
    lo, hi = sorted(p_raw)
    holm = [min(1.0, 2 * lo), min(1.0, max(2 * lo, hi))]  # Holm for two tests
    assert sorted(t["p_holm"] for t in res.test.values()) == pytest.approx(holm)


def test_intervals_resample_groups_not_rows():
    """Three copies of every row of a group add no information: with a cluster bootstrap by
    group the test intervals stay the same (a row bootstrap would narrow them ~1.7x)."""
    g = torch.Generator().manual_seed(1)
    n = 120
    groups = [f"p{i}" for i in range(n)]
    split = [("val", "test", "train", "train")[i % 4] for i in range(n)]
    y = torch.rand(n, generator=g) < 0.5
    acts = torch.randn(3, n, 16, generator=g)
    acts[1, :, 0] += 1.0 * y
    counts = torch.poisson(torch.full((n, 20), 2.0), generator=g)
    opts = dict(n_boot=300, n_perm=50, seed=0)
    one = held_out_layer_probe(acts, y, split, groups, {"bow": counts}, **opts)
    rep = torch.arange(n).repeat_interleave(3)
    three = held_out_layer_probe(
        acts[:, rep],
        y[rep],
        [split[i] for i in rep],
        [groups[i] for i in rep],
        {"bow": counts[rep]},
        **opts,
    )
    assert three.best_layer == one.best_layer == 1
    for name in ("probe", "bow"):
        a, b = one.test[name]["auroc"], three.test[name]["auroc"]
        assert b["estimate"] == pytest.approx(a["estimate"], abs=1e-6)
        assert b["high"] - b["low"] == pytest.approx(a["high"] - a["low"], rel=0.1)


def test_bad_inputs_are_refused():
    acts, counts, y, groups, split = planted(n_groups=8)
    with pytest.raises(ValueError, match="split names are train, val and test"):
        held_out_layer_probe(acts, y, ["dev" if q == "val" else q for q in split], groups)
    with pytest.raises(ValueError, match="split names"):
        held_out_layer_probe(acts, y, split[:-1], groups)
    with pytest.raises(ValueError, match="none named 'probe'"):
        held_out_layer_probe(acts, y, split, groups, {"probe": counts})
    with pytest.raises((ValueError, TypeError)):  # jaxtyping's check comes first in tests
        held_out_layer_probe(acts, y, split, groups, {"bow": counts[1:]})
    one_class = y.clone()
    one_class[[q == "test" for q in split]] = True
    with pytest.raises(ValueError, match="test split has one label class"):
        held_out_layer_probe(acts, one_class, split, groups)


class WordTokenizer:
    """Whitespace tokens; ids in first-seen order of a fixed vocabulary."""

    vocab = ("<pad>", "a", "b", "c", "d", "e")

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert not add_special_tokens
        return {"input_ids": [self.vocab.index(w) for w in text.split()]}


def test_token_counts_equal_a_counter_and_keep_the_fitted_vocabulary():
    texts = ["a b a", "c", "b e e", ""]
    tok = WordTokenizer()
    ref = [Counter(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    full = token_counts(tok, texts)
    seen = [i for i in range(len(tok)) if any(r[i] for r in ref)]  # 1 a, 2 b, 3 c, 5 e
    assert full.tolist() == [[r[i] for i in seen] for r in ref]
    fitted = torch.tensor([True, False, True, True])  # "c" only in a held-out row
    part = token_counts(tok, texts, fitted)
    kept = [i for i in seen if any(r[i] for r, f in zip(ref, fitted.tolist(), strict=True) if f)]
    assert kept == [1, 2, 5]
    assert part.tolist() == [[r[i] for i in kept] for r in ref]
    with pytest.raises(ValueError, match="a mask of 4 texts"):
        token_counts(tok, texts, torch.tensor([True, False]))
    assert math.isclose(float(part.sum()), 6.0)
