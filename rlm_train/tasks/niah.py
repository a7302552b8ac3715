"""`niah`: RULER-style single-needle retrieval in long real prose (Paul Graham essays).

Variants: one needle; several keys (ask about one); several values for one key (ask
for all); distractor needles whose keys share a word with the asked key. Keys are
adjective-noun pairs; each key, and each needle and question wording, belongs to one
split, so held-out keys and wordings are never seen in training.
"""

from __future__ import annotations

import random

from rlm_train.tasks import corpora
from rlm_train.tasks.common import insert_at_sentence
from rlm_train.tasks.family import Family
from rlm_train.tasks.scoring import score_all_strings

MIN_TOKENS = 500  # a needle and a few sentences of haystack

VARIANTS = ("single", "multikey", "multivalue", "distractor")

# Wordings belong to a split too: a held-out task's needle and question are worded in ways
# no training task uses, so a model must learn to search for the key, not one sentence.
# Every needle names the key before its value.
NEEDLES = {
    "train": (
        "One of the special magic numbers for {key} is: {value}.",
        "The special magic number for {key} is: {value}.",
        "Remember it well: one of the special magic numbers for {key} is: {value}.",
        "The access code for {key} is {value}.",
        "Note that {key} was given the number {value}.",
        "Our records list {key} with the value {value}.",
    ),
    "heldout": (
        "The hidden code assigned to {key} reads {value}.",
        "For {key}, the reference number is {value}.",
        "Keep in mind that {key} corresponds to the number {value}.",
    ),
}
QUERIES_ONE = {
    "train": (
        "What is the special magic number for {key} mentioned in the provided text?",
        "Find the special magic number for {key} in the text. What is it?",
        "Which number does the text give for {key}?",
        "Look up the value recorded for {key}.",
        "{key}: which number goes with it?",
        "I need the number linked to {key}. What is it?",
        "The text mentions {key} together with a number. Which number?",
        "Search the document for {key} and return its number.",
    ),
    "heldout": (
        "Somewhere in the document a number is tied to {key}. Report it.",
        "Tell me the code that belongs to {key}.",
    ),
}
QUERIES_ALL = {
    "train": (
        "What are all the special magic numbers for {key} mentioned in the provided text?",
        "List every special magic number for {key} that appears in the text.",
        "Give all the numbers the text states for {key}.",
        "{key} appears with several numbers. List them all.",
        "Return every number connected to {key}.",
    ),
    "heldout": (
        "Report every number that the document ties to {key}.",
        "Collect all the codes belonging to {key}.",
    ),
}


def _pool(table: dict[str, tuple[str, ...]], split: str) -> tuple[str, ...]:
    # Splits other than the two (none today) use the training wordings.
    return table.get(split, table["train"])


ADJECTIVES = """amber ancient bitter bold brave brisk calm clever cold crimson curious damp dark
dusty eager early faint fierce fragile gentle gilded golden grand gray hidden hollow humble
icy idle jolly keen lively lonely loud lucky mellow misty modest narrow noble odd pale patient
plain polite proud quick quiet rapid rare restless rough rustic scarlet secret shallow sharp
shy silent silver simple sleepy slow smooth soft solemn sour spare steady stern still stormy
sturdy subtle sunny swift tame tender thin tidy tiny tranquil vast velvet vivid warm wary
weary wild windy wise witty young zealous""".split()
NOUNS = """anchor apple arrow badge barn beacon bell bridge brook cabin candle canyon castle
cedar cellar chapel cliff clock cloud comet compass cottage crane creek crown desert dove
ember falcon fern field forest fountain garden gate glacier harbor hawk hill island ivy
jungle kettle lagoon lantern leaf lighthouse marble meadow mill mirror moon mountain oak
orchard otter owl palace pebble pine planet pond quarry quill raven reef ridge river robin
saddle shore spire spring star stone summit swan temple thistle tower valley violet willow
window wolf""".split()


def key_pool(split: str) -> list[str]:
    """All adjective-noun keys of `split`, in a fixed order."""
    return [f"{a}-{n}" for a in ADJECTIVES for n in NOUNS if corpora.split_of(f"niah-key:{a}-{n}") == split]


def _value(rng: random.Random, used: set[str]) -> str:
    while True:
        value = str(rng.randrange(1_000_000, 10_000_000))
        if value not in used:
            used.add(value)
            return value


def generate(rng: random.Random, target_chars: int, split: str) -> dict:
    keys = key_pool(split)
    variant = rng.choice(VARIANTS)
    key = rng.choice(keys)
    used_values: set[str] = set()
    needles: list[str] = []
    template = rng.choice(_pool(NEEDLES, split))

    if variant == "multivalue":
        values = [_value(rng, used_values) for _ in range(rng.randint(2, 4))]
        needles += [template.format(key=key, value=v) for v in values]
        query = rng.choice(_pool(QUERIES_ALL, split)).format(key=key)
        answer: str | list[str] = values
    else:
        value = _value(rng, used_values)
        needles.append(template.format(key=key, value=value))
        query = rng.choice(_pool(QUERIES_ONE, split)).format(key=key)
        answer = value
    others: list[str] = []
    if variant == "multikey":
        others = rng.sample([k for k in keys if k != key], rng.randint(2, 4))
    elif variant == "distractor":
        # Same adjective or same noun as the asked key: a sloppy search finds these.
        adjective, noun = key.split("-")
        near = [k for k in keys if k != key and (k.startswith(adjective + "-") or k.endswith("-" + noun))]
        others = rng.sample(near, min(len(near), rng.randint(2, 3)))
    needles += [rng.choice(_pool(NEEDLES, split)).format(key=k, value=_value(rng, used_values)) for k in others]

    haystack = _haystack(rng, target_chars - sum(len(n) + 1 for n in needles), split)
    # Insert from the back so earlier positions stay valid; depths spread over the text.
    positions = sorted((rng.randrange(0, max(1, len(haystack))) for _ in needles), reverse=True)
    order = list(needles)
    rng.shuffle(order)
    for position, needle in zip(positions, order):
        haystack = insert_at_sentence(haystack, position, needle)
    return {
        "query": query,
        "context": haystack,
        "answer": answer,
        "meta": {"variant": variant, "keys": [key, *others], "needles": len(needles)},
    }


def _haystack(rng: random.Random, target_chars: int, split: str) -> str:
    blocks = corpora.essay_blocks(split)
    start = rng.randrange(len(blocks))
    pieces: list[str] = []
    total = 0
    i = start
    while total < target_chars:
        pieces.append(blocks[i % len(blocks)])
        total += len(pieces[-1]) + 1
        i += 1
    text = " ".join(pieces)
    # Cut at a sentence end so the haystack is whole sentences.
    cut = text.rfind(". ", 0, max(target_chars, 1))
    return text[: cut + 1] if cut > 0 else text[:target_chars]


def score(task: dict, answer) -> float:
    """RULER string_match_all over the needle value(s)."""
    return score_all_strings(task["answer"], answer)


def split_keys(task: dict) -> dict:
    return {"niah_key": task["meta"]["keys"]}


FAMILY = Family(name="niah", generate=generate, scorer="all_strings", score=score, min_tokens=MIN_TOKENS,
                split_keys=split_keys)
