"""A synthetic world for ELK: a training corpus of made-up facts and held-out true/false statements.

End to end (generate -> tokenizer -> shards -> train both -> ELK on both; ``tools/truth_testbed.py``
runs the same sequence, skipping finished stages, and writes ``docs/truth_testbed/``):

    python tools/make_truth_corpus.py --out data/truth --seed 0
    python tools/train_tokenizer.py --inputs data/truth/corpus.jsonl --text_field text --kind bpe --vocab_size 2048 --out data/truth/tokenizer
    python tools/prepare_data.py --inputs data/truth/corpus.jsonl --text_field text --tokenizer data/truth/tokenizer --out data/truth/shards --val_fraction 0.02 --num_proc 1
    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu PYTHONWARNINGS=ignore::FutureWarning python crate_lm/pretrain.py --config configs/truth_crate.yaml
    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu PYTHONWARNINGS=ignore::FutureWarning python crate_lm/pretrain.py --config configs/truth_gpt.yaml
    crate-lm elk runs/truth_crate --data data/truth/statements.jsonl --templates data/truth/templates.txt --out runs/truth_crate/elk
    crate-lm elk runs/truth_gpt --data data/truth/statements.jsonl --templates data/truth/templates.txt --out runs/truth_gpt/elk

The world: ``--entities`` people whose names are built from syllables, each with four facts
(``RELATIONS``): a home city (from made-up places), a favourite colour, an age and a best friend
(another person). Every relation has several phrasings, all of the form "<name> ... <value>" so
that a prefix ending just before the value asks for it. One phrasing per relation is its
*statement form*; it appears in training only for a random half of the people (the model learns
the form there). For the other half, ``statements.jsonl`` says each fact in the statement form
twice, once true (label 1) and once with a wrong value of the same type (label 0), both in one
``group``. So no statement is ever in the training text verbatim, while its fact is (in the other
phrasings, ``--repeats`` times, each time in a random one).

Optional truth judgements (``--judgements`` rounds, default 0): documents of "<statement> That is
true." / "... That is false." about the held-in people only (every round a fresh wrong value), to
teach the model to judge statements, which is what a contrast pair asks of it. Off by default:
with 10 rounds the false judgements put wrong values after the statement prefix in training, and
behavioural accuracy on the held-out facts fell (GPT 0.95 -> 0.88, CRATE 0.75 -> 0.75 with a
worse per-relation spread; tiny recipe, 60 people). ``templates.txt`` holds crate-lm elk's built-in
templates, preceded by the judgement template when judgements were trained.

Writes to ``--out``: ``corpus.jsonl`` (``{"text": ...}`` documents: a few shuffled fact
sentences about one to three people, or four judgements), ``templates.txt``, ``statements.jsonl`` (``{"text", "label", "group"}`` for
``crate-lm elk``) and ``world.json`` (the facts, which people are held out, the counts).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from crate_lm.errors import CrateLMError, run_cli
from crate_lm.fsutil import atomic_write_bytes, atomic_write_json

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "th"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "m", "k"]
PLACE_ENDS = ["moor", "vale", "ford", "holm", "wick", "stead", "mere", "crag", "haven", "dale"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "brown"]
AGES = list(range(20, 70))

RELATIONS: dict[str, list[str]] = {
    "city": [
        "{name} lives in {value}.",
        "{name} has a home in {value}.",
        "{name} resides in {value}.",
        "{name}'s home town is {value}.",
        "The home of {name} is in {value}.",
        "{name} makes a living in {value}.",
    ],
    "colour": [
        "{name}'s favourite colour is {value}.",
        "{name} likes the colour {value} most.",
        "The colour {name} loves best is {value}.",
        "{name} always wears {value}.",
        "Of all colours {name} prefers {value}.",
        "{name} paints every wall {value}.",
    ],
    "age": [
        "{name} is {value} years old.",
        "{name} turned {value} this year.",
        "The age of {name} is {value}.",
        "{name} has lived for {value} years.",
        "{name} just had birthday number {value}.",
        "{name}'s age is {value}.",
    ],
    "friend": [
        "{name}'s best friend is {value}.",
        "The best friend of {name} is {value}.",
        "{name} trusts {value} more than anyone.",
        "{name} spends every day with {value}.",
        "{name} shares every secret with {value}.",
        "{name} goes everywhere with {value}.",
    ],
}
"""Phrasings per relation; the first is the statement form (held out for half of the people)."""


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)]
    return "".join(parts).capitalize()


def make_world(entities: int = 40, places: int = 10, seed: int = 0) -> dict:
    """People, places and facts, deterministic for a seed. ``held_out``: the people whose facts are
    never written in their relation's statement form."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < entities:
        name = _word(rng, rng.choice((2, 2, 3)))
        if name not in names and 4 <= len(name) <= 12:
            names.append(name)
    cities: list[str] = []
    while len(cities) < places:
        city = _word(rng, 1) + rng.choice(PLACE_ENDS)
        if city not in cities and city not in names:
            cities.append(city)
    facts = {}
    for i, name in enumerate(names):
        friend = rng.choice([n for j, n in enumerate(names) if j != i])
        facts[name] = {"city": rng.choice(cities), "colour": rng.choice(COLOURS), "age": str(rng.choice(AGES)),
                       "friend": friend}  # fmt: skip
    held_out = sorted(rng.sample(names, entities // 2), key=names.index)
    values = {"city": cities, "colour": COLOURS, "age": [str(a) for a in AGES], "friend": names}
    return {"seed": seed, "names": names, "cities": cities, "facts": facts, "held_out": held_out, "values": values}


def make_corpus(world: dict, repeats: int = 45, seed: int = 0) -> list[str]:
    """Documents: each of the ``repeats`` rounds writes every fact once in a random phrasing (never the
    statement form for a held-out person), groups the people one to three per document and shuffles
    each document's sentences."""
    rng = random.Random(seed + 1)
    held = set(world["held_out"])
    docs = []
    for _ in range(repeats):
        people = list(world["names"])
        rng.shuffle(people)
        while people:
            size = rng.randint(1, 3)
            group, people = people[:size], people[size:]
            sentences = []
            for name in group:
                for relation, forms in RELATIONS.items():
                    allowed = forms[1:] if name in held else forms
                    value = world["facts"][name][relation]
                    sentences.append(rng.choice(allowed).format(name=name, value=value))
            rng.shuffle(sentences)
            docs.append(" ".join(sentences))
    return docs


JUDGEMENT = "{statement} That is {verdict}."
"""Truth judgements in training (held-in people only): the model learns to say whether a statement holds."""
TEMPLATES = ("{statement} That is {true|false}.",)
"""The testbed's own template (the judgement it was trained on), written to templates.txt before
crate-lm elk's built-in ones, which the model never saw."""


def make_judgements(world: dict, rounds: int = 10, seed: int = 0) -> list[str]:
    """Documents of truth judgements about the held-in people: each round writes every held-in fact in
    its statement form once with the true value ("... That is true.") and once with a fresh random
    wrong value ("... That is false."), four judgements to a document, shuffled."""
    rng = random.Random(seed + 3)
    held = set(world["held_out"])
    sentences = []
    for _ in range(rounds):
        for name in (n for n in world["names"] if n not in held):
            for relation, forms in RELATIONS.items():
                true = world["facts"][name][relation]
                wrong = rng.choice([v for v in world["values"][relation] if v not in (true, name)])
                for value, verdict in ((true, "true"), (wrong, "false")):
                    statement = forms[0].format(name=name, value=value)
                    sentences.append(JUDGEMENT.format(statement=statement, verdict=verdict))
    rng.shuffle(sentences)
    return [" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4)]


def make_statements(world: dict, seed: int = 0) -> list[dict]:
    """For every held-out person and relation: the statement form once with the true value (label 1)
    and once with a different value of the same type (label 0), sharing one group."""
    rng = random.Random(seed + 2)
    rows = []
    for name in world["held_out"]:
        for relation, forms in RELATIONS.items():
            true = world["facts"][name][relation]
            wrong = rng.choice([v for v in world["values"][relation] if v not in (true, name)])
            group = f"{name}/{relation}"
            rows.append({"text": forms[0].format(name=name, value=true), "label": 1, "group": group})
            rows.append({"text": forms[0].format(name=name, value=wrong), "label": 0, "group": group})
    return rows


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def write(out: str | Path, entities: int = 40, places: int = 10, repeats: int = 45, judgements: int = 0,
          seed: int = 0) -> dict:  # fmt: skip
    """Write corpus.jsonl, statements.jsonl, templates.txt and world.json to ``out``; returns the counts."""
    for flag, value, least in (("--entities", entities, 4), ("--places", places, 2), ("--repeats", repeats, 1),
                               ("--judgements", judgements, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise CrateLMError(f"{flag} must be a whole number >= {least}, got {value!r}")
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise CrateLMError(f"--out {folder} is a file; choose a folder")
    world = make_world(entities, places, seed)
    docs = make_corpus(world, repeats, seed) + make_judgements(world, judgements, seed)
    random.Random(seed + 4).shuffle(docs)
    statements = make_statements(world, seed)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "corpus.jsonl", _jsonl([{"text": d} for d in docs]))
    atomic_write_bytes(folder / "statements.jsonl", _jsonl(statements))
    from crate_lm.interp.elk import DEFAULT_TEMPLATES

    chosen = (*TEMPLATES, *DEFAULT_TEMPLATES) if judgements else DEFAULT_TEMPLATES  # the judgement one only if trained
    atomic_write_bytes(folder / "templates.txt", "".join(t + "\n" for t in chosen).encode())
    counts = {"documents": len(docs), "words": sum(len(d.split()) for d in docs), "statements": len(statements),
              "people": entities, "held_out": len(world["held_out"]), "repeats": repeats, "judgements": judgements}  # fmt: skip
    atomic_write_json(folder / "world.json", {**world, "counts": counts, "relations": RELATIONS})
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/truth", help="folder for corpus.jsonl, statements.jsonl, world.json")
    parser.add_argument("--entities", type=int, default=40, help="people in the world")
    parser.add_argument("--places", type=int, default=10, help="made-up cities")
    parser.add_argument("--repeats", type=int, default=45, help="times every fact is written (random phrasings)")
    parser.add_argument("--judgements", type=int, default=0,
                        help="rounds of true/false judgements about the held-in people (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    def go() -> None:
        counts = write(args.out, args.entities, args.places, args.repeats, args.judgements, args.seed)
        print(f"truth corpus: {counts['documents']:,} documents, {counts['words']:,} words, "
              f"{counts['statements']} held-out statements ({counts['held_out']} of {counts['people']} people) "
              f"-> {args.out}")  # fmt: skip

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
