"""interp.data.stratified_fractions: rows dealt into parts of given fractions within each group."""

from __future__ import annotations

import pytest
import torch

from interp.data import stratified_fractions

TYPES = ("b", "a", "c")


def rows(per_type: int = 8) -> list[dict[str, str]]:
    return [{"id": f"{t}{i}", "type": t} for t in TYPES for i in range(per_type)]


def test_a_stratified_seeded_partition():
    items = rows()
    parts = stratified_fractions(items, "type", [0.25, 0.25, 0.5], seed=3)
    flat = [r["id"] for p in parts for r in p]
    assert sorted(flat) == sorted(r["id"] for r in items)  # disjoint and complete
    for part, frac in zip(parts, (0.25, 0.25, 0.5), strict=True):
        for t in TYPES:
            assert sum(r["type"] == t for r in part) == 8 * frac
    assert all(r in items for p in parts for r in p)  # the rows themselves
    assert stratified_fractions(items, "type", [0.25, 0.25, 0.5], seed=3) == parts
    assert stratified_fractions(items, "type", [0.25, 0.25, 0.5], seed=4) != parts


def test_equals_a_naive_reference():
    """Groups in sorted order, one randperm each from one generator, cut at the rounded
    cumulative fractions; a fraction past the end takes the rest, rows past the last part
    are left out."""
    items = rows(7)
    fracs = [0.3, 0.3]  # 0.6 of each group: round(2.1) = 2, round(4.2) = 4 of 7
    got = stratified_fractions(items, "type", fracs, seed=5)
    g = torch.Generator().manual_seed(5)
    want: list[list[dict[str, str]]] = [[], []]
    for t in sorted(TYPES):
        group = [r for r in items if r["type"] == t]
        shuffled = [group[i] for i in torch.randperm(len(group), generator=g).tolist()]
        want[0] += shuffled[:2]
        want[1] += shuffled[2:4]
    assert got == want
    first, rest = stratified_fractions(items, "type", [0.3, 1], seed=5)
    assert first == want[0] and len(first) + len(rest) == len(items)


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        stratified_fractions(rows(), "type", [0.5, -0.1])
    with pytest.raises(ValueError, match="non-empty"):
        stratified_fractions(rows(), "type", [])
