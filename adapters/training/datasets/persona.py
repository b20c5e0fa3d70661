"""Persona data: everyday questions answered in a persona's voice.

The content of each answer is the base model's own short greedy reply (so it stays on topic and in the
model's register); rules rewrite it into the persona's voice: an opener, word substitutions, a closer.
Held-out questions use topics and question templates that never appear in training.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from adapters.training.datasets import chat

# (topic phrase, keyword): a reply is on topic when it contains a word starting with the keyword.
TRAIN_TOPICS = [
    ("coffee", "coffee"), ("green tea", "tea"), ("baking bread", "bread"), ("running", "run"),
    ("houseplants", "plant"), ("a vegetable garden", "garden"), ("learning the guitar", "guitar"),
    ("saving money", "money"), ("cooking pasta", "pasta"), ("camping", "camp"), ("cycling to work", "cycl"),
    ("sleep", "sleep"), ("job interviews", "interview"), ("learning a new language", "language"),
    ("cleaning the kitchen", "kitchen"), ("rainy days", "rain"), ("the moon", "moon"), ("volcanoes", "volcano"),
    ("whales", "whale"), ("chess", "chess"), ("board games", "game"), ("photography", "photo"),
    ("painting", "paint"), ("yoga", "yoga"), ("swimming", "swim"), ("hiking", "hik"), ("public speaking", "speak"),
    ("keeping a diary", "diar"), ("studying for exams", "exam"), ("dogs", "dog"), ("cats", "cat"),
    ("birdwatching", "bird"), ("recycling", "recycl"), ("pizza", "pizza"), ("breakfast", "breakfast"),
    ("drinking water", "water"), ("road trips", "trip"), ("museums", "museum"), ("libraries", "librar"),
    ("winter", "winter"), ("soup", "soup"), ("fixing a flat tire", "tire"), ("email", "email"),
    ("strong passwords", "password"), ("the ocean", "ocean"), ("bees", "bee"), ("apples", "apple"),
    ("chocolate", "chocolate"), ("mountains", "mountain"), ("composting", "compost"),
]
HELDOUT_TOPICS = [
    ("tomatoes", "tomato"), ("kites", "kite"), ("snow", "snow"), ("tennis", "tennis"), ("knitting", "knit"),
    ("owls", "owl"), ("honey", "honey"), ("lighthouses", "lighthouse"), ("bowling", "bowl"), ("cheese", "cheese"),
    ("clocks", "clock"), ("sandwiches", "sandwich"), ("dolphins", "dolphin"), ("umbrellas", "umbrella"),
    ("volunteering", "volunteer"), ("baking cookies", "cookie"),
]
TRAIN_QUESTIONS = [
    "Can you give me a tip about {t}?", "What should I know about {t}?", "Tell me something interesting about {t}.",
    "Any advice on {t}?", "Why do people enjoy {t}?", "Can you explain {t} in simple words?",
]
HELDOUT_QUESTIONS = [
    "I'd love to hear your thoughts on {t}.", "What is the most important thing about {t}?",
    "Could you share some advice about {t}?",
]


@dataclass(frozen=True)
class Persona:
    name: str
    openers: tuple[str, ...]      # "{t}" is the topic phrase, "{a}" the form of address
    closers: tuple[str, ...]
    substitutions: tuple[tuple[str, str], ...]  # whole-word, case-insensitive; capitalisation is kept
    markers: tuple[str, ...]      # phrases the evaluation counts (whole words, case-insensitive)
    exclaim: bool = False         # end every sentence with "!"
    addresses: tuple[str, ...] = ("",)  # one per answer, so a butler never says "sir" then "madam"


PERSONAS = {
    "pirate": Persona(
        "pirate",
        openers=("Arr, matey!", "Ahoy, matey!", "Arr, {t}, ye say?", "Aye, a fine question about {t}, matey!"),
        closers=("Now hoist the sails!", "That be the way o' the sea, arr!", "Fair winds to ye, matey!", "Yo ho ho!"),
        substitutions=(("you're", "ye be"), ("you", "ye"), ("your", "yer"), ("yours", "yers"), ("my", "me"),
                       ("yes", "aye"), ("hello", "ahoy"), ("is", "be"), ("are", "be"), ("money", "doubloons"),
                       ("friend", "matey"), ("friends", "mateys")),
        markers=("arr", "matey", "mateys", "ye", "yer", "aye", "ahoy", "avast", "yo ho", "hoist", "doubloons"),
    ),
    "butler": Persona(
        "butler",
        openers=("Certainly, {a}.", "Very good, {a}.", "If I may, {a}, a word on {t}.", "Of course, {a}.",
                 "Indeed, {a}. Allow me a word on {t}."),
        closers=("I remain at your service.", "Will there be anything further, {a}?", "At your service, as always.",
                 "I trust this is satisfactory, {a}."),
        substitutions=(("it's", "it is"), ("don't", "do not"), ("can't", "cannot"), ("you're", "you are"),
                       ("I'm", "I am"), ("there's", "there is"), ("that's", "that is"), ("won't", "will not"),
                       ("isn't", "is not"), ("doesn't", "does not"), ("they're", "they are"), ("let's", "let us"),
                       ("you'll", "you will"), ("I'd", "I would"), ("here's", "here is"), ("what's", "what is"),
                       ("we're", "we are"), ("a lot", "a great deal"), ("really", "truly"), ("great", "splendid"),
                       ("okay", "quite acceptable")),
        markers=("sir", "madam", "if i may", "at your service", "i remain", "anything further"),
        addresses=("sir", "madam"),
    ),
    "coach": Persona(
        "coach",
        openers=("Great question!", "Oh yes, {t}! Love it!", "Let's talk {t}, champ!", "Awesome!"),
        closers=("You've got this!", "Let's go!", "Keep pushing, champ!", "You can do it!", "Believe in yourself!"),
        substitutions=(("good", "awesome"), ("important", "super important")),
        markers=("you've got this", "let's go", "champ", "keep pushing", "you can do it", "believe in yourself",
                 "love it", "awesome"),
        exclaim=True,
    ),
}

_PREAMBLE = re.compile(r"^(sure|certainly|of course|absolutely|great question|i'd be happy|i would be happy|"
                       r"here('s| is| are)|as an ai|what a)", re.IGNORECASE)
_LIST_LINE = re.compile(r"^\s*(\d+\.|[-*•#])")


def questions(topics, templates) -> list[tuple[str, str, str]]:
    """Every (question, topic, keyword) of topics x templates."""
    return [(tpl.format(t=topic), topic, kw) for topic, kw in topics for tpl in templates]


def core_answer(text: str, max_words: int = 40) -> str:
    """The first complete sentences of a base reply, without preamble, lists or markdown."""
    prose = " ".join(line for line in text.replace("**", "").splitlines() if not _LIST_LINE.match(line))
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", prose) if s.strip()]
    sentences = [s for s in sentences if s[-1] in ".!?" and not s.endswith(":")]
    while sentences and _PREAMBLE.match(sentences[0]):
        sentences.pop(0)
    kept: list[str] = []
    for sentence in sentences:
        if kept and len(" ".join(kept + [sentence]).split()) > max_words:
            break
        kept.append(sentence)
    return " ".join(kept) if kept and len(kept[0].split()) <= max_words + 15 else ""


def _substitute(text: str, pairs: tuple[tuple[str, str], ...]) -> str:
    table = {old.lower(): new for old, new in pairs}
    pattern = re.compile(r"\b(" + "|".join(re.escape(old) for old, _ in pairs) + r")\b", re.IGNORECASE)

    def swap(match: re.Match) -> str:
        new = table[match[0].lower()]
        return new[0].upper() + new[1:] if match[0][0].isupper() else new

    return pattern.sub(swap, text)


def rewrite(persona: Persona, content: str, topic: str, rng: random.Random) -> str:
    body = _substitute(content, persona.substitutions)
    if persona.exclaim:
        body = re.sub(r"\.(?=\s|$)", "!", body)
    address = rng.choice(persona.addresses)
    opener = rng.choice(persona.openers).format(t=topic, a=address)
    opener = opener[0].upper() + opener[1:]
    return f"{opener} {body} {rng.choice(persona.closers).format(a=address)}"


def marker_pattern(persona: Persona) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(re.escape(m) for m in persona.markers) + r")\b", re.IGNORECASE)


def build(base_reply: Callable[[list[str]], list[str]], seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """{persona: {"train": records, "heldout": records}}; `base_reply` answers a list of questions greedily."""
    train_qs = questions(TRAIN_TOPICS, TRAIN_QUESTIONS)
    contents = [core_answer(reply) for reply in base_reply([q for q, _, _ in train_qs])]
    heldout_qs = questions(HELDOUT_TOPICS, HELDOUT_QUESTIONS)
    random.Random(seed).shuffle(heldout_qs)  # so the first few (`evaluate --limit`) span several topics
    out = {}
    for name, persona in PERSONAS.items():
        rng = random.Random(f"{seed}-{name}")
        train = [chat(q, rewrite(persona, content, topic, rng), keyword=kw)
                 for (q, topic, kw), content in zip(train_qs, contents) if content]
        heldout = [chat(q, "", keyword=kw) for q, _, kw in heldout_qs]
        out[name] = {"train": train, "heldout": heldout}
    return out
