"""BBQ-style bias items for study 000 (``examples/kl_span_alignment.py``): a template
generator, the study's choice of data (official release or generated items), its prompt
and its held-out split.

The official release's reader, answer parsing and bias scores are the library's
(:mod:`interp.datasets.bbq`, re-exported here). Standalone use::

    python examples/bbq.py --out items.jsonl      # write every generated item as JSONL
    python examples/bbq.py --summary              # counts per category / condition / polarity

The generator fills templates from ``data/bbq/templates.json`` (written for
this project; neutral wording, no slurs). Per template, group pair and order
of mention it emits four items: ambiguous × {neg, nonneg} (correct answer:
the "unknown" option) and disambiguated × {neg, nonneg} (correct answer: the
person the added sentence describes). Swapping the order of mention also swaps
who the disambiguating sentence describes, so half of the disambiguated items
confirm the stereotype and half contradict it, as in BBQ. Option order is
shuffled per item with a seeded RNG. Its items carry ``target_label``, the option
naming the stereotyped group (BBQ's ``target_loc`` before the official metadata
script moves it for non-negative questions; see :mod:`interp.datasets.bbq`).

Official category names are shortened to the templates' ones (``CATEGORY_ALIASES``:
``gender_identity`` -> ``gender``, ``disability_status`` -> ``disability``), which the
study's lexicon coverage is keyed by.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interp.datasets import bbq as official
from interp.datasets.bbq import (
    LETTERS,
    UNKNOWN_PHRASES,
    BBQItem,
    CategoryScores,
    Choice,
    ConditionScore,
    OfficialBBQ,
    biased_label,
    is_unknown_text,
    official_scores,
    parse_choice,
    read_metadata,
    read_official,
    summary,
)

__all__ = [
    "CATEGORY_ALIASES",
    "LETTERS",
    "UNKNOWN_PHRASES",
    "BBQItem",
    "CategoryScores",
    "Choice",
    "ConditionScore",
    "OfficialBBQ",
    "Template",
    "balanced",
    "biased_label",
    "from_record",
    "generate_items",
    "is_unknown_text",
    "load",
    "load_templates",
    "messages",
    "official_scores",
    "ours",
    "parse_choice",
    "read_metadata",
    "read_official",
    "split_items",
    "summary",
]

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "data" / "bbq" / "templates.json"

CATEGORY_ALIASES = {  # official BBQ category names -> ours
    "age": "age",
    "gender_identity": "gender",
    "gender": "gender",
    "religion": "religion",
    "nationality": "nationality",
    "disability_status": "disability",
    "disability": "disability",
}


def ours(item: BBQItem) -> BBQItem:
    """``item`` with its category named as the shipped templates name it."""
    return dataclasses.replace(item, category=CATEGORY_ALIASES.get(item.category, item.category))


def from_record(rec: Mapping[str, Any], index: int = 0) -> BBQItem:
    """:func:`interp.datasets.bbq.from_record`, category as the templates name it."""
    return ours(official.from_record(rec, index))


# ------------------------------------------------------------------ generator


@dataclass(frozen=True)
class Template:
    """A BBQ-style template (see ``data/bbq/templates.json``)."""

    id: str
    category: str
    stereotype: str
    context: str
    disambiguation: str
    question_negative: str
    question_non_negative: str
    pairs: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        for slot in ("{A}", "{B}"):
            if slot not in self.context:
                raise ValueError(f"template {self.id}: context lacks {slot}")
        for slot in ("{NEG}", "{POS}"):
            if slot not in self.disambiguation:
                raise ValueError(f"template {self.id}: disambiguation lacks {slot}")
        if not self.pairs or any(len(p) != 2 or p[0] == p[1] for p in self.pairs):
            raise ValueError(f"template {self.id}: pairs must be distinct [stereotyped, other]")


def load_templates(path: str | Path = TEMPLATES) -> tuple[list[Template], list[str]]:
    """The templates and the pool of "unknown" option wordings."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    templates = [
        Template(**{**t, "pairs": tuple(tuple(p) for p in t["pairs"])}) for t in data["templates"]
    ]
    ids = [t.id for t in templates]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate template ids in {path}")
    return templates, list(data["unknown_options"])


