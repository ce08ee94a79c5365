"""Deterministic English-like synthetic documents for offline tests and smoke runs.

There is no network in CI, so the tokenizer/shard pipeline and the trainer are exercised on text
from a small probabilistic grammar instead of FineWeb. The text is built to resemble web prose
just enough to be a meaningful stand-in:

* a real vocabulary of a few hundred words, grouped by topic (cooking, travel, sports, ...), so
  each document is topically coherent and a small LM can beat unigram entropy by a wide margin;
* sentence templates with capitalisation, punctuation, a/an agreement and simple plurals;
* numbers written with digits (years, prices, counts, percentages, times, dates);
* occasional non-ASCII (accented names and places, em dashes, curly quotes, euro prices) and a
  few rare characters (emoji, CJK) that a sentencepiece model with character_coverage 0.999 has
  to encode with byte fallback.

Document i of seed s depends only on (s, i), so a shorter run is a prefix of a longer one.

Run:
    python data/synthetic_text.py --docs 3000 --seed 0 --out syn.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

DEFAULT_MIN_WORDS = 40
DEFAULT_MAX_WORDS = 220
MIN_SENTENCES_PER_PARAGRAPH = 2
MAX_SENTENCES_PER_PARAGRAPH = 6
# Probabilities of the rarer decorations; kept low so that emoji and CJK fall below the
# tokenizer's 0.999 character coverage and end up as byte-fallback tokens.
P_EM_DASH = 0.06
P_RARE_SYMBOL_DOC = 0.08
P_TOPIC_TEMPLATE = 0.55
P_NAME_SUBJECT = 0.45

FIRST_NAMES = [
    "Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack",
    "Laura", "Mark", "Nina", "Oscar", "Paul", "Rosa", "Sam", "Tom", "Vera", "Will",
    "José", "Zoë", "Chloé", "Jürgen", "Søren", "François", "Renée", "Björn", "Inés", "Mei",
]
SURNAMES = [
    "Smith", "Brown", "Taylor", "Walker", "Hughes", "Carter", "Morgan", "Reed", "Bell", "Price",
    "Müller", "García", "Núñez", "Dubois", "Novak", "Lindqvist", "Okafor", "Tanaka", "Rossi", "Silva",
]
CITIES = [
    "London", "Paris", "Berlin", "Madrid", "Boston", "Chicago", "Denver", "Toronto", "Sydney",
    "Dublin", "Lisbon", "Oslo", "Vienna", "Prague", "Seattle", "Austin",
    "Zürich", "München", "Kraków", "Montréal", "São Paulo", "Reykjavík", "Malmö",
]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
ADJECTIVES = [
    "small", "large", "old", "new", "bright", "quiet", "busy", "simple", "strange", "useful",
    "careful", "famous", "local", "modern", "early", "late", "warm", "cold", "heavy", "light",
    "cheap", "expensive", "popular", "difficult", "easy", "important", "unusual", "beautiful",
    "green", "red", "blue", "long", "short", "fresh", "honest", "clever",
]
ADVERBS = [
    "quickly", "slowly", "carefully", "quietly", "finally", "really", "almost", "usually",
    "often", "rarely", "suddenly", "easily", "clearly", "nearly", "happily",
]
CONNECTIVES = [
    "However", "Meanwhile", "In addition", "As a result", "Later", "At first", "Of course",
    "In the end", "For example", "Still", "Even so", "Afterwards",
]
SPEECH_VERBS = ["said", "explained", "noted", "added", "told us", "wrote", "admitted"]
PRONOUNS = ["she", "he", "they", "we", "I"]
PREPOSITIONS = ["near", "behind", "inside", "beside", "across from", "next to"]

TOPICS: dict[str, dict[str, list[str]]] = {
    "cooking": {
        "nouns": ["recipe", "kitchen", "oven", "onion", "garlic", "tomato", "sauce", "bowl",
                  "knife", "pan", "soup", "bread", "cake", "chef", "spoon", "lemon", "pepper",
                  "butter", "dinner", "salad", "café", "croissant", "jalapeño"],
        "verbs": ["chopped", "baked", "stirred", "tasted", "boiled", "served", "mixed",
                  "roasted", "sliced", "cooked"],
        "adjectives": ["crispy", "spicy", "sweet", "salty", "tender", "golden", "delicious"],
        "places": ["market", "restaurant", "bakery", "kitchen"],
    },
    "travel": {
        "nouns": ["train", "ticket", "hotel", "museum", "river", "bridge", "station", "beach",
                  "mountain", "village", "guide", "map", "suitcase", "flight", "harbour",
                  "castle", "island", "street", "tourist", "passport"],
        "verbs": ["visited", "booked", "explored", "photographed", "crossed", "missed",
                  "found", "followed", "reached", "left"],
        "adjectives": ["scenic", "crowded", "remote", "historic", "sunny", "charming"],
        "places": ["airport", "old town", "harbour", "square"],
    },
    "sports": {
        "nouns": ["team", "coach", "match", "goal", "season", "player", "stadium", "ball",
                  "referee", "league", "trophy", "fan", "striker", "keeper", "game", "race",
                  "runner", "bike"],
        "verbs": ["won", "lost", "scored", "trained", "defended", "coached", "watched",
                  "played", "tackled", "passed"],
        "adjectives": ["fast", "strong", "tired", "fierce", "confident", "injured"],
        "places": ["stadium", "track", "gym", "field"],
    },
    "technology": {
        "nouns": ["computer", "phone", "app", "server", "network", "battery", "screen",
                  "keyboard", "program", "update", "robot", "camera", "chip", "laptop",
                  "website", "database", "engineer", "user", "password", "cable"],
        "verbs": ["installed", "repaired", "tested", "built", "designed", "deleted",
                  "upgraded", "launched", "debugged", "connected"],
        "adjectives": ["digital", "wireless", "portable", "reliable", "slow", "secure"],
        "places": ["office", "lab", "data centre", "shop"],
    },
    "history": {
        "nouns": ["king", "queen", "army", "empire", "war", "treaty", "castle", "village",
                  "church", "merchant", "letter", "map", "ship", "battle", "city", "palace",
                  "soldier", "monk", "emperor", "harvest"],
        "verbs": ["ruled", "signed", "attacked", "founded", "defeated", "discovered",
                  "burned", "rebuilt", "crowned", "conquered"],
        "adjectives": ["ancient", "royal", "medieval", "powerful", "forgotten", "bloody"],
        "places": ["palace", "border", "coast", "capital"],
    },
    "gardening": {
        "nouns": ["garden", "tree", "flower", "seed", "soil", "rose", "leaf", "apple",
                  "potato", "carrot", "bean", "weed", "fence", "pot", "hedge", "bee",
                  "meadow", "orchard"],
        "verbs": ["planted", "watered", "pruned", "picked", "grew", "dug", "harvested",
                  "trimmed", "moved", "fed"],
        "adjectives": ["wild", "dry", "wet", "healthy", "leafy", "ripe"],
        "places": ["greenhouse", "orchard", "allotment", "backyard"],
    },
    "finance": {
        "nouns": ["bank", "market", "price", "loan", "budget", "share", "investor", "company",
                  "tax", "salary", "bill", "profit", "account", "fund", "bond", "store",
                  "customer", "contract"],
        "verbs": ["bought", "sold", "paid", "borrowed", "invested", "saved", "spent",
                  "earned", "raised", "cut"],
        "adjectives": ["rich", "poor", "stable", "risky", "profitable", "annual"],
        "places": ["bank", "exchange", "office", "mall"],
    },
    "science": {
        "nouns": ["experiment", "sample", "planet", "star", "cell", "atom", "scientist",
                  "theory", "telescope", "microscope", "result", "study", "virus", "ocean",
                  "energy", "climate", "molecule", "signal"],
        "verbs": ["measured", "observed", "tested", "published", "analysed", "predicted",
                  "recorded", "detected", "reviewed", "repeated"],
        "adjectives": ["chemical", "precise", "tiny", "distant", "surprising", "careful"],
        "places": ["laboratory", "observatory", "university", "field station"],
    },
}

# Rare symbols: each appears in well under 0.1% of characters, so the tokenizer falls back to bytes.
RARE_SNIPPETS = [
    "🙂", "👍", "🎉", "☕", "(東京)", "(北京)", "寿司", "拉面", "(서울)", "→", "½", "©",
]
CURRENCIES = ["$", "$", "$", "€", "£"]

GENERIC_TEMPLATES = [
    "{subj} {verb} the {adj} {noun} {where}.",
    "In {year}, {subj} {verb} {count} {nouns} in {city}.",
    "The {noun} cost {price}, and {pron} {verb} it {adv}.",
    "{Connective}, the {noun} was {adv} {adj}.",
    "“The {noun} is {adj},” {name} {speech}.",
    "“We {verb} the {noun} {adv},” {name} {speech}, “and it was {adj}.”",
    "About {percent} of the {nouns} in {city} are {adj}.",
    "{Name} arrived at {time} and {verb} a {adj} {noun}.",
    "On {date}, {name} {verb} a {adj} {noun} {prep} the {place}.",
    "Because the {noun} was {adj}, {name} {verb} the {noun2} {adv}.",
    "{Name} thinks the {noun} is more {adj} than the {noun2}.",
    "There were {count} {nouns} and {count2} {nouns2} {prep} the {place}.",
    "The {adj} {noun} {verb} the {noun2}, and the {noun3} {verb2} the {nouns}.",
    "Every {weekday}, {name} {verb} the {noun} {where}.",
    "{subj} {adv} {verb} {count} {adj} {nouns} for {price}.",
    "It was a {adj} {noun}, but the {noun2} was even more {adj2}.",
    "Nobody knew why the {noun} was so {adj}.",
    "{Name} {surname} {verb} the {noun} in {year} and again in {year2}.",
]

TOPIC_TEMPLATES: dict[str, list[str]] = {
    "cooking": [
        "Add {count} cups of {noun} and stir for {small} minutes.",
        "Bake the {noun} at {temp} degrees for {small} minutes until it is {adj}.",
        "This {noun} serves {small} people and takes about {small} minutes.",
    ],
    "travel": [
        "A single ticket from {city} to {city2} costs {price}.",
        "The {noun} opens at {time} and closes at {time2}.",
        "We spent {small} nights in {city}, and the hotel cost {price} per night.",
    ],
    "sports": [
        "The {city} team beat {city2} {small} to {small2} on {weekday}.",
        "{Name} {surname} scored {small} goals in {count} games last season.",
        "Tickets for the final sold out in {small} minutes.",
    ],
    "technology": [
        "Version {small}.{small2} of the {noun} app was released in {year}.",
        "The new {noun} has {count} GB of memory and costs {price}.",
        "The battery lasts about {small} hours, which is {percent} better than before.",
    ],
    "history": [
        "In {year}, the king of {city} {verb} the {noun}.",
        "The {adj} {noun} was built around {year} and destroyed in {year2}.",
        "About {count} soldiers died in the battle of {city} in {year}.",
    ],
    "gardening": [
        "Plant the {noun} seeds {small} inches apart in early {month}.",
        "Water the {noun} every {small} days, or twice a day in {month}.",
        "Our {noun} produced {count} kilos of fruit this year.",
    ],
    "finance": [
        "Shares of the {noun} company rose {percent} to {price} on {weekday}.",
        "The {noun} fund returned {percent} in {year}, after fees.",
        "{Name} {surname} paid {price} in tax on a salary of {bigprice}.",
    ],
    "science": [
        "The team measured {count} samples and found a {percent} increase.",
        "The {noun} is about {count} light years from Earth.",
        "The {adj} result was published in {month} {year}.",
    ],
}
EM_DASH_TAILS = [
    "at least according to {name}.",
    "or so {name} {speech}.",
    "which surprised {name}.",
    "just as {name} predicted.",
    "and the {noun} was {adj} too.",
]
TITLE_TEMPLATES = [
    "{Adj} {Noun} in {city}",
    "Why the {Noun} Matters",
    "{Count} Things About the {Adj} {Noun}",
    "How {Name} {Verb} the {Noun}",
    "The {Noun} of {year}",
]

SLOT_RE = re.compile(r"\{(\w+)\}")
# "an" before a vowel sound; "a useful", "a unit" keep "a" because u- there sounds like "you".
ARTICLE_RE = re.compile(r"\b([Aa]) (?=[aeioAEIO]|[uU](?!s|ni))")
TRAILING_DIGITS_RE = re.compile(r"\d+$")


def pluralize(noun: str) -> str:
    """Regular English plural, enough for this vocabulary."""
    if noun.endswith(("s", "x", "ch", "sh")) or noun in ("potato", "tomato", "hero"):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith("f"):
        return noun[:-1] + "ves"
    return noun + "s"


class DocumentWriter:
    """Holds one document's topic and cast so the sentences of a document stay coherent."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.topic_name = rng.choice(sorted(TOPICS))
        self.topic = TOPICS[self.topic_name]
        self.cast = rng.sample(FIRST_NAMES, 3)
        self.surnames = rng.sample(SURNAMES, 3)
        self.home_city = rng.choice(CITIES)

    # Slot fillers. Document-level choices (topic, cast, home city) are preferred most of the
    # time, which gives the text long-range regularities a model can learn to exploit.
    def _name(self) -> str:
        weights = [5, 3, 1]
        return self.rng.choices(self.cast, weights)[0]

    def _city(self) -> str:
        return self.home_city if self.rng.random() < 0.6 else self.rng.choice(CITIES)

    def _noun(self) -> str:
        return self.rng.choice(self.topic["nouns"])

    def _adj(self) -> str:
        pool = self.topic["adjectives"] if self.rng.random() < 0.5 else ADJECTIVES
        return self.rng.choice(pool)

    def _subject(self) -> str:
        if self.rng.random() < P_NAME_SUBJECT:
            return self._name()
        if self.rng.random() < 0.5:
            return self.rng.choice(PRONOUNS)
        return "the " + self._noun()

    def _price(self) -> str:
        symbol = self.rng.choice(CURRENCIES)
        if self.rng.random() < 0.5:
            return f"{symbol}{self.rng.randint(1, 99)}.{self.rng.choice([0, 49, 50, 95, 99]):02d}"
        return f"{symbol}{self.rng.randint(2, 950)}"

    def _date(self) -> str:
        return f"{self.rng.choice(MONTHS)} {self.rng.randint(1, 28)}, {self.rng.randint(1950, 2024)}"

    def _time(self) -> str:
        return f"{self.rng.randint(6, 22)}:{self.rng.choice([0, 15, 30, 45]):02d}"

    def slot(self, name: str) -> str:
        """Fill one template slot; a trailing digit (noun2, year2) just asks for another draw."""
        base = TRAILING_DIGITS_RE.sub("", name)
        capital = base[0].isupper()
        value = self._fill(base.lower())
        return value[0].upper() + value[1:] if capital else value

    def _fill(self, base: str) -> str:
        rng = self.rng
        fillers = {
            "subj": self._subject,
            "name": self._name,
            "surname": lambda: self.surnames[0],
            "pron": lambda: rng.choice(PRONOUNS),
            "city": self._city,
            "noun": self._noun,
            "nouns": lambda: pluralize(self._noun()),
            "verb": lambda: rng.choice(self.topic["verbs"]),
            "adj": self._adj,
            "adv": lambda: rng.choice(ADVERBS),
            "connective": lambda: rng.choice(CONNECTIVES),
            "speech": lambda: rng.choice(SPEECH_VERBS),
            "prep": lambda: rng.choice(PREPOSITIONS),
            "place": lambda: rng.choice(self.topic["places"]),
            "where": lambda: f"{rng.choice(PREPOSITIONS)} the {rng.choice(self.topic['places'])}",
            "year": lambda: str(rng.randint(1850, 2024)),
            "count": lambda: str(rng.randint(2, 400)),
            "small": lambda: str(rng.randint(2, 12)),
            "temp": lambda: str(rng.choice([160, 175, 180, 200, 220])),
            "percent": lambda: f"{rng.randint(1, 99)}%",
            "price": self._price,
            "bigprice": lambda: f"${rng.randint(20, 180)},{rng.randint(0, 999):03d}",
            "time": self._time,
            "date": self._date,
            "month": lambda: rng.choice(MONTHS),
            "weekday": lambda: rng.choice(WEEKDAYS),
        }
        return fillers[base]()

    def fill(self, template: str) -> str:
        text = SLOT_RE.sub(lambda m: self.slot(m.group(1)), template)
        text = ARTICLE_RE.sub(lambda m: m.group(1) + "n ", text)
        return text[0].upper() + text[1:]

    def sentence(self) -> str:
        if self.rng.random() < P_TOPIC_TEMPLATE:
            template = self.rng.choice(TOPIC_TEMPLATES[self.topic_name] + GENERIC_TEMPLATES)
        else:
            template = self.rng.choice(GENERIC_TEMPLATES)
        text = self.fill(template)
        if self.rng.random() < P_EM_DASH and text.endswith("."):
            tail = self.fill(self.rng.choice(EM_DASH_TAILS))
            text = text[:-1] + " — " + tail[0].lower() + tail[1:]
        return text

    def title(self) -> str:
        words = self.fill(self.rng.choice(TITLE_TEMPLATES)).split(" ")
        return " ".join(w[0].upper() + w[1:] for w in words)

    def document(self, n_words: int) -> str:
        paragraphs = [self.title()]
        words = 0
        while words < n_words:
            n_sentences = self.rng.randint(MIN_SENTENCES_PER_PARAGRAPH, MAX_SENTENCES_PER_PARAGRAPH)
            paragraph = " ".join(self.sentence() for _ in range(n_sentences))
            paragraphs.append(paragraph)
            words += len(paragraph.split())
        if self.rng.random() < P_RARE_SYMBOL_DOC:
            paragraphs[-1] += " " + self.rng.choice(RARE_SNIPPETS)
        return "\n\n".join(paragraphs)


