"""Regenerate the bundled task dataset (drlora_mlx/data/tasks/*.jsonl).

Five small text tasks in mlx-lm's completions format, so that a tiny MoE has
something to route: addition, reversal, upper-casing, letter sorting and vowel
counting. Deterministic: the same files every time.

    python scripts/make_bundled_data.py
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "drlora_mlx" / "data" / "tasks"
SPLITS = {"train": 1200, "valid": 150, "test": 150}
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "da", "go", "fi", "ba", "zu", "ho", "we"]


def word(rng):
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))


def example(rng):
    task = rng.randrange(5)
    if task == 0:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"Add {a} and {b}.", str(a + b)
    if task == 1:
        w = word(rng)
        return f"Reverse: {w}", w[::-1]
    if task == 2:
        w = f"{word(rng)} {word(rng)}"
        return f"Uppercase: {w}", w.upper()
    if task == 3:
        w = "".join(rng.sample("abcdefghij", rng.randint(3, 6)))
        return f"Sort the letters: {w}", "".join(sorted(w))
    w = word(rng)
    return f"Count the vowels in: {w}", str(sum(c in "aeiou" for c in w))


def main():
    rng = random.Random(0)
    OUT.mkdir(parents=True, exist_ok=True)
    for split, n in SPLITS.items():
        with open(OUT / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                prompt, completion = example(rng)
                f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


if __name__ == "__main__":
    main()