def _indefinite(phrase: str) -> str:
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def generate_items(
    templates: Sequence[Template] | None = None,
    unknown_options: Sequence[str] | None = None,
    *,
    seed: int = 0,
) -> list[BBQItem]:
    """Every item of every template: pairs × 2 orders × {ambig, disambig} × {neg, nonneg}.

    In the disambiguated context the first-mentioned person does the negative
    behaviour ({NEG}); with the order swapped, the other one does. Option order
    and the unknown wording are drawn from ``random.Random(seed)``.
    """
    if templates is None:
        templates, unknown_options = load_templates()
    if not unknown_options:
        raise ValueError("need at least one wording for the unknown option")
    rng = random.Random(seed)
    items: list[BBQItem] = []
    for t in templates:
        for p, (stereotyped, other) in enumerate(t.pairs):
            for order, (first, second) in enumerate(((stereotyped, other), (other, stereotyped))):
                ambiguous = _capitalize(
                    t.context.format(A=_indefinite(first), B=_indefinite(second))
                )
                disambiguation = t.disambiguation.format(NEG=first, POS=second)
                for condition in ("ambig", "disambig"):
                    context = ambiguous if condition == "ambig" else f"{ambiguous} {disambiguation}"
                    for polarity in ("neg", "nonneg"):
                        question = (
                            t.question_negative if polarity == "neg" else t.question_non_negative
                        )
                        unknown = rng.choice(list(unknown_options))
                        texts = [f"The {stereotyped}", f"The {other}", unknown]
                        perm = list(range(3))
                        rng.shuffle(perm)  # perm[slot] = which of texts sits in that slot
                        options = [texts[i] for i in perm]
                        where = {src: slot for slot, src in enumerate(perm)}
                        if condition == "ambig":
                            correct = 2
                        else:  # the first-mentioned person did the negative thing
                            neg_person = 0 if first == stereotyped else 1
                            correct = neg_person if polarity == "neg" else 1 - neg_person
                        items.append(
                            BBQItem(
                                example_id=f"{t.id}-p{p}-o{order}-{condition}-{polarity}",
                                question_index=t.id,
                                category=t.category,
                                context_condition=condition,
                                question_polarity=polarity,
                                context=context,
                                question=question,
                                ans0=options[0],
                                ans1=options[1],
                                ans2=options[2],
                                label=where[correct],
                                target_label=where[0],
                                unknown_label=where[2],
                                metadata={
                                    "template": t.id,
                                    "stereotype": t.stereotype,
                                    "stereotyped_group": stereotyped,
                                    "other_group": other,
                                    "evidence_negative_group": (
                                        first if condition == "disambig" else None
                                    ),
                                    "source": "interp-bbq-templates",
                                },
                            )
                        )
    return items


def load(
    data: str | None, metadata: str | None, *, seed: int = 0
) -> tuple[list[BBQItem], dict[str, Any]]:
    """The study's items and where they came from: the official release
    (:func:`read_official`, categories as ``ours``; ``data`` and ``metadata`` together) or,
    without either, the
    items generated from the shipped templates."""
    if (data is None) != (metadata is None):
        raise ValueError("official BBQ needs both the data (JSONL) and additional_metadata.csv")
    if data is None:
        return generate_items(seed=seed), {"source": "shipped templates (examples/data/bbq)"}
    release = read_official(data, metadata)
    if not release.items:
        raise ValueError(f"{data}: no BBQ item with a target_loc in {metadata}")
    info = {"source": str(data), "metadata": str(metadata), "n_records": release.n_records}
    return [ours(it) for it in release.items], info | {"n_dropped_no_target": release.n_dropped}


# ------------------------------------------------------------------ prompts and splits


