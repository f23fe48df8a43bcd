"""Writes rto/tasks/ifeval_prompts.jsonl, the prompts of the embedded instruction-following task.

    python -m rto.tasks.make_ifeval_prompts            # rewrites the file (same bytes for the same SEED)
    python -m rto.tasks.make_ifeval_prompts --out F    # writes elsewhere

Each prompt is an everyday request about one topic (a note to a neighbour, a reminder, a tip, a flyer...)
followed by one or two constraints that the IFEval checkers verify offline. Each row is in IFEval's layout:
``instruction_id_list`` and ``kwargs`` (one dict per instruction, with the argument names of the checker's
``build_description``), plus ``topic``, ``request`` and ``split``. Train and eval topics are disjoint: every
train topic appears with every request in train, every eval topic with every request in eval. Kinds that need
NLTK's punkt data (sentence counts, capital-word counts) are left out, and so are the language checker and the
prompt-dependent ones.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20261201
OUT = Path(__file__).with_name("ifeval_prompts.jsonl")

# (topic, its main noun: a candidate forbidden word). 100 train topics, 15 eval topics.
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
    "note": "Write a short note to your neighbour about {topic}.",
    "reminder": "Write a reminder for a friend about {topic}.",
    "description": "Describe {topic} in a few lines.",
    "tip": "Give one practical tip about {topic}.",
    "post": "Write a short post for the local community board about {topic}.",
    "message": "Write a text message to a coworker about {topic}.",
    "flyer": "Write a short blurb for a flyer about {topic}.",
    "explain": "Explain {topic} to a ten-year-old.",
    "email": "Write a brief email to your aunt about {topic}.",
    "thanks": "Write a thank-you message that mentions {topic}.",
}

KEYWORDS = ["today", "weekend", "together", "please", "morning", "simple", "friendly", "quick", "careful",
            "favourite", "tomorrow", "thanks", "welcome", "easy", "soon", "happy", "kind", "early", "fun", "home"]
PLAIN_WORDS = ["very", "really", "great", "nice", "good", "just", "thing", "amazing", "lovely", "perfect"]
END_PHRASES = ["See you soon!", "Thanks for reading.", "Have a great day!", "Let me know what you think.",
               "That is all for now.", "Any other questions?", "Talk soon.", "Take care."]

NO_COMMA = "punctuation:no_comma"
LOWER = "change_case:english_lowercase"
UPPER = "change_case:english_capital"
WORDS = "length_constraints:number_words"
PARAGRAPHS = "length_constraints:number_paragraphs"
KEYWORD = "keywords:existence"
FORBIDDEN = "keywords:forbidden_words"
FREQUENCY = "keywords:frequency"
END = "startend:end_checker"
QUOTES = "startend:quotation"
TITLE = "detectable_format:title"
BULLETS = "detectable_format:number_bullet_lists"
JSON = "detectable_format:json_format"
HIGHLIGHTS = "detectable_format:number_highlighted_sections"
POSTSCRIPT = "detectable_content:postscript"
PLACEHOLDERS = "detectable_content:number_placeholders"

KINDS = [NO_COMMA, LOWER, UPPER, WORDS, PARAGRAPHS, KEYWORD, FORBIDDEN, FREQUENCY, END, QUOTES, TITLE, BULLETS,
         JSON, HIGHLIGHTS, POSTSCRIPT, PLACEHOLDERS]

# pairs that contradict each other or that one checker's markup would break for the other
_CONFLICTS = [
    (LOWER, UPPER), (LOWER, POSTSCRIPT), (LOWER, END), (END, POSTSCRIPT), (QUOTES, BULLETS), (UPPER, PLACEHOLDERS),
    (BULLETS, HIGHLIGHTS), (BULLETS, PARAGRAPHS), (HIGHLIGHTS, PARAGRAPHS), (KEYWORD, FREQUENCY),
]
CONFLICTS = {(a, b) for a, b in _CONFLICTS} | {(b, a) for a, b in _CONFLICTS}
# JSON goes only with the kinds that read words, not layout
CONFLICTS |= {(JSON, k) for k in KINDS if k not in (KEYWORD, FORBIDDEN, FREQUENCY, WORDS)}
CONFLICTS |= {(k, JSON) for k in KINDS if k not in (KEYWORD, FORBIDDEN, FREQUENCY, WORDS)}


def _quoted(words: list[str]) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def constraint(kind: str, rng: random.Random, noun: str, used: set[str]) -> tuple[str, dict]:
    """One constraint of `kind`: (its text in the prompt, its checker kwargs). `used` holds the words other
    constraints of the same prompt already require or forbid."""
    pick = rng.choice
    if kind == NO_COMMA:
        return pick(["Do not use any commas.", "Your answer must not contain a single comma.",
                     "Avoid commas entirely in your reply."]), {}
    if kind == LOWER:
        return pick(["Write your entire answer in lowercase letters; no capital letters at all.",
                     "Use only lowercase letters in your whole reply.",
                     "Your whole response must be in English and in lowercase, with no capital letters."]), {}
    if kind == UPPER:
        return pick(["Write your entire answer in capital letters.",
                     "Your whole reply must be in English and in all capital letters.",
                     "Use only uppercase letters in your response."]), {}
    if kind == WORDS:
        if rng.random() < 0.7:
            n = pick([15, 20, 25, 30, 40, 50, 60])
            return pick([f"Use fewer than {n} words.", f"Keep it under {n} words.",
                         f"Answer in less than {n} words."]), {"num_words": n, "relation": "less than"}
        n = pick([5, 10, 15, 20, 25])
        return pick([f"Use at least {n} words.", f"Write no fewer than {n} words."]), \
            {"num_words": n, "relation": "at least"}
    if kind == PARAGRAPHS:
        n = pick([2, 3])
        return (f"Write exactly {n} paragraphs, separated from each other by the markdown divider ***.",
                {"num_paragraphs": n})
    if kind == KEYWORD:
        words = rng.sample([w for w in KEYWORDS if w not in used], pick([1, 1, 2]))
        used.update(words)
        text = (f"Include the word {_quoted(words)} in your answer." if len(words) == 1 else
                pick([f"Make sure the words {_quoted(words)} both appear.",
                      f"Your reply must include the keywords {_quoted(words)}."]))
        return text, {"keywords": words}
    if kind == FORBIDDEN:
        pool = [noun] if noun not in used and rng.random() < 0.5 else [w for w in PLAIN_WORDS if w not in used]
        words = rng.sample(pool, min(len(pool), pick([1, 1, 2])))
        used.update(words)
        text = pick([f"Do not use the word {_quoted(words)}.", f"Never write the word {_quoted(words)}."]) \
            if len(words) == 1 else f"Do not use the words {_quoted(words)}."
        return text, {"forbidden_words": words}
    if kind == FREQUENCY:
        word, n = pick([w for w in KEYWORDS if w not in used]), pick([2, 3])
        used.add(word)
        return pick([f'Use the word "{word}" at least {n} times.',
                     f'The word "{word}" should appear at least {n} times.']), \
            {"keyword": word, "frequency": n, "relation": "at least"}
    if kind == END:
        phrase = pick(END_PHRASES)
        return pick([f'End your answer with the exact phrase "{phrase}" and nothing after it.',
                     f'Finish your reply with "{phrase}"; no other words should follow.']), {"end_phrase": phrase}
    if kind == QUOTES:
        return pick(["Wrap your entire answer in double quotation marks.",
                     "Put your whole reply inside double quotes."]), {}
    if kind == TITLE:
        return pick(["Give your answer a title wrapped in double angular brackets, such as <<my title>>.",
                     "Start with a title in double angular brackets, like <<a title>>."]), {}
    if kind == BULLETS:
        n = pick([2, 3, 4, 5])
        return (f"Answer with exactly {n} bullet points, using markdown bullets such as:\n* first point\n"
                f"* second point"), {"num_bullets": n}
    if kind == JSON:
        return pick(["Format your entire answer as JSON.", "Wrap your whole reply in JSON format.",
                     "Your entire output must be valid JSON."]), {}
    if kind == HIGHLIGHTS:
        n = pick([1, 2, 3])
        return (f"Highlight at least {n} part{'s' if n > 1 else ''} of your answer with markdown, "
                f"i.e. *highlighted part*."), {"num_highlights": n}
    if kind == POSTSCRIPT:
        marker = pick(["P.S.", "P.P.S"])
        return f"At the end of your answer, add a postscript starting with {marker}", {"postscript_marker": marker}
    if kind == PLACEHOLDERS:
        n = pick([1, 2, 3])
        return (f"Include at least {n} placeholder{'s' if n > 1 else ''} in square brackets, such as [name]."
                if n > 1 else "Include a placeholder in square brackets, such as [name]."), {"num_placeholders": n}
    raise ValueError(f"make_ifeval_prompts: unknown instruction kind {kind!r}; use one of {', '.join(KINDS)}")


def make_rows(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for split, topics in (("train", TRAIN_TOPICS), ("eval", EVAL_TOPICS)):
        for topic, noun in topics:
            for request, template in REQUESTS.items():
                first = rng.choice(KINDS)
                kinds = [first]
                if rng.random() < 0.5:
                    kinds.append(rng.choice([k for k in KINDS if k != first and (first, k) not in CONFLICTS]))
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
