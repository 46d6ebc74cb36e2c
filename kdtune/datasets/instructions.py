"""Everyday instructions written by this project, for real-model tests and the real-weights demo: short
questions and tasks of a dozen kinds (facts, words, arithmetic, lists, rewriting), with no answers —
a teacher writes those (the generate recipe), so no dataset has to be downloaded.

Prompts are deterministic in their arguments, and the ``train`` and ``test`` splits never share
one: a prompt is held out when a hash of it and the seed falls in one bucket of five.
"""

import json
import random
import zlib
from pathlib import Path

from kdtune.errors import KDTuneError

COUNTRIES = ("France", "Japan", "Brazil", "Canada", "Egypt", "India", "Italy", "Kenya", "Mexico", "Norway", "Peru",
             "Spain", "Chile", "Germany", "Greece", "Ireland", "Portugal", "Sweden", "Thailand", "Vietnam")
WORDS = ("happy", "quick", "bright", "calm", "brave", "small", "ancient", "cold", "gentle", "loud", "rich",
         "simple", "strong", "tired", "wise", "empty", "honest", "curious", "silent", "huge")
TOPICS = ("the ocean", "autumn", "coffee", "bicycles", "libraries", "the moon", "gardening", "trains", "music",
          "mountains", "rain", "chess", "bread", "volcanoes", "bees", "winter", "friendship", "maps", "clocks", "tea")
CATEGORIES = ("fruits", "colors", "planets", "musical instruments", "farm animals", "vegetables", "sports",
              "kitchen tools", "birds", "programming languages", "flowers", "metals", "board games", "rivers")
THINGS = ("battery", "compass", "thermometer", "telescope", "microwave", "printer", "bridge", "volcano", "magnet",
          "rainbow", "glacier", "satellite", "vaccine", "password", "calendar", "lighthouse")
SENTENCES = ("the cat sat on the mat", "we went to the market on sunday", "she reads a book every week",
             "the train leaves at noon", "he plays the guitar well", "they planted trees in the park",
             "it rained all day yesterday", "the soup is too hot")

TEMPLATES = (
    lambda r: f"What is the capital of {r.choice(COUNTRIES)}?",
    lambda r: f"Give me a synonym for the word '{r.choice(WORDS)}'.",
    lambda r: f"What is the opposite of '{r.choice(WORDS)}'?",
    lambda r: f"Write one sentence about {r.choice(TOPICS)}.",
    lambda r: f"What is {r.randrange(2, 60)} plus {r.randrange(2, 60)}?",
    lambda r: f"What is {r.randrange(2, 12)} times {r.randrange(2, 12)}?",
    lambda r: f"Name three {r.choice(CATEGORIES)}.",
    lambda r: f"Explain in one sentence what a {r.choice(THINGS)} is.",
    lambda r: f"Is {r.randrange(1, 200)} an even or an odd number?",
    lambda r: f"Rewrite this sentence in the past tense: '{r.choice(SENTENCES)}'.",
    lambda r: f"Translate '{r.choice(SENTENCES)}' into French.",
    lambda r: f"Give a title for a short story about {r.choice(TOPICS)}.",
)


def instruction_prompts(num_prompts: int, *, split: str = "train", seed: int = 0) -> list[str]:
    """``num_prompts`` distinct prompts of the split."""
    if split not in ("train", "test"):
        raise KDTuneError(f"split: expected 'train' or 'test', got {split!r}")
    rng = random.Random(f"instructions:{seed}:{split}")
    prompts, seen, tries = [], set(), 0
    while len(prompts) < num_prompts:
        tries += 1
        if tries > 100 * num_prompts + 1000:
            raise KDTuneError(f"instruction_prompts: fewer than {num_prompts} distinct {split} prompts exist")
        prompt = rng.choice(TEMPLATES)(rng)
        if prompt in seen or (zlib.crc32(f"{seed}:{prompt}".encode()) % 5 == 0) != (split == "test"):
            continue
        seen.add(prompt)
        prompts.append(prompt)
    return prompts


def write_instruction_jsonl(path, num_prompts: int, **kwargs) -> Path:
    """Write `instruction_prompts` as chat rows (``{"messages": [user turn]}``), the generate recipe's
    ``messages_file``: it writes them back with the model's answers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [{"role": "user", "content": p}]} for p in instruction_prompts(num_prompts, **kwargs)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path
