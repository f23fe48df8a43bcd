"""Writes rto/tasks/ifeval_prompts.jsonl, the prompts of the embedded instruction-following task.

    python -m rto.tasks.make_ifeval_prompts            # rewrites the file (same bytes for the same SEED)
    python -m rto.tasks.make_ifeval_prompts --out F    # writes elsewhere

Each prompt is a short everyday request about one topic (a one-line reminder, a two-sentence note, a photo
caption, a tip...) followed by two constraints of different kinds that the IFEval checkers verify offline. Each
row is in IFEval's layout: ``instruction_id_list`` and ``kwargs`` (one dict per instruction, with the argument
names of the checker's ``build_description``), plus ``topic``, ``request`` and ``split``. Train and eval topics
are disjoint: every train topic appears with every request in train, every eval topic with every request in eval.

The task is sized for SmolLM2-135M-Instruct sampled at temperature 1 with answers of at most ANSWER_TOKENS
(48) tokens; ``python -m benchmarks.ifeval_baseline`` measures it. The kinds and argument ranges kept are those
that model follows sometimes but not always, so that 4 samples of a prompt rarely all score the same. Requests
ask for short answers, so most answers end within the budget and a postscript can be reached. Left out because
the model (almost) never follows them at this size: all lowercase, all capitals, JSON, quotes, an end phrase,
paragraph and bullet counts; left out because they need NLTK's punkt data: sentence and capital-word counts; the
language checker and the prompt-dependent kinds are left out too.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20261201
OUT = Path(__file__).with_name("ifeval_prompts.jsonl")
ANSWER_TOKENS = 48  # the answer budget (max_new_tokens) the kinds and arguments below are sized for

# (topic, its main noun: the word to forbid or to repeat). 100 train topics, 15 eval topics.
TRAIN_TOPICS = [
    ("the community garden", "garden"), ("homemade bread", "bread"), ("a new coffee maker", "coffee"),
    ("recycling day", "recycling"), ("a lost cat", "cat"), ("the school bake sale", "sale"),
    ("a leaking kitchen tap", "tap"), ("winter boots", "boots"), ("the local library", "library"),
    ("a street party", "party"), ("fresh strawberries", "strawberries"), ("a noisy dog", "dog"),
    ("the morning bus", "bus"), ("a borrowed ladder", "ladder"), ("tomato soup", "soup"),
    ("a broken fence", "fence"), ("the swimming pool", "pool"), ("a birthday cake", "cake"),
    ("spring cleaning", "cleaning"), ("a parking space", "parking"), ("the weekly market", "market"),
    ("a power cut", "power"), ("houseplants", "plants"), ("a rainy weekend", "rain"),
    ("a new bicycle", "bicycle"), ("the recycling bins", "bins"), ("banana pancakes", "pancakes"),
    ("a yard sale", "yard"), ("the village fair", "fair"), ("a slow laptop", "laptop"),
    ("a picnic in the park", "picnic"), ("apple pie", "pie"), ("a missing parcel", "parcel"),
    ("the gym", "gym"), ("roasted vegetables", "vegetables"), ("a snowy morning", "snow"),
    ("the book club", "book"), ("a quiet hour", "quiet"), ("a running shoe", "shoe"),
    ("an old sofa", "sofa"), ("a dinner party", "dinner"), ("a flat tyre", "tyre"),
    ("the neighbourhood watch", "watch"), ("a new kettle", "kettle"), ("lemon cookies", "cookies"),
    ("a first aid kit", "kit"), ("the farmers' market", "farmers"), ("a summer barbecue", "barbecue"),
    ("a school trip", "trip"), ("a tidy desk", "desk"), ("a window box of herbs", "herbs"),
    ("a lunch box", "lunch"), ("a walking trail", "trail"), ("the town hall meeting", "meeting"),
    ("a camping stove", "stove"), ("a jigsaw puzzle", "puzzle"), ("a rice cooker", "rice"),
    ("a charity run", "charity"), ("a knitted scarf", "scarf"), ("the bike lane", "lane"),
    ("a film night", "film"), ("a reusable water bottle", "bottle"), ("a compost heap", "compost"),
    ("the dentist appointment", "dentist"), ("a vegetable stew", "stew"), ("the car wash", "car"),
    ("a board game evening", "game"), ("a sunflower patch", "sunflower"), ("a pet hamster", "hamster"),
    ("a frozen pipe", "pipe"), ("a hiking backpack", "backpack"), ("the tennis club", "tennis"),
    ("fresh lemonade", "lemonade"), ("a wooden bookshelf", "bookshelf"), ("a music lesson", "music"),
    ("a shared fridge", "fridge"), ("a birdhouse", "birdhouse"), ("a pottery class", "pottery"),
    ("a train delay", "train"), ("a lost key", "key"), ("a homemade pizza", "pizza"),
    ("a desk lamp", "lamp"), ("a street cleanup", "cleanup"), ("the corner bakery", "bakery"),
    ("a spare room", "room"), ("a phone charger", "charger"), ("a garden hose", "hose"),
    ("a baby shower", "shower"), ("a mountain cabin", "cabin"), ("the laundry room", "laundry"),
    ("an umbrella", "umbrella"), ("oatmeal for breakfast", "oatmeal"), ("a new mattress", "mattress"),
    ("the playground", "playground"), ("a cat sitter", "sitter"), ("a quiz night", "quiz"),
    ("a vintage radio", "radio"), ("a family photo album", "photo"), ("the snow shovel", "shovel"),
    ("a chess set", "chess"),
]
EVAL_TOPICS = [
    ("a kite festival", "kite"), ("the ice cream van", "van"), ("a sewing machine", "sewing"),
    ("a beach cleanup", "beach"), ("a pumpkin carving contest", "pumpkin"), ("the fish tank", "fish"),
    ("a paper lantern", "lantern"), ("a toolbox", "toolbox"), ("a carrot cake", "carrot"),
    ("the rooftop terrace", "terrace"), ("a bird feeder", "feeder"), ("a roller skating rink", "skating"),
    ("a thermos flask", "thermos"), ("the old lighthouse", "lighthouse"), ("a honey jar", "honey"),
]

REQUESTS = {
    "reminder": "Write a one-line reminder for a friend about {topic}.",
    "note": "Write a two-sentence note to your neighbour about {topic}.",
    "caption": "Write a short caption for a photo of {topic}.",
    "sentence": "Write one sentence about {topic}.",
    "message": "Write a one-line text message to a coworker about {topic}.",
    "tip": "Give one quick tip about {topic}.",
    "thanks": "Write a two-sentence thank-you message that mentions {topic}.",
    "post": "Write a two-sentence post for the local community board about {topic}.",
    "description": "Describe {topic} in one or two sentences.",
    "flyer": "Write a two-line blurb for a flyer about {topic}.",
}

KEYWORDS = ["today", "weekend", "together", "please", "morning", "simple", "friendly", "quick", "careful",
            "favourite", "tomorrow", "thanks", "welcome", "easy", "soon", "happy", "kind", "early", "fun", "home"]

NO_COMMA = "punctuation:no_comma"
WORDS = "length_constraints:number_words"
KEYWORD = "keywords:existence"
FORBIDDEN = "keywords:forbidden_words"
FREQUENCY = "keywords:frequency"
TITLE = "detectable_format:title"
HIGHLIGHTS = "detectable_format:number_highlighted_sections"
POSTSCRIPT = "detectable_content:postscript"
PLACEHOLDERS = "detectable_content:number_placeholders"

KINDS = [NO_COMMA, WORDS, KEYWORD, FORBIDDEN, FREQUENCY, TITLE, HIGHLIGHTS, POSTSCRIPT, PLACEHOLDERS]

# the forbidden word and the word to repeat are both the topic's noun: never in the same prompt
CONFLICTS = {(FORBIDDEN, FREQUENCY), (FREQUENCY, FORBIDDEN)}


def _quoted(words: list[str]) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def constraint(kind: str, rng: random.Random, noun: str, used: set[str]) -> tuple[str, dict]:
    """One constraint of `kind`: (its text in the prompt, its checker kwargs). `noun` is the topic's main noun;
    `used` holds the words other constraints of the same prompt already require or forbid."""
    pick = rng.choice
    if kind == NO_COMMA:
        return pick(["Do not use any commas.", "Your answer must not contain a single comma.",
                     "Avoid commas entirely in your reply."]), {}
    if kind == WORDS:
        if rng.random() < 0.5:
            n = pick([15, 20, 25])
            return pick([f"Use fewer than {n} words.", f"Keep it under {n} words.",
                         f"Answer in less than {n} words."]), {"num_words": n, "relation": "less than"}
        n = pick([25, 30, 35])
        return pick([f"Use at least {n} words.", f"Write no fewer than {n} words."]), \
            {"num_words": n, "relation": "at least"}
    if kind == KEYWORD:
        words = rng.sample([w for w in KEYWORDS if w not in used], pick([1, 1, 1, 2]))
        used.update(words)
        text = (f"Include the word {_quoted(words)} in your answer." if len(words) == 1 else
                pick([f"Make sure the words {_quoted(words)} both appear.",
                      f"Your reply must include the keywords {_quoted(words)}."]))
        return text, {"keywords": words}
    if kind == FORBIDDEN:
        used.add(noun)
        return pick([f'Do not use the word "{noun}".', f'Never write the word "{noun}".']), \
            {"forbidden_words": [noun]}
    if kind == FREQUENCY:  # twice: 3 times was met by 1 answer in 40 in a first measurement at 48 tokens
        used.add(noun)
        return pick([f'Use the word "{noun}" at least 2 times.',
                     f'The word "{noun}" should appear at least 2 times.']), \
            {"keyword": noun, "frequency": 2, "relation": "at least"}
    if kind == TITLE:
        return pick(["Give your answer a title wrapped in double angular brackets, such as <<my title>>.",
                     "Start with a title in double angular brackets, like <<a title>>."]), {}
    if kind == HIGHLIGHTS:  # one part: two were met by 1 answer in 11 in a first measurement at 48 tokens
        return pick(["Highlight at least one part of your answer with markdown, i.e. *highlighted part*.",
                     "Highlight at least one phrase of your reply with markdown, i.e. *highlighted phrase*."]), \
            {"num_highlights": 1}
    if kind == POSTSCRIPT:
        marker = pick(["P.S.", "P.P.S"])
        return f"At the end of your answer, add a postscript starting with {marker}", {"postscript_marker": marker}
    if kind == PLACEHOLDERS:
        n = pick([1, 2, 3])
        return (f"Include at least {n} placeholders in square brackets, such as [name]."
                if n > 1 else "Include a placeholder in square brackets, such as [name]."), {"num_placeholders": n}
    raise ValueError(f"make_ifeval_prompts: unknown instruction kind {kind!r}; use one of {', '.join(KINDS)}")


def make_rows(seed: int = SEED) -> list[dict]:
    """Every prompt row, train then eval: each topic with each request, and two constraints of different,
    non-conflicting kinds (the first kind uniform over KINDS, the second uniform over the rest)."""
    rng = random.Random(seed)
    rows = []
    for split, topics in (("train", TRAIN_TOPICS), ("eval", EVAL_TOPICS)):
        for topic, noun in topics:
            for request, template in REQUESTS.items():
                first = rng.choice(KINDS)
                kinds = [first, rng.choice([k for k in KINDS if k != first and (first, k) not in CONFLICTS])]
                used: set[str] = set()
                texts, kwargs = [], []
                for kind in kinds:
                    text, args = constraint(kind, rng, noun, used)
                    texts.append(text)
                    kwargs.append(args)
                rows.append({"prompt": " ".join([template.format(topic=topic), *texts]), "topic": topic,
                             "request": request, "split": split, "instruction_id_list": kinds, "kwargs": kwargs})
    return rows


def write(path: Path = OUT, seed: int = SEED) -> Path:
    lines = [json.dumps(row, ensure_ascii=False) for row in make_rows(seed)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write the prompts of the embedded instruction-following task")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    print(f"wrote {write(args.out, args.seed)}")


if __name__ == "__main__":
    main()
