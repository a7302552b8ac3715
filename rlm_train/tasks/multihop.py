"""`multihop`: BrowseComp-Plus style. Hundreds to thousands of documents (real HotpotQA
paragraphs) with planted bridge facts about invented entities; the question chains 2-4
relations ("the birthplace of the mentor of the designer of the Varnholt Clock"), each
fact in a different document, so the answer needs a search per hop.

Distractors: the same relations about other invented entities (other chains), and
mentions of each chain entity with unrelated verbs, so a grep for a name finds several
sentences and only one states the asked relation. Invented names keep the answer out
of any model's memory; each name belongs to one split.
"""

from __future__ import annotations

import random
import re

from rlm_train.tasks import corpora
from rlm_train.tasks.common import insert_at_sentence
from rlm_train.tasks.family import Family
from rlm_train.tasks.scoring import score_multihop

MIN_TOKENS = 1500  # a handful of documents to spread the hops over

DOC_HEADER = "### Document {i}: {title}"

# Relations between entity types. `facts`: ways the planted sentence states it;
# `phrase`: how the question refers to the object given the subject.
RELATIONS: list[dict] = [
    {"id": "designer", "subject": "artifact", "object": "person", "phrase": "the designer of {s}",
     "facts": ["{S} was designed by {o}.", "The designer of {s} was {o}."]},
    {"id": "owner", "subject": "artifact", "object": "org", "phrase": "the owner of {s}",
     "facts": ["{S} is owned by {o}.", "Today {s} belongs to {o}."]},
    {"id": "mentor", "subject": "person", "object": "person", "phrase": "the mentor of {s}",
     "facts": ["{S} studied under {o}.", "{O} was the mentor of {s}."]},
    {"id": "employer", "subject": "person", "object": "org", "phrase": "the employer of {s}",
     "facts": ["{S} worked for {o} for many years.", "{S} was employed by {o}."]},
    {"id": "birthplace", "subject": "person", "object": "place", "phrase": "the birthplace of {s}",
     "facts": ["{S} was born in {o}.", "{S} was born and raised in {o}."]},
    {"id": "founder", "subject": "org", "object": "person", "phrase": "the founder of {s}",
     "facts": ["{S} was founded by {o}.", "{O} founded {s}."]},
    {"id": "headquarters", "subject": "org", "object": "place", "phrase": "the headquarters town of {s}",
     "facts": ["{S} is headquartered in {o}.", "The headquarters of {s} are in {o}."]},
    {"id": "twin", "subject": "place", "object": "place", "phrase": "the twin town of {s}",
     "facts": ["{S} is twinned with {o}.", "{O} is the twin town of {s}."]},
]
# Unrelated mentions: a grep for the name finds these too.
MENTIONS = ["{S} was once visited by {o}.", "A letter from {s} to {o} survives.", "{S} is often compared with {o}."]

_SYL1 = "Al Bar Cor Dal El Fen Gar Hal Ir Jor Kel Lor Mar Nor Or Pel Quen Ros Sel Tor Ul Var Wen Yor Zan".split()
_SYL2 = "a ad an ar el en er ia in is o on or ra ren ric ta ven vin wyn".split()
_SUR = "brook by dane ford gate holt ley mont more rick sby ston thorpe wick worth".split()
_PLACE = "bury dale field ford haven mere moor port stead vale wick".split()
_ORG = ["Guild", "Works", "Foundry", "Press", "Institute", "Company", "Society"]
_ART = ["Clock", "Codex", "Bridge", "Organ", "Telescope", "Lighthouse", "Tapestry", "Engine"]


def _word(rng: random.Random) -> str:
    return rng.choice(_SYL1) + rng.choice(_SYL2)


def _name(rng: random.Random, kind: str) -> str:
    if kind == "person":
        return f"{_word(rng)} {rng.choice(_SYL1)}{rng.choice(_SUR)}"
    if kind == "place":
        return f"{rng.choice(_SYL1)}{rng.choice(_SYL2)}{rng.choice(_PLACE)}"
    if kind == "org":
        return f"{_word(rng)}{rng.choice(_SUR)} {rng.choice(_ORG)}"
    return f"{_word(rng)}{rng.choice(_SUR)} {rng.choice(_ART)}"


def ref(name: str, kind: str) -> str:
    """How a sentence refers to an entity mid-sentence (artifacts and orgs take 'the')."""
    return f"the {name}" if kind in ("artifact", "org") else name


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def fact_sentence(template: str, s: str, s_kind: str, o: str, o_kind: str) -> str:
    sr, orf = ref(s, s_kind), ref(o, o_kind)
    return template.format(S=_cap(sr), s=sr, O=_cap(orf), o=orf)


_NAME = r"(?:[Tt]he )?(?P<o>[A-Z]\w*(?: [A-Z]\w*)*)"


def object_patterns(rel: dict, subject_ref: str) -> list[re.Pattern]:
    """Regexes that read the object of `rel` for a known subject back out of text."""
    # The subject may be asked with or without its article ("the Varnholt Clock").
    subject = r"(?:[Tt]he )?" + re.escape(strip_article(subject_ref))
    out = []
    for template in rel["facts"]:
        text = re.escape(template)
        text = text.replace(r"\{S\}", subject).replace(r"\{s\}", subject)
        text = text.replace(r"\{O\}", _NAME).replace(r"\{o\}", _NAME)
        out.append(re.compile(text))
    return out


