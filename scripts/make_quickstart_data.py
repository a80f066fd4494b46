"""Write configs/data/quickstart.jsonl: a small conversational preference dataset with a real,
learnable preference.

Each row is {"prompt": [user message], "chosen": [assistant message], "rejected": [assistant message]}.
The prompts are simple factual questions (arithmetic, capitals, opposites, colours, animal sounds).
The chosen answer is correct and polite ("The answer is 12. Happy to help!"); the rejected answer is
wrong and rude, in capitals ("UGH. IT IS 13. FIGURE IT OUT YOURSELF."). A model learns to prefer the
first kind from a few dozen pairs, so the quickstart's reward accuracy climbs fast.

Deterministic: `python scripts/make_quickstart_data.py` always writes the same file.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
            "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna",
            "Poland": "Warsaw", "Cuba": "Havana", "Chile": "Santiago", "Sweden": "Stockholm"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark",
             "early": "late", "full": "empty", "high": "low", "open": "closed", "young": "old"}
COLOURS = {"the sky on a clear day": "blue", "fresh grass": "green", "snow": "white", "a ripe banana": "yellow",
           "coal": "black", "a ripe tomato": "red", "an orange": "orange"}
SOUNDS = {"a dog": "woof", "a cat": "meow", "a cow": "moo", "a duck": "quack", "a sheep": "baa"}
POLITE = ["Happy to help!", "I hope that helps.", "Let me know if you have more questions.", "Glad you asked!"]
RUDE = ["FIGURE IT OUT YOURSELF.", "WHY ARE YOU ASKING ME?", "STOP BOTHERING ME.", "EVERYONE KNOWS THAT."]


def questions(rng: random.Random):
    for _ in range(120):
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        yield f"What is {a} + {b}?", str(a + b), str(a + b + rng.choice([-3, -2, -1, 1, 2, 3]))
    for country, city in CAPITALS.items():
        wrong = rng.choice([c for c in CAPITALS.values() if c != city])
        yield f"What is the capital of {country}?", city, wrong
    for w, o in OPPOSITES.items():
        wrong = rng.choice([x for x in OPPOSITES.values() if x != o])
        yield f"What is the opposite of '{w}'?", o, wrong
    for thing, c in COLOURS.items():
        wrong = rng.choice([x for x in COLOURS.values() if x != c])
        yield f"What colour is {thing}?", c, wrong
    for animal, s in SOUNDS.items():
        wrong = rng.choice([x for x in SOUNDS.values() if x != s])
        yield f"What sound does {animal} make?", s, wrong
    for _ in range(100):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        yield f"What is {a} times {b}?", str(a * b), str(a * b + rng.choice([-2, -1, 1, 2]))


def main() -> None:
    rng = random.Random(1234)
    rows = []
    for q, right, wrong in questions(rng):
        rows.append({
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": f"The answer is {right}. {rng.choice(POLITE)}"}],
            "rejected": [{"role": "assistant", "content": f"UGH. IT IS {wrong.upper()}. {rng.choice(RUDE)}"}],
        })
    rng.shuffle(rows)
    out = Path(__file__).resolve().parent.parent / "configs" / "data" / "quickstart.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} pairs to {out}")


if __name__ == "__main__":
    main()
