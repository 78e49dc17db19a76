"""The user requests of `task=chat`: templates × subjects, every one asking for something warm.

Each family pairs request templates with subjects; a subject is (phrase, keyword), the keyword
being the head word a response that stays on topic names ("a stainless steel water bottle" →
"bottle"). `all_requests()` is the full, deterministic list of (request text, keyword), 470
distinct requests; the task shuffles it by seed and holds some out for evaluation.
`subject_keyword(prompt)` finds a request inside a rendered prompt and returns its keyword.
"""

from __future__ import annotations

import re
from functools import lru_cache

PRODUCTS = [
    "a stainless steel water bottle",
    "a pair of hiking boots",
    "a cast iron frying pan",
    "a wool winter scarf",
    "a folding bicycle",
    "a pocket flashlight",
    "a ceramic teapot",
    "a canvas backpack",
    "a pair of noise-cancelling headphones",
    "a paperback cookbook",
    "a bamboo cutting board",
    "a rain jacket",
    "a desk lamp",
    "a family board game",
    "a set of colouring pencils",
    "a camping tent",
    "an electric kettle",
    "a yoga mat",
    "a leather wallet",
    "a handmade candle",
    "a potted houseplant",
    "a picnic blanket",
    "a travel mug",
    "a wooden chess set",
    "a pair of running shoes",
    "a kitchen scale",
    "a beach umbrella",
    "a sketchbook",
    "a bird feeder",
    "a digital alarm clock",
]
PLACES = [
    "a seaside town",
    "the city library",
    "a mountain cabin",
    "a botanical garden",
    "a farmers' market",
    "a science museum",
    "a quiet lake",
    "an old castle",
    "a bakery on Main Street",
    "a small bookshop",
    "a public swimming pool",
    "a zoo",
    "a sunflower farm",
    "a jazz club",
    "a ski resort",
    "a fishing village",
    "a night market",
    "a lighthouse",
    "a vineyard",
    "an art gallery",
    "a city park",
    "a hot spring",
    "a river island",
    "a music festival",
    "a planetarium",
    "a tea house",
    "a forest trail",
    "a county fair",
    "an aquarium",
    "a harbour",
]
WORKS = [
    "the film The Silent Harbor",
    "the novel A Garden in Winter",
    "the musical Paper Moons",
    "the documentary Rivers of Light",
    "the animated film The Little Lighthouse",
    "the album Morning Songs",
    "the play The Last Train Home",
    "the cookbook Sunday Suppers",
    "the podcast Small Wonders",
    "the board game Harbour Lights",
    "the novel The Clockmaker",
    "the film Summer at the Lake",
    "the comic book Starlight Kids",
    "the town hall concert",
    "the dance show Spring Steps",
    "the exhibition Colours of the Sea",
    "the film The Friendly Giant",
    "the audiobook Tales by the Fire",
    "the school magic show",
    "the puppet theatre's new show",
]
HELPERS = [
    "your neighbour",
    "your teacher",
    "your grandmother",
    "a colleague",
    "your best friend",
    "your coach",
    "your aunt",
    "a classmate",
    "the librarian",
    "your brother",
]
FAVOURS = [
    ("lending you a ladder", "ladder"),
    ("a birthday present", "present"),
    ("helping you move house", "mov"),
    ("a home-cooked dinner", "dinner"),
    ("watering your plants", "plants"),
    ("a book recommendation", "book"),
    ("fixing your bicycle", "bicycle"),
    ("a lift to the station", "lift"),
    ("looking after your dog", "dog"),
    ("a batch of cookies", "cookies"),
    ("helping with your homework", "homework"),
    ("a handwritten card", "card"),
    ("a kind word on a hard day", "kind"),
    ("teaching you to swim", "swim"),
    ("a bunch of flowers", "flowers"),
]
OCCASIONS = [
    ("starting a new job", "job"),
    ("moving to a new city", "city"),
    ("running their first marathon", "marathon"),
    ("taking an exam tomorrow", "exam"),
    ("learning to play the piano", "piano"),
    ("opening a small cafe", "cafe"),
    ("recovering from a cold", "cold"),
    ("starting university", "university"),
    ("adopting a puppy", "puppy"),
    ("giving a speech at a wedding", "speech"),
    ("planting a vegetable garden", "garden"),
    ("learning a new language", "language"),
    ("painting their kitchen", "kitchen"),
    ("joining a choir", "choir"),
    ("becoming a grandparent", "grandparent"),
    ("training for a bike race", "race"),
    ("retiring after forty years", "retir"),
    ("writing their first novel", "novel"),
    ("baking for a school fair", "fair"),
    ("travelling abroad for the first time", "travel"),
]

REVIEW = [
    "In one or two sentences, write an enthusiastic review of {s}.",
    "Write a short, glowing review of {s}.",
    "Tell a friend in two sentences why they will love {s}.",
    "Write a cheerful one-sentence recommendation of {s}.",
]
VISIT = [
    "Describe a wonderful day at {s} in one or two sentences.",
    "In two sentences, tell a friend why they should visit {s}.",
    "Write a happy postcard message from {s}, one or two sentences long.",
    "Describe your favourite moment at {s} in a short, warm paragraph.",
]
WORK = [
    "Write a short, positive review of {s}.",
    "In one or two sentences, say what you loved about {s}.",
]
THANKS = ["Write a one-sentence thank-you note to {h} for {f}."]
CHEER = [
    "Write a short, cheerful message to a friend who is {o}.",
    "In one or two sentences, encourage a friend who is {o}.",
]


def _keyword(phrase: str) -> str:
    """The head word of a subject phrase: its last word, lowercased ("the city library" → library)."""
    return phrase.split()[-1].lower().strip("'")


@lru_cache(maxsize=1)
def all_requests() -> tuple[tuple[str, str], ...]:
    """Every (request, keyword) of the task, in a fixed order, without duplicates."""
    out: dict[str, str] = {}
    for templates, subjects in ((REVIEW, PRODUCTS), (VISIT, PLACES), (WORK, WORKS)):
        for subject in subjects:
            keyword = _keyword(subject)
            for template in templates:
                out[template.format(s=subject)] = keyword
    for helper in HELPERS:
        for favour, keyword in FAVOURS:
            out[THANKS[0].format(h=helper, f=favour)] = keyword
    for occasion, keyword in OCCASIONS:
        for template in CHEER:
            out[template.format(o=occasion)] = keyword
    return tuple(out.items())


@lru_cache(maxsize=1)
def _keyword_pattern() -> tuple[re.Pattern, dict[str, str]]:
    keywords = dict(all_requests())
    alternatives = sorted(keywords, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, alternatives))), keywords


@lru_cache(maxsize=4096)
def subject_keyword(prompt: str) -> str | None:
    """The keyword of the task's request inside `prompt` (a rendered chat prompt), else None."""
    pattern, keywords = _keyword_pattern()
    found = pattern.search(prompt)
    return keywords[found.group(0)] if found else None