def strip_article(name: str) -> str:
    return re.sub(r"^(?:the|The)\s+", "", name.strip())


class _Names:
    """Fresh invented names of one split, never reused within a task."""

    def __init__(self, rng: random.Random, split: str):
        self.rng, self.split = rng, split
        self.used: set[str] = set()

    def new(self, kind: str) -> str:
        while True:
            name = _name(self.rng, kind)
            if name not in self.used and corpora.split_of(f"multihop-name:{name}") == self.split:
                self.used.add(name)
                return name


def _chain(rng: random.Random, names: _Names, hops: int, start_kind: str | None = None):
    """A start entity and `hops` relations from it: [(rel, subject, object)], kinds follow types."""
    for _ in range(100):
        kind = start_kind or rng.choice(["artifact", "org", "person"])
        rels: list[dict] = []
        current = kind
        for _ in range(hops):
            options = [r for r in RELATIONS if r["subject"] == current and (not rels or r["id"] != rels[-1]["id"])]
            if not options:
                break
            rels.append(rng.choice(options))
            current = rels[-1]["object"]
        if len(rels) == hops:
            break
    entity = names.new(kind)
    steps = []
    for rel in rels:
        obj = names.new(rel["object"])
        steps.append((rel, entity, obj))
        entity = obj
    return kind, steps


def question_phrase(start: str, start_kind: str, rels: list[dict]) -> str:
    phrase = ref(start, start_kind)
    for rel in rels:
        phrase = rel["phrase"].format(s=phrase)
    return phrase


def generate(rng: random.Random, target_chars: int, split: str) -> dict:
    names = _Names(rng, split)
    hops = rng.choice([2, 3, 4])
    start_kind, steps = _chain(rng, names, hops)
    facts = [fact_sentence(rng.choice(rel["facts"]), s, rel["subject"], o, rel["object"]) for rel, s, o in steps]
    # Distractor chains: the same relations about other entities.
    for _ in range(rng.randint(2, 4)):
        _, other = _chain(rng, names, hops, start_kind)
        facts += [fact_sentence(rng.choice(r["facts"]), s, r["subject"], o, r["object"]) for r, s, o in other]
    # Each chain entity is also mentioned beside an unrelated invented entity.
    for rel, s, _ in steps:
        other_kind = rng.choice(["person", "place", "org"])
        facts.append(fact_sentence(rng.choice(MENTIONS), s, rel["subject"], names.new(other_kind), other_kind))

    docs = _documents(rng, target_chars, split, len(facts))
    # Every planted sentence goes into a different document.
    slots = rng.sample(range(len(docs)), len(facts))
    for slot, fact in zip(slots, facts):
        title, text = docs[slot]
        docs[slot] = (title, insert_at_sentence(text, rng.randrange(len(text)), fact).strip())
    context = "\n\n".join(f"{DOC_HEADER.format(i=i + 1, title=t)}\n{x}" for i, (t, x) in enumerate(docs))
    phrase = question_phrase(steps[0][1], start_kind, [rel for rel, _, _ in steps])
    answer = steps[-1][2]
    query = (
        f"The context holds {len(docs)} documents, each starting with a line "
        f"`### Document <n>: <title>`. Answer this question from them: what is {phrase}? "
        "Answer with the name only."
    )
    return {
        "query": query,
        "context": context,
        "answer": answer,
        "meta": {
            "hops": hops,
            "relations": [rel["id"] for rel, _, _ in steps],
            "start": steps[0][1],
            "documents": len(docs),
        },
    }


def _documents(rng: random.Random, target_chars: int, split: str, min_docs: int) -> list[tuple[str, str]]:
    pool = corpora.paragraphs(split)
    order = rng.sample(range(len(pool)), len(pool))
    docs: list[tuple[str, str]] = []
    total = 0
    i = 0
    while total < target_chars or len(docs) < min_docs:
        para = pool[order[i % len(order)]]
        # Repeated titles (only past ~1.5M tokens of held-out text) get a part number.
        title = para.title if i < len(order) else f"{para.title} (part {i // len(order) + 1})"
        docs.append((title, para.text))
        total += len(para.text) + len(title) + 30
        i += 1
    if len(docs) > min_docs and total > target_chars:
        docs.pop()
    return docs


def score(task: dict, answer) -> float:
    """Normalized exact match, else token F1."""
    return score_multihop(task["answer"], answer)


_DOC_TITLE = re.compile(r"^### Document \d+: (.+)$", re.MULTILINE)


def split_keys(task: dict) -> dict:
    """Invented names (start and answer) and documents."""
    # A repeated title carries a "(part n)" suffix; its paragraph is the same item.
    titles = _DOC_TITLE.findall(task.get("context", ""))
    return {"name": [task["meta"]["start"], task["answer"]],
            "document": [re.sub(r" \(part \d+\)$", "", t) for t in titles]}


FAMILY = Family(name="multihop", generate=generate, scorer="multihop_f1", score=score, min_tokens=MIN_TOKENS,
                split_keys=split_keys)
