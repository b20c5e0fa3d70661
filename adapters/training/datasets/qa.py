"""Extractive QA data: a short context about a person and a company, a question whose answer is a span.

The main entity gets four facts, a distractor entity of the other kind gets two, so the answer must be
picked from the right sentence. Held-out contexts use names, towns, jobs, pets, hobbies, companies and
products never seen in training, and half of the held-out questions are phrased in ways training never uses.
"""

from __future__ import annotations

import random

from adapters.training.datasets import chat

PROMPT = "Answer with a short phrase from the context.\n\nContext: {context}\n\nQuestion: {question}"

SPLITS = {
    "train": dict(
        people=(("Maria", "Lopez", "she"), ("Tom", "Becker", "he"), ("Aisha", "Khan", "she"), ("Lucas", "Silva", "he"),
                ("Emma", "Novak", "she"), ("Daniel", "Kim", "he"), ("Sofia", "Moretti", "she"), ("Jonas", "Berg", "he"),
                ("Priya", "Shah", "she"), ("Mateo", "Cruz", "he"), ("Hannah", "Weiss", "she"), ("Leo", "Dubois", "he")),
        towns=("Porto", "Leeds", "Tampere", "Graz", "Lyon", "Malmo", "Cork", "Bergen", "Turin", "Ghent"),
        jobs=("nurse", "baker", "pilot", "teacher", "plumber", "lawyer", "chef", "farmer", "dentist", "librarian"),
        pets=(("dog", "Biscuit"), ("cat", "Pepper"), ("parrot", "Luna"), ("rabbit", "Max"), ("dog", "Coco"),
              ("cat", "Ziggy"), ("rabbit", "Olive"), ("dog", "Rocky")),
        hobbies=("painting", "chess", "fishing", "gardening", "cycling", "baking bread"),
        companies=("Brightway", "Nordlake Foods", "Pixelcraft", "Greenleaf Energy", "Bluepeak", "Solara Tools"),
        products=("bicycles", "kitchen knives", "solar panels", "video games", "herbal tea", "running shoes"),
    ),
    "heldout": dict(
        people=(("Nadia", "Petrova", "she"), ("Omar", "Haddad", "he"), ("Clara", "Jensen", "she"),
                ("Victor", "Lund", "he"), ("Grace", "Adeyemi", "she"), ("Hugo", "Martin", "he")),
        towns=("Aarhus", "Bilbao", "Krakow", "Dundee", "Utrecht", "Salzburg"),
        jobs=("architect", "firefighter", "journalist", "electrician", "tailor", "vet"),
        pets=(("hamster", "Waffles"), ("turtle", "Juno"), ("dog", "Pickles"), ("cat", "Bruno"), ("parrot", "Mango")),
        hobbies=("pottery", "rock climbing", "sailing", "knitting"),
        companies=("Ironwood Labs", "Maplestone", "Quickharbor", "Silverline Toys"),
        products=("wooden toys", "umbrellas", "guitars", "garden tools"),
    ),
}


def _person(split: dict, rng: random.Random) -> tuple[str, list[str], list[tuple[str, str, str]]]:
    """(intro sentence, other fact sentences, [(train question, held-out question, answer)])."""
    first, last, he = rng.choice(split["people"])
    full, his, He = f"{first} {last}", {"she": "her", "he": "his"}[he], he.capitalize()
    town, job, (kind, pet), hobby = (rng.choice(split["towns"]), rng.choice(split["jobs"]),
                                     rng.choice(split["pets"]), rng.choice(split["hobbies"]))
    year = str(rng.randint(1950, 2004))
    facts = [f"{He} works as {'an' if job[0] in 'aeiou' else 'a'} {job}.", f"{He} has a {kind} named {pet}.", f"{He} was born in {year}.",
             f"In {his} free time, {he} enjoys {hobby}."]
    questions = [(f"Where does {full} live?", f"In which city does {full} live?", town),
                 (f"What is {full}'s job?", f"What does {full} do for a living?", job),
                 (f"What is the name of {full}'s {kind}?", f"What is {full}'s {kind} called?", pet),
                 (f"In what year was {full} born?", f"When was {full} born?", year),
                 (f"What does {full} enjoy in {his} free time?", f"What is {full}'s hobby?", hobby)]
    return f"{full} lives in {town}.", facts, questions


def _company(split: dict, rng: random.Random) -> tuple[str, list[str], list[tuple[str, str, str]]]:
    name, product, town = rng.choice(split["companies"]), rng.choice(split["products"]), rng.choice(split["towns"])
    first, last, _ = rng.choice(split["people"])
    founder, year, staff = f"{first} {last}", str(rng.randint(1900, 2015)), str(rng.randint(12, 950))
    facts = [f"Its headquarters are in {town}.", f"The company makes {product}.", f"It employs {staff} people."]
    questions = [(f"Who founded {name}?", f"Who started {name}?", founder),
                 (f"Where are {name}'s headquarters?", f"In which city is {name} based?", town),
                 (f"What does {name} make?", f"What products does {name} sell?", product),
                 (f"How many people work at {name}?", f"How many employees does {name} have?", staff)]
    return f"{name} was founded in {year} by {founder}.", facts, questions


def example(split: dict, rng: random.Random, new_phrasing: bool) -> tuple[str, str]:
    """(prompt, answer)."""
    kinds = [_person, _company]
    rng.shuffle(kinds)
    main_intro, main_facts, main_qs = kinds[0](split, rng)
    other_intro, other_facts, other_qs = kinds[1](split, rng)
    rng.shuffle(main_facts)
    blocks = [[main_intro, *main_facts], [other_intro, rng.choice(other_facts)]]
    rng.shuffle(blocks)
    # The distractor shows only its intro and one more fact; its first question is answered by the intro.
    train_q, heldout_q, answer = rng.choice(main_qs) if rng.random() < 0.8 else other_qs[0]
    question = heldout_q if new_phrasing else train_q
    return PROMPT.format(context=" ".join(s for block in blocks for s in block), question=question), answer


def build(n_train: int = 300, n_heldout: int = 50, seed: int = 0) -> dict[str, list[dict]]:
    out = {}
    for name, n in (("train", n_train), ("heldout", n_heldout)):
        rng = random.Random(f"{seed}-qa-{name}")
        out[name] = []
        for i in range(n):
            new_phrasing = name == "heldout" and i % 2 == 1
            extra = {"new_phrasing": new_phrasing} if name == "heldout" else {}
            out[name].append(chat(*example(SPLITS[name], rng, new_phrasing), **extra))
    return out
