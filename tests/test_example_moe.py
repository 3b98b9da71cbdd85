"""End-to-end run of examples/moe_expert_steering.py on tiny:mixtral (smallest settings)."""

from __future__ import annotations

import json

import pytest
from example_helpers import example_module, non_finite, numbers

SMALLEST = [
    "--model", "tiny:mixtral",
    "--quick",
    "--n-measure", "3",
    "--n-eval", "3",
    "--n-neutral", "2",
    "--n-steer", "2",
    "--n-random", "1",
    "--n-boot", "20",
    "--n-perm", "20",
    "--answer-tokens", "2",
    "--reply-tokens", "2",
    "--batch-size", "6",
    "--threads", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def study():
    with example_module("moe_expert_steering") as module:
        yield module


@pytest.fixture(scope="module")
def run(study, tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("moe_study")
    try:
        assert study.main([*SMALLEST, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "report.json").read_text(encoding="utf-8"))


def test_report_structure(run):
    _, report = run
    assert report["status"] == "ok"
    for key in (
        "model", "settings", "data", "refusal_matcher", "routing", "risk_difference",
        "steering", "evaluation", "effects", "sanity", "headline", "limitations", "timings",
    ):  # fmt: skip
        assert key in report, key
    assert report["model"]["n_experts"] == 4 and report["model"]["top_k"] == 2
    rd = report["risk_difference"]["faithfulness"]
    assert len(rd["rd"]) == 3 and len(rd["rd"][0]) == 4  # layers × experts
    assert rd["low"] is not None and "permutation_null" in rd
    # Routing is over assistant tokens only; safety pairs are length-matched.
    tokens = report["routing"]["safety"]["tokens"]
    assert tokens[0] == tokens[1] > 0
    for name, steering in report["steering"].items():
        experts = steering["experts"]
        per_layer = {}
        for layer, _ in experts:
            per_layer[layer] = per_layer.get(layer, 0) + 1
        assert all(c <= 2 for c in per_layer.values()), name  # E - k = 2
        for control in steering["random_controls"]:
            assert sorted(layer for layer, _ in control) == sorted(layer for layer, _ in experts)
            assert not set(map(tuple, control)) & set(map(tuple, experts))
    assert "baseline" in report["evaluation"]
    assert set(report["effects"]) <= {"faith-", "faith+", "safety-", "safety+"}
    for eff in report["effects"].values():
        assert set(eff) == {
            "correct", "grounded", "answer_nll", "refused", "refusal_pref", "neutral_nll",
        }  # fmt: skip
    # The matcher recognises every shipped refusal and no shipped compliance.
    assert report["refusal_matcher"]["hits_on_shipped_refusals"] == 1.0
    assert report["refusal_matcher"]["hits_on_shipped_compliances"] == 0.0
    assert "what it cannot show" in report["limitations"]


def test_numbers_are_finite(run):
    _, report = run
    assert len(list(numbers(report))) > 100
    bad = non_finite(report)
    assert not bad, bad[:5]
    summary = report["evaluation"]["baseline"]["summary"]
    assert all(summary[k] is not None for k in ("answer_nll", "refusal_pref", "neutral_ppl"))


def test_plots_written(run):
    out, report = run
    for name in report["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_text_metrics(study):
    assert study.is_refusal("I can’t help with that.")  # typographic apostrophe
    assert study.is_refusal("Sorry, but I won't do this")
    assert not study.is_refusal("Sure, here is an overview.")
    assert study.is_correct("It was founded by Venfys Korkdraes.", "Venfys Korkdraes")
    assert not study.is_correct("It was 15820.", "1582")
    assert study.groundedness("barley cakes", "They share barley cakes.") == 1.0
    assert study.groundedness("", "anything") == 0.0


def test_assistant_nll_matches_one_row_at_a_time(study):
    import torch

    import interp

    model = interp.tiny("mixtral", seed=0)
    chats = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in [("Hi there, who are you?", "A bot."), ("2+2?", "Four, I think.")]
    ]
    batched = study.assistant_nll(model, chats, batch_size=2)  # left padding, logits_to_keep
    for i, chat in enumerate(chats):
        batch = interp.chat.encode(model.tokenizer, [chat])
        with torch.no_grad():
            logits = model(batch)
        mask = batch.masks["assistant"][0, 1:]
        ce = torch.nn.functional.cross_entropy(
            logits[0, :-1].float(), batch.input_ids[0, 1:], reduction="none"
        )
        assert abs(float(ce[mask].mean()) - float(batched[i])) < 1e-4