def messages(item: BBQItem, system: str, instruction: str) -> list[dict[str, str]]:
    """The chat prompt of an item: context, question, lettered options; ``system`` as the
    system turn, or (``system=""``, for templates without one) ``instruction`` appended to
    the user turn."""
    user = f"{item.context}\nQuestion: {item.question}\n" + "\n".join(
        f"{letter}. {text}" for letter, text in zip(LETTERS, item.options, strict=True)
    )
    if system:
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return [{"role": "user", "content": f"{user}\n\n{instruction}"}]


def balanced(pool: Sequence[BBQItem], n: int, rng: random.Random) -> list[BBQItem]:
    """Up to ``n`` items, round-robin over category × context condition × polarity."""
    strata: dict[tuple[str, str, str], list[BBQItem]] = {}
    for it in pool:
        strata.setdefault((it.category, it.context_condition, it.question_polarity), []).append(it)
    keys = sorted(strata)
    rng.shuffle(keys)
    for k in keys:
        rng.shuffle(strata[k])
    out: list[BBQItem] = []
    while len(out) < n and any(strata[k] for k in keys):
        out += [strata[k].pop() for k in keys if strata[k]][: n - len(out)]
    return out


def split_items(
    items: Sequence[BBQItem], n_mine: int, n_eval: int, by: str, seed: int
) -> tuple[list[BBQItem], list[BBQItem], dict[str, Any]]:
    """Disjoint mining and held-out items, each balanced (:func:`balanced`).

    ``by="template"``: a third of each category's templates (``question_index``; at least
    one) is held out, so no context, question or group pair is shared; a category with a
    single template stays on the mining side. ``by="item"``: a random split of the items.
    """
    if by not in ("template", "item"):
        raise ValueError(f"split by 'template' or 'item', got {by!r}")
    rng = random.Random(seed)
    if by == "template":
        per_cat: dict[str, list[str]] = {}
        for cat, q in sorted({(it.category, it.question_index) for it in items}):
            per_cat.setdefault(cat, []).append(q)
        held: set[tuple[str, str]] = set()
        for cat, templates in sorted(per_cat.items()):
            rng.shuffle(templates)
            if len(templates) >= 2:
                held |= {(cat, t) for t in templates[: max(1, len(templates) // 3)]}
        mine = [it for it in items if (it.category, it.question_index) not in held]
        rest = [it for it in items if (it.category, it.question_index) in held]
    else:
        shuffled = rng.sample(list(items), len(items))
        cut = round(len(shuffled) * n_mine / (n_mine + n_eval))
        mine, rest = shuffled[:cut], shuffled[cut:]
    mine, held_out = balanced(mine, n_mine, rng), balanced(rest, n_eval, rng)
    if not mine or not held_out:
        raise ValueError(f"empty split: {len(mine)} mining and {len(held_out)} held-out items")
    return mine, held_out, {"split": by, "mine": summary(mine), "eval": summary(held_out)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="write all generated items to this JSONL file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summary", action="store_true", help="print counts")
    p.add_argument("--official", help="official BBQ data: a JSONL file or the data/ folder")
    p.add_argument("--metadata", help="the official additional_metadata.csv (with --official)")
    args = p.parse_args(argv)
    if args.official:
        if not args.metadata:
            p.error("--official needs --metadata additional_metadata.csv")
        bbq = read_official(args.official, args.metadata)
        print(
            json.dumps(
                {
                    "n_records": bbq.n_records,
                    "n_items": len(bbq.items),
                    "n_dropped_no_target": bbq.n_dropped,
                    **summary(ours(it) for it in bbq.items),
                },
                indent=2,
            )
        )
        return 0
    items = generate_items(seed=args.seed)
    if args.out:
        Path(args.out).write_text(
            "".join(json.dumps(i.to_record()) + "\n" for i in items), encoding="utf-8"
        )
    if args.summary or not args.out:
        print(json.dumps({"n": len(items), **summary(items)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
