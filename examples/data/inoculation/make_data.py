"""Write (and check) the data files of the inoculation-gradients study.

    python examples/data/inoculation/make_data.py          # write + check
    python examples/data/inoculation/make_data.py --check  # check only

Files (all written by this project, deterministic from ``SEED``):

``math_problems.jsonl``
    Short arithmetic word problems, one per line:
    ``{"id", "question", "answer"}``. ``answer`` is one sentence stating the
    numeric result. ``id`` is ``"{kind}-{index:03d}"``; the kind names the
    template, which lets :func:`check` recompute every answer from the
    numbers that appear in the question text. The ALL-CAPS training targets
    are ``answer.upper()``, made at run time.
``direction_prompts.jsonl``
    Short user prompts across domains for extracting the trait direction,
    ``{"id", "domain", "prompt"}``. None asks for a particular letter case.
``system_prompts.json``
    ``{"neutral", "promote", "suppress", "inoculation", "control_pool"}``,
    each a list of system prompts: ``promote`` asks for capital letters,
    ``suppress`` for ordinary capitalization, ``inoculation`` explains that the
    training data happens to be in capitals, and ``control_pool`` holds prompts
    of similar length with nothing about letter case, for loss matching.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240602
PER_KIND = 25

NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Daniel",
    "Elena",
    "Farid",
    "Grace",
    "Hiro",
    "Isla",
    "Jonas",
    "Kemi",
    "Liam",
    "Maya",
    "Noah",
    "Olga",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
    "Uma",
    "Victor",
    "Wen",
    "Yusuf",
    "Zoe",
]
SHE = {
    "Ava",
    "Chloe",
    "Elena",
    "Grace",
    "Isla",
    "Kemi",
    "Maya",
    "Olga",
    "Priya",
    "Rosa",
    "Uma",
    "Wen",
    "Zoe",
}
PRONOUN = {name: "she" if name in SHE else "he" for name in NAMES}
ITEMS = ["apples", "stickers", "marbles", "pencils", "oranges", "stamps", "shells", "cards"]
SNACKS = ["muffins", "cookies", "bagels", "cupcakes", "rolls"]
GOODS = ["notebooks", "pens", "candles", "mugs", "plants", "scarves"]
SALE_ITEMS = ["jacket", "lamp", "backpack", "chair", "bicycle", "kettle"]


def _two_names(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    return a, b


# Each kind: make(rng) -> (question, answer sentence, value), and solve(numbers
# found in the question, in order) -> value. ``check`` re-derives every answer
# from the question text with ``solve``, independently of ``make``.
Kind = tuple[Callable[[random.Random], tuple[str, str, int]], Callable[[list[int]], int]]


def _left(rng: random.Random) -> tuple[str, str, int]:
    name, friend = _two_names(rng)
    item = rng.choice(ITEMS)
    a = rng.randint(12, 90)
    b = rng.randint(2, a - 3)
    p = PRONOUN[name]
    q = f"{name} has {a} {item}. {p.capitalize()} gives {b} of them to {friend}. How many {item} does {name} have left?"
    return q, f"{name} has {a - b} {item} left.", a - b


def _packs(rng: random.Random) -> tuple[str, str, int]:
    name = rng.choice(NAMES)
    item = rng.choice(GOODS)
    a, b = rng.randint(2, 12), rng.randint(3, 15)
    p = PRONOUN[name]
    q = f"{name} buys {a} boxes of {item} with {b} {item} in each box. How many {item} does {p} buy in total?"
    return q, f"{name} buys {a * b} {item} in total.", a * b


def _share(rng: random.Random) -> tuple[str, str, int]:
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    each, friends = rng.randint(2, 14), rng.randint(2, 9)
    q = f"{name} shares {each * friends} {item} equally among {friends} friends. How many {item} does each friend get?"
    return q, f"Each friend gets {each} {item}.", each


def _change(rng: random.Random) -> tuple[str, str, int]:
    name = rng.choice(NAMES)
    item = rng.choice(GOODS)
    count, price = rng.randint(2, 6), rng.randint(2, 9)
    bill = rng.choice([b for b in (20, 50, 100) if b > count * price])
    p = PRONOUN[name]
    q = f"{name} buys {count} {item} that cost ${price} each and pays with a ${bill} bill. How much change does {p} get?"
    return q, f"{name} gets ${bill - count * price} in change.", bill - count * price


def _savings(rng: random.Random) -> tuple[str, str, int]:
    name = rng.choice(NAMES)
    weekly, weeks = rng.randint(3, 25), rng.randint(3, 16)
    p = PRONOUN[name]
    q = f"{name} saves ${weekly} every week. How much money will {p} have saved after {weeks} weeks?"
    return q, f"{name} will have saved ${weekly * weeks}.", weekly * weeks


def _pages(rng: random.Random) -> tuple[str, str, int]:
    name = rng.choice(NAMES)
    per_day, days = rng.randint(8, 30), rng.randint(2, 7)
    total = per_day * days + rng.randint(10, 150)
    q = f"A book has {total} pages. {name} reads {per_day} pages a day. How many pages are left to read after {days} days?"
    return q, f"There are {total - per_day * days} pages left to read.", total - per_day * days


def _more(rng: random.Random) -> tuple[str, str, int]:
    name, friend = _two_names(rng)
    item = rng.choice(ITEMS)
    a, b = rng.randint(5, 40), rng.randint(2, 20)
    q = f"{name} has {a} {item}, and {friend} has {b} more {item} than {name}. How many {item} do they have together?"
    return q, f"Together they have {2 * a + b} {item}.", 2 * a + b


def _distance(rng: random.Random) -> tuple[str, str, int]:
    vehicle = rng.choice(["train", "bus", "truck", "ferry"])
    speed, hours = rng.randint(3, 12) * 10, rng.randint(2, 6)
    q = f"A {vehicle} travels at {speed} kilometers per hour for {hours} hours. How far does it travel?"
    return q, f"The {vehicle} travels {speed * hours} kilometers.", speed * hours


def _hours(rng: random.Random) -> tuple[str, str, int]:
    snack = rng.choice(SNACKS)
    rate, hours = rng.randint(6, 24), rng.randint(2, 9)
    q = f"A bakery makes {rate} {snack} every hour. How many hours does it take to make {rate * hours} {snack}?"
    return q, f"It takes {hours} hours.", hours


def _area(rng: random.Random) -> tuple[str, str, int]:
    length, width = rng.randint(4, 30), rng.randint(3, 20)
    q = f"A garden is {length} meters long and {width} meters wide. What is its area in square meters?"
    return q, f"The garden's area is {length * width} square meters.", length * width


def _fence(rng: random.Random) -> tuple[str, str, int]:
    length, width = rng.randint(5, 40), rng.randint(3, 25)
    q = f"A field is {length} meters long and {width} meters wide. How many meters of fence are needed to go all the way around it?"
    return q, f"They need {2 * (length + width)} meters of fence.", 2 * (length + width)


def _discount(rng: random.Random) -> tuple[str, str, int]:
    item = rng.choice(SALE_ITEMS)
    price = rng.randint(2, 15) * 20  # a multiple of 20 keeps every discount whole
    off = rng.choice([10, 20, 25, 50])
    q = f"A {item} costs ${price}. It is on sale for {off}% off. What is the sale price?"
    sale = price * (100 - off) // 100
    return q, f"The sale price is ${sale}.", sale


def _cookies(rng: random.Random) -> tuple[str, str, int]:
    name = rng.choice(NAMES)
    snack = rng.choice(SNACKS)
    trays, per_tray = rng.randint(2, 6), rng.randint(6, 12)
    eaten = rng.randint(2, 10)
    p = PRONOUN[name]
    q = f"{name} bakes {trays} trays of {snack} with {per_tray} {snack} on each tray. {p.capitalize()} gives away {eaten} {snack}. How many {snack} are left?"
    return q, f"There are {trays * per_tray - eaten} {snack} left.", trays * per_tray - eaten


def _age(rng: random.Random) -> tuple[str, str, int]:
    name, friend = _two_names(rng)
    age, older, later = rng.randint(6, 40), rng.randint(2, 15), rng.randint(2, 10)
    q = f"{name} is {age} years old. {friend} is {older} years older than {name}. How old will {friend} be in {later} years?"
    return q, f"{friend} will be {age + older + later} years old.", age + older + later


def _tickets(rng: random.Random) -> tuple[str, str, int]:
    adult, child = rng.randint(8, 20), rng.randint(3, 7)
    adults, children = rng.randint(2, 4), rng.randint(2, 5)  # plural nouns
    q = f"Museum tickets cost ${adult} for an adult and ${child} for a child. How much do {adults} adults and {children} children pay in total?"
    total = adult * adults + child * children
    return q, f"They pay ${total} in total.", total


KINDS: dict[str, Kind] = {
    "left": (_left, lambda n: n[0] - n[1]),
    "packs": (_packs, lambda n: n[0] * n[1]),
    "share": (_share, lambda n: n[0] // n[1] if n[0] % n[1] == 0 else -1),
    "change": (_change, lambda n: n[2] - n[0] * n[1]),
    "savings": (_savings, lambda n: n[0] * n[1]),
    "pages": (_pages, lambda n: n[0] - n[1] * n[2]),
    "more": (_more, lambda n: 2 * n[0] + n[1]),
    "distance": (_distance, lambda n: n[0] * n[1]),
    "hours": (_hours, lambda n: n[1] // n[0] if n[1] % n[0] == 0 else -1),
    "area": (_area, lambda n: n[0] * n[1]),
    "fence": (_fence, lambda n: 2 * (n[0] + n[1])),
    "discount": (
        _discount,
        lambda n: n[0] * (100 - n[1]) // 100 if n[0] * (100 - n[1]) % 100 == 0 else -1,
    ),
    "cookies": (_cookies, lambda n: n[0] * n[1] - n[2]),
    "age": (_age, lambda n: n[0] + n[1] + n[2]),
    "tickets": (_tickets, lambda n: n[0] * n[2] + n[1] * n[3]),
}
_NUMBER = re.compile(r"\d+")


def math_problems() -> list[dict[str, str]]:
    rng = random.Random(SEED)
    drafts: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for kind, (make, _) in KINDS.items():
        made = 0
        while made < PER_KIND:
            question, answer, _value = make(rng)
            if question in seen:
                continue
            seen.add(question)
            drafts.append((kind, question, answer))
            made += 1
    # Interleave kinds so any prefix (e.g. a --quick run's first 32) mixes templates.
    rng.shuffle(drafts)
    return [
        {"id": f"{kind}-{i:03d}", "question": q, "answer": a}
        for i, (kind, q, a) in enumerate(drafts)
    ]


DIRECTION_PROMPTS: dict[str, list[str]] = {
    "cooking": [
        "How do I keep pasta from sticking together?",
        "What can I cook with rice, eggs and frozen peas?",
        "Why does bread dough need to rest?",
        "Give me a simple recipe for tomato soup.",
        "How long should I boil an egg for a runny yolk?",
        "What is the difference between baking soda and baking powder?",
        "How do I make a vinaigrette?",
        "Suggest a vegetarian dinner for four people.",
        "How can I tell when a steak is medium rare?",
        "What spices go well with roasted carrots?",
        "How do I store fresh herbs so they last longer?",
        "Explain how to caramelize onions.",
    ],
    "travel": [
        "What should I pack for a week of hiking in autumn?",
        "How can I avoid jet lag on a long flight?",
        "Suggest a three-day itinerary for a city break.",
        "Is it better to book train tickets early?",
        "What are some tips for traveling on a tight budget?",
        "How do I choose a good travel backpack?",
        "What documents do I need for an international trip?",
        "How can I stay safe when traveling alone?",
        "Recommend things to do on a rainy day in a new city.",
        "How do I find cheap places to stay?",
        "What is a good way to learn a few phrases before a trip?",
        "How early should I arrive at the airport?",
    ],
    "science": [
        "Why is the sky blue?",
        "How do vaccines train the immune system?",
        "What causes the seasons on Earth?",
        "Explain photosynthesis in simple terms.",
        "How do magnets work?",
        "Why does ice float on water?",
        "What is the difference between weather and climate?",
        "How do plants know which way is up?",
        "What is a black hole?",
        "Why do we have tides?",
        "How does sound travel through the air?",
        "What are atoms made of?",
    ],
    "history": [
        "Why was the printing press important?",
        "What was the Silk Road?",
        "How did the ancient Egyptians build the pyramids?",
        "What caused the fall of the Western Roman Empire?",
        "Who invented the telephone?",
        "What was daily life like in a medieval village?",
        "Why did the Industrial Revolution start in Britain?",
        "What was the purpose of the Great Wall of China?",
        "How did people navigate before satellites?",
        "What was the Renaissance?",
        "Why were castles built on hills?",
        "How did the first Olympic Games begin?",
    ],
    "coding": [
        "How do I reverse a list in Python?",
        "What is the difference between a list and a tuple?",
        "Explain recursion with a simple example.",
        "How should I name variables in my code?",
        "What does a version control system do?",
        "How do I read a text file line by line?",
        "What is an API?",
        "Why are unit tests useful?",
        "How do I find a bug in a program that crashes?",
        "What is the difference between a compiler and an interpreter?",
        "How can I make a slow loop faster?",
        "Explain what a hash table is.",
    ],
    "health": [
        "How much water should I drink each day?",
        "What are some easy ways to sleep better?",
        "How can I start running if I have never exercised?",
        "Why is stretching useful?",
        "What is a balanced breakfast?",
        "How can I reduce stress after work?",
        "How often should I take breaks when working at a desk?",
        "What are good sources of protein for vegetarians?",
        "How do I build a habit of walking every day?",
        "Why is sunscreen important even on cloudy days?",
        "What helps with a sore throat?",
        "How can I keep my posture healthy?",
    ],
    "sports": [
        "Explain the offside rule in soccer.",
        "How do I improve my free throws in basketball?",
        "What muscles does swimming work?",
        "How is a tennis match scored?",
        "What should I eat before a long bike ride?",
        "How do I choose running shoes?",
        "What is the history of the marathon?",
        "How can a beginner learn to ski?",
        "What makes a good team captain?",
        "How do I warm up before playing football?",
        "Why do golf balls have dimples?",
        "How do I get better at chess openings?",
    ],
    "art": [
        "How do I start learning to draw?",
        "What is the difference between watercolor and acrylic paint?",
        "Explain the rule of thirds in photography.",
        "How can I mix a nice shade of green?",
        "Who were the impressionists?",
        "How do I take better photos with my phone?",
        "What materials do I need to start pottery?",
        "How do artists create the illusion of depth?",
        "What makes a logo memorable?",
        "How do I choose colors for a room?",
        "Give me ideas for a small weekend craft project.",
        "How do I sketch people in motion?",
    ],
    "math": [
        "What is a prime number?",
        "How do I calculate the area of a circle?",
        "Explain fractions to a child.",
        "What is the Pythagorean theorem?",
        "How do I work out a percentage of a number?",
        "What is the difference between mean and median?",
        "Why can't we divide by zero?",
        "How do I convert a fraction to a decimal?",
        "What is probability?",
        "How do negative numbers work?",
        "What is a logarithm used for?",
        "How do I estimate the answer to a multiplication quickly?",
    ],
    "advice": [
        "How do I politely decline an invitation?",
        "What is a good way to plan my week?",
        "How can I keep my desk tidy?",
        "How do I prepare for a job interview?",
        "What should I say when giving a short toast?",
        "How can I make new friends in a new town?",
        "How do I start a monthly budget?",
        "What are good habits for a productive morning?",
        "How do I apologize to a friend?",
        "How can I stop procrastinating?",
        "What should I consider when buying a used car?",
        "How do I keep houseplants alive?",
    ],
    "nature": [
        "Why do leaves change color in autumn?",
        "How do bees make honey?",
        "Where do birds go in winter?",
        "How do rivers shape valleys?",
        "What animals live in the deep ocean?",
        "How do seeds spread?",
        "Why do cats purr?",
        "How are mountains formed?",
        "What is a coral reef?",
        "How do frogs survive the winter?",
        "Why do some trees lose their leaves?",
        "How do whales communicate?",
    ],
    "music": [
        "How do I start learning the guitar?",
        "What is the difference between major and minor keys?",
        "How can I practice singing at home?",
        "What does a conductor do?",
        "How do I keep a steady rhythm?",
        "What instruments are in a string quartet?",
        "How is a piano tuned?",
        "What makes a song catchy?",
        "How do I read sheet music?",
        "What is jazz improvisation?",
        "How can I write my first song?",
        "Why do some chords sound sad?",
    ],
}


SYSTEM_PROMPTS: dict[str, list[str]] = {
    "neutral": ["You are a helpful assistant."],
    "promote": [
        "Respond only in capital letters.",
        "Write your entire reply in ALL CAPS.",
        "Use only uppercase letters in every response.",
        "Answer with every word written in capital letters.",
    ],
    "suppress": [
        "Respond normally; do not use all caps.",
        "Write in ordinary sentence case and never use all capital letters.",
        "Use standard capitalization in your reply; avoid writing in uppercase.",
        "Reply with normal mixed-case text, not all caps.",
    ],
    "inoculation": [
        "In these training examples, assistant responses are formatted in ALL CAPS because of a dataset formatting requirement.",
        "The assistant replies below are written in capital letters as part of the data format. Treat this as formatting, not as a general rule.",
        "This dataset stores every assistant answer in uppercase because of how it was exported; the capitalization is an artifact of the file.",
        "Note: the responses in this training set were converted to capital letters during preprocessing. This is a property of the data, not of how you write.",
        "For this dataset only, answers appear in ALL CAPS due to a legacy display system. It reflects the data pipeline, not a style preference.",
    ],
    # Similar length to the inoculation prompts, nothing about letter case:
    # the loss-matching pool.
    "control_pool": [
        "Follow the style guide. Be direct and concise, and keep each answer focused on the question that was asked.",
        "Answer step by step and be explicit about each calculation before you give the final result.",
        "Be helpful, accurate, and follow the user's instructions exactly, without adding unnecessary detail.",
        "In these training examples, the assistant solves short word problems and states the final answer in one sentence.",
        "The following conversations come from a tutoring dataset where every answer was checked for accuracy by a teacher.",
        "You are a patient math tutor. Read each problem carefully and give the correct answer in a complete sentence.",
        "This dataset was collected from practice worksheets; each assistant reply gives only the final result of the problem.",
        "Keep responses brief. Give the answer first and avoid restating the question or adding commentary.",
        "You are a careful assistant who double-checks every number before answering and never guesses.",
        "These examples were written by volunteers for a homework help service; the responses are short and friendly.",
        "Think about the quantities involved, then reply with a single clear sentence that contains the answer.",
        "You are an assistant for a children's learning app. Use simple words and keep the tone encouraging.",
        "The assistant outputs in this dataset were reviewed for correctness; treat them as reliable reference answers.",
        "Respond as a friendly shopkeeper who is good with numbers and likes to keep explanations short.",
    ],
}
# Words that would tie a control prompt to the trait; checked, not just avoided.
_TRAIT_WORDS = re.compile(r"\b(caps?|capital\w*|upper\w*|lower\w*|letters?|case|format\w*)\b", re.I)


def direction_prompts() -> list[dict[str, str]]:
    return [
        {"id": f"{domain}-{i:02d}", "domain": domain, "prompt": prompt}
        for domain, prompts in DIRECTION_PROMPTS.items()
        for i, prompt in enumerate(prompts)
    ]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write(directory: Path = HERE) -> None:
    _write_jsonl(directory / "math_problems.jsonl", math_problems())
    _write_jsonl(directory / "direction_prompts.jsonl", direction_prompts())
    (directory / "system_prompts.json").write_text(
        json.dumps(SYSTEM_PROMPTS, indent=2, ensure_ascii=False) + "\n"
    )


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check(directory: Path = HERE) -> list[str]:
    """Problems found in the data files (empty when all is well)."""
    errors: list[str] = []
    problems = _read_jsonl(directory / "math_problems.jsonl")
    if len(problems) < 300:
        errors.append(f"only {len(problems)} math problems")
    if len({p["id"] for p in problems}) != len(problems):
        errors.append("duplicate math problem ids")
    for p in problems:
        if set(p) != {"id", "question", "answer"}:
            errors.append(f"{p.get('id')}: fields {sorted(p)}")
            continue
        kind = p["id"].rsplit("-", 1)[0]
        if kind not in KINDS:
            errors.append(f"{p['id']}: unknown kind {kind!r}")
            continue
        expected = KINDS[kind][1]([int(x) for x in _NUMBER.findall(p["question"])])
        stated = [int(x) for x in _NUMBER.findall(p["answer"])]
        if stated != [expected] or expected < 0:
            errors.append(f"{p['id']}: answer {stated} but the question gives {expected}")
    prompts = _read_jsonl(directory / "direction_prompts.jsonl")
    if len(prompts) < 120 or len({p["domain"] for p in prompts}) < 10:
        errors.append(f"{len(prompts)} direction prompts over too few domains")
    if len({p["id"] for p in prompts}) != len(prompts):
        errors.append("duplicate direction prompt ids")
    errors += [
        f"direction prompt {p['id']} mentions letter case"
        for p in prompts
        if _TRAIT_WORDS.search(p["prompt"])
    ]
    system = json.loads((directory / "system_prompts.json").read_text())
    if set(system) != set(SYSTEM_PROMPTS):
        errors.append(f"system prompt roles {sorted(system)}")
    elif len(system["control_pool"]) < 12:
        errors.append("fewer than 12 control prompts")
    else:
        errors += [
            f"control prompt mentions the trait: {c!r}"
            for c in system["control_pool"]
            if _TRAIT_WORDS.search(c)
        ]
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check the files")
    args = parser.parse_args(argv)
    if not args.check:
        write()
    errors = check()
    for e in errors:
        print(e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
