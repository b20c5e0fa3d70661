"""Summarization data: short synthetic local-news stories with a one-sentence reference summary.

A story is a lead sentence (who, what, where, when) in one of several shapes, one key detail (a cost, a
crowd, a start date), a quote and filler, shuffled after the lead. The reference keeps the lead's facts and
the key detail and drops the rest. Held-out stories use events, towns, people, fillers and a lead shape
never seen in training.
"""

from __future__ import annotations

import random

from adapters.training.datasets import chat

PROMPT = "Summarize in one sentence:\n\n{story}"
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "March", "April", "May", "June", "September", "October", "November")

SPLITS = {
    "train": dict(
        events=[
            ("the city council", "approved a new bike lane plan"),
            ("the city council", "voted to build a public swimming pool"),
            ("the city council", "agreed to plant 500 trees along the river"),
            ("the school board", "approved free lunches for all pupils"),
            ("the school board", "voted to start classes an hour later"),
            ("the regional hospital", "opened a new children's ward"),
            ("the football club", "signed a new head coach"),
            ("a local tech company", "announced 200 new jobs"),
            ("the history museum", "opened an exhibition of ancient maps"),
            ("the police department", "launched a road safety campaign"),
            ("the public library", "extended its opening hours"),
            ("the bus company", "added a night service to the airport"),
            ("the farmers' market", "moved to the main square"),
            ("the fire brigade", "bought two new fire engines"),
            ("the zoo", "welcomed a baby giraffe"),
        ],
        towns=("Riverton", "Lakeside", "Millbrook", "Ashford", "Greenvale", "Stonebridge", "Fairhaven", "Oakridge",
               "Brookfield", "Westport", "Redcliff", "Pinehurst", "Clearwater", "Northwood"),
        leads=("On {day}, {org} in {town} {action}.", "{Org} in {town} {action} on {day}.",
               "{town} residents learned on {day} that {org} had {action}."),
        people=("Anna Berg", "Tom Reyes", "Lisa Chen", "Omar Haddad", "Sara Novak", "Ben Okafor", "Maria Rossi"),
        roles=("a spokesperson", "a local resident", "the mayor"),
        quotes=("This is a big day for our town", "We have waited a long time for this",
                "People asked for it and we listened"),
        fillers=("The idea was first discussed last year.", "Not everyone agreed with the decision.",
                 "Several groups had campaigned for the change.", "Critics said the timing was poor.",
                 "Supporters called it a long-awaited step.", "Local papers followed the story closely."),
    ),
    "heldout": dict(
        events=[
            ("the city council", "approved solar lamps for every street"),
            ("the school board", "voted to build a new science lab"),
            ("the port authority", "opened a second ferry terminal"),
            ("the university", "launched a free evening course for adults"),
            ("the theatre company", "announced a summer festival"),
            ("the water company", "began replacing old pipes"),
            ("a local bakery", "won a national bread award"),
            ("the cycling club", "organised a charity ride"),
        ],
        towns=("Kingsbury", "Elmstead", "Silverton", "Harborview", "Rosedale", "Whitmore", "Foxley", "Dunmore"),
        leads=("On {day}, {org} in {town} {action}.", "In news from {town}, {org} {action} on {day}."),
        people=("Nina Park", "Victor Lund", "Grace Adeyemi", "Paul Weber"),
        roles=("a council member", "a shop owner"),
        quotes=("It will make a real difference", "We are very proud of this"),
        fillers=("Some residents raised concerns.", "The news surprised many observers.",
                 "Similar plans exist in nearby towns."),
    ),
}


def _detail(rng: random.Random) -> tuple[str, str]:
    """(sentence in the story, clause in the summary)."""
    kind = rng.choice(("cost", "crowd", "start"))
    if kind == "cost":
        money = f"{rng.randint(2, 9)} million dollars"
        return f"The project will cost {money}.", f"at a cost of {money}"
    if kind == "crowd":
        n = rng.randint(2, 9) * 100
        return f"About {n} people attended.", f"in front of about {n} people"
    month = rng.choice(MONTHS)
    return f"The change takes effect in {month}.", f"starting in {month}"


def story(split: dict, rng: random.Random) -> tuple[str, str]:
    org, action = rng.choice(split["events"])
    town, day = rng.choice(split["towns"]), rng.choice(DAYS)
    lead = rng.choice(split["leads"]).format(org=org, Org=org[0].upper() + org[1:], town=town, day=day,
                                             action=action)
    detail, clause = _detail(rng)
    quote = f'"{rng.choice(split["quotes"])}," said {rng.choice(split["people"])}, {rng.choice(split["roles"])}.'
    rest = [detail, quote, rng.choice(split["fillers"])]
    rng.shuffle(rest)
    summary = f"{org[0].upper() + org[1:]} in {town} {action} on {day}, {clause}."
    return " ".join([lead, *rest]), summary


def build(n_train: int = 300, n_heldout: int = 50, seed: int = 0) -> dict[str, list[dict]]:
    out = {}
    for name, n in (("train", n_train), ("heldout", n_heldout)):
        rng = random.Random(f"{seed}-summaries-{name}")
        out[name] = [chat(PROMPT.format(story=text), summary) for text, summary in
                     (story(SPLITS[name], rng) for _ in range(n))]
    return out