def generate_documents(
    n_docs: int,
    seed: int,
    min_words: int = DEFAULT_MIN_WORDS,
    max_words: int = DEFAULT_MAX_WORDS,
) -> list[str]:
    """Return n_docs documents; document i is a pure function of (seed, i, min_words, max_words)."""
    if n_docs < 0:
        raise ValueError(f"n_docs must be non-negative, got {n_docs}")
    if not 0 < min_words <= max_words:
        raise ValueError(f"need 0 < min_words <= max_words, got {min_words}, {max_words}")
    docs = []
    for i in range(n_docs):
        # A string seed is hashed with SHA-512 by random.Random, stable across runs and platforms.
        rng = random.Random(f"synthetic-text:{seed}:{i}")
        docs.append(DocumentWriter(rng).document(rng.randint(min_words, max_words)))
    return docs


def write_jsonl(docs: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, required=True, help="number of documents")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", type=Path, required=True, help="output JSON-lines file")
    parser.add_argument("--min-words", type=int, default=DEFAULT_MIN_WORDS)
    parser.add_argument("--max-words", type=int, default=DEFAULT_MAX_WORDS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    docs = generate_documents(args.docs, args.seed, args.min_words, args.max_words)
    write_jsonl(docs, args.out)
    n_chars = sum(len(d) for d in docs)
    print(f"wrote {len(docs)} documents ({n_chars:,} characters) to {args.out}")


if __name__ == "__main__":
    main()
