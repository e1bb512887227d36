"""Write src/refusal_atlas/data/tasks/basics.jsonl: the offline multiple-choice task of the capability objective.

Every item is made here, from templates and short lists written for this project (no data set is copied):
arithmetic, number comparison, letter/day/month order, units and conversions, shapes, animal legs, opposites,
capitals and a few physical facts, and PIQA-style everyday physical questions. Each item has four choices, one
correct; the correct position is drawn by a seeded generator so every position is about equally often right.

Splits: within each kind, items are shuffled (seeded) and alternate validation / test, so both parts hold the same
mix. The search scores a seeded sample of the *validation* part per trial; the *test* part is for held-out
reporting only. Re-running this script with the same seed writes the same file byte for byte.

    python scripts/basics_task.py            # rewrites the package's basics.jsonl
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

SEED = 20261207
OUT = Path(__file__).resolve().parents[1] / "src" / "refusal_atlas" / "data" / "tasks" / "basics.jsonl"
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
            "the United Kingdom": "London", "Egypt": "Cairo", "Russia": "Moscow", "China": "Beijing",
            "Canada": "Ottawa", "Australia": "Canberra", "Greece": "Athens", "Portugal": "Lisbon",
            "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Austria": "Vienna",
            "Kenya": "Nairobi", "Argentina": "Buenos Aires", "Peru": "Lima", "Thailand": "Bangkok",
            "South Korea": "Seoul", "Cuba": "Havana", "Finland": "Helsinki", "Denmark": "Copenhagen",
            "Hungary": "Budapest", "the Netherlands": "Amsterdam", "Belgium": "Brussels", "Chile": "Santiago"}
UNITS = [("minutes", "an hour", 60), ("seconds", "a minute", 60), ("hours", "a day", 24), ("days", "a week", 7),
         ("months", "a year", 12), ("centimetres", "a metre", 100), ("millimetres", "a centimetre", 10),
         ("metres", "a kilometre", 1000), ("grams", "a kilogram", 1000), ("millilitres", "a litre", 1000),
         ("years", "a century", 100), ("years", "a decade", 10), ("days", "a leap year", 366),
         ("days", "a year that is not a leap year", 365), ("items", "a dozen", 12), ("weeks", "a year", 52)]
SHAPES = [("triangle", 3), ("square", 4), ("pentagon", 5), ("hexagon", 6), ("octagon", 8), ("rectangle", 4)]
LEGS = [("spider", 8), ("ant", 6), ("bee", 6), ("dog", 4), ("cat", 4), ("horse", 4), ("chicken", 2),
        ("duck", 2), ("cow", 4), ("beetle", 6)]
OPPOSITES = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("light", "dark"),
             ("open", "closed"), ("wet", "dry"), ("full", "empty"), ("early", "late"), ("happy", "sad"),
             ("loud", "quiet"), ("long", "short"), ("thick", "thin"), ("inside", "outside"),
             ("push", "pull"), ("buy", "sell"), ("old", "new"), ("win", "lose"), ("first", "last")]
FACTS = [  # (question, correct, three wrong answers): facts stated in any school textbook
    ("At sea level, at what temperature in degrees Celsius does water freeze?", "0", ["10", "50", "100"]),
    ("At sea level, at what temperature in degrees Celsius does water boil?", "100", ["0", "50", "212"]),
    ("Which planet is the largest in our solar system?", "Jupiter", ["Mars", "Mercury", "Venus"]),
    ("Which planet is closest to the Sun?", "Mercury", ["Jupiter", "Saturn", "Neptune"]),
    ("What does the Earth orbit?", "the Sun", ["the Moon", "Mars", "Jupiter"]),
    ("Which ocean is the largest?", "the Pacific Ocean", ["the Atlantic Ocean", "the Indian Ocean",
                                                          "the Arctic Ocean"]),
    ("What colour do you get by mixing blue and yellow paint?", "green", ["red", "orange", "purple"]),
    ("What colour do you get by mixing red and white paint?", "pink", ["green", "blue", "black"]),
    ("Which gas do plants take in from the air to make food?", "carbon dioxide", ["helium", "neon", "argon"]),
    ("What is frozen water called?", "ice", ["steam", "sand", "salt"]),
    ("Which organ pumps blood around the body?", "the heart", ["the lungs", "the stomach", "the skin"]),
    ("Which organ do people breathe with?", "the lungs", ["the heart", "the liver", "the kidneys"]),
    ("What is the chemical formula of water?", "H2O", ["CO2", "O2", "NaCl"]),
    ("Which animal is a mammal?", "a whale", ["a shark", "a trout", "an eagle"]),
    ("Which animal is a bird?", "a penguin", ["a bat", "a dolphin", "a frog"]),
    ("Which of these is a fruit?", "an apple", ["a carrot", "a potato", "an onion"]),
    ("In which direction does the Sun rise?", "east", ["west", "north", "south"]),
    ("How many continents are there on Earth?", "7", ["5", "9", "12"]),
    ("What is the closest star to the Earth?", "the Sun", ["the Moon", "Mars", "the North Star"]),
    ("What do bees make?", "honey", ["milk", "silk", "wool"]),
]
PHYSICAL = [  # PIQA-style: (goal, correct, three wrong ways)
    ("To keep ice cream from melting on a hot day, you should", "put it in the freezer",
     ["leave it in the sun", "put it in the oven", "wrap it in a warm blanket"]),
    ("To dry wet hands, you should", "rub them with a towel",
     ["dip them in water", "put on wet gloves", "hold them under a running tap"]),
    ("To see in a dark room, you should", "switch on a light", ["close the curtains", "shut your eyes",
                                                                "turn off the lamp"]),
    ("To cool a cup of hot tea quickly, you should", "add a little cold milk",
     ["put it on the stove", "add boiling water", "cover it with a warm towel"]),
    ("To stop a door from slamming in the wind, you should", "put a door stop against it",
     ["open every window", "oil the hinges", "paint the door"]),
    ("To carry soup to a friend, the best container is", "a jar with a tight lid",
     ["a paper bag", "a sieve", "an open cardboard box"]),
    ("To stay dry in the rain, you should", "open an umbrella", ["wear a swimsuit", "stand under a gutter",
                                                                 "carry a bucket"]),
    ("To make a ball bounce higher, you should", "pump more air into it", ["let air out of it",
                                                                          "fill it with sand",
                                                                          "wrap it in cloth"]),
    ("To cut a sheet of paper in half, you should use", "scissors", ["a spoon", "a sponge", "a pillow"]),
    ("To loosen a tight jar lid, you can", "run the lid under hot water", ["put the jar in the freezer",
                                                                           "shake the jar", "paint the lid"]),
    ("To keep bread fresh for longer, you should", "store it in a closed bag", ["leave it uncovered",
                                                                               "soak it in water",
                                                                               "keep it next to the oven"]),
    ("To find your way in a forest at night, it helps most to carry", "a torch", ["a mirror", "a pillow",
                                                                                  "a teacup"]),
    ("To water plants in a garden, you can use", "a watering can", ["a frying pan", "a fork", "a paper towel"]),
    ("To make cold hands warmer, you should", "wear gloves", ["hold an ice cube", "wet them", "wave them in the wind"]),
    ("To hang a picture on a wall, you need", "a nail and a hammer", ["a spoon and a cup", "a sponge",
                                                                      "a rubber band"]),
    ("To boil water, you should put the pot", "on a hot stove", ["in the fridge", "on a window sill",
                                                                 "in a cold bath"]),
    ("To sweep dust off the floor, you should use", "a broom", ["a fork", "a pillow", "a glass"]),
    ("To tighten a screw, you should use", "a screwdriver", ["a spoon", "a towel", "a pencil"]),
    ("To keep food cold on a picnic, you should pack it", "in a cool box with ice",
     ["in a black bag in the sun", "next to hot soup", "in a warm oven"]),
    ("To read a book at night, you should", "turn on a reading lamp", ["close the book", "draw the curtains",
                                                                       "turn off every light"]),
    ("To open a locked door, you need", "the key", ["a sock", "a spoon", "a leaf"]),
    ("To clean a dirty plate, you should wash it with", "soap and water", ["sand and oil", "mud", "glue"]),
    ("To make a paper aeroplane fly far, you should", "throw it forwards gently", ["crumple it into a ball",
                                                                                   "soak it in water",
                                                                                   "tear off its wings"]),
    ("To fill a balloon, you can", "blow air into it", ["poke it with a pin", "put it in the freezer",
                                                         "pour sand on it"]),
    ("To keep a candle flame from going out, you should", "shield it from the wind",
     ["blow on it", "pour water on it", "cover it with a cup"]),
    ("To measure how long a table is, you should use", "a tape measure", ["a thermometer", "a clock",
                                                                          "a weighing scale"]),
    ("To find out how warm it is outside, you should use", "a thermometer", ["a ruler", "a spoon", "a compass"]),
    ("To stop milk from going sour quickly, you should", "keep it in the fridge", ["keep it in the sun",
                                                                                  "leave it open on the table",
                                                                                  "warm it on the stove"]),
    ("To move a heavy box up a step more easily, you can", "slide it up a ramp", ["push it sideways on flat ground",
                                                                                 "sit on it",
                                                                                 "pour water on it"]),
    ("To dry clothes outdoors, you should hang them", "on a line in the sun and wind",
     ["in a closed cupboard", "in a bucket of water", "under a wet blanket"]),
]


def _item(rng: random.Random, kind: str, question: str, correct: str, wrong: list[str]) -> dict:
    wrong = list(dict.fromkeys(w for w in wrong if w != correct))[:3]
    if len(wrong) != 3:
        raise ValueError(f"{question!r}: needs three distinct wrong answers, got {wrong}")
    choices = wrong[:]
    answer = rng.randrange(4)
    choices.insert(answer, correct)
    return {"kind": kind, "question": question, "choices": choices, "answer": answer}


def _near(rng: random.Random, value: int, spread: tuple[int, ...] = (1, 2, 10)) -> list[str]:
    out: list[str] = []
    while len(out) < 3:
        cand = value + rng.choice([-1, 1]) * rng.choice(spread)
        if cand >= 0 and cand != value and str(cand) not in out:
            out.append(str(cand))
    return out


def _others(rng: random.Random, pool: list[str], correct: str) -> list[str]:
    return rng.sample([p for p in pool if p != correct], 3)


def items(rng: random.Random) -> list[dict]:
    out: list[dict] = []
    for _ in range(50):
        a, b = rng.randint(10, 89), rng.randint(10, 89)
        out.append(_item(rng, "addition", f"What is {a} + {b}?", str(a + b), _near(rng, a + b)))
    for _ in range(40):
        a = rng.randint(20, 99)
        b = rng.randint(1, a - 1)
        out.append(_item(rng, "subtraction", f"What is {a} - {b}?", str(a - b), _near(rng, a - b)))
    pairs = [(a, b) for a in range(2, 10) for b in range(2, 10) if a <= b]
    for a, b in rng.sample(pairs, 30):
        out.append(_item(rng, "multiplication", f"What is {a} times {b}?", str(a * b),
                         _near(rng, a * b, (1, a, b))))
    for _ in range(30):
        nums = rng.sample(range(1, 1000), 4)
        big = max(nums)
        out.append(_item(rng, "comparison", "Which number is the largest?", str(big), [str(n) for n in nums if n != big]))
    for _ in range(10):
        nums = rng.sample(range(1, 1000), 4)
        small = min(nums)
        out.append(_item(rng, "comparison", "Which number is the smallest?", str(small),
                         [str(n) for n in nums if n != small]))
    letters = list(string.ascii_uppercase)
    for i in range(25):
        out.append(_item(rng, "letters", f"Which letter comes right after {letters[i]} in the English alphabet?",
                         letters[i + 1], _others(rng, [x for x in letters if x != letters[i]], letters[i + 1])))
    for i in range(1, 26, 2):
        out.append(_item(rng, "letters", f"Which letter comes right before {letters[i]} in the English alphabet?",
                         letters[i - 1], _others(rng, [x for x in letters if x != letters[i]], letters[i - 1])))
    for i, day in enumerate(DAYS):
        for step, word in ((1, "the day after"), (-1, "the day before"), (2, "two days after")):
            right = DAYS[(i + step) % 7]
            out.append(_item(rng, "days", f"If today is {day}, what day is {word} today?", right,
                             _others(rng, [d for d in DAYS if d != day], right)))
    for i, month in enumerate(MONTHS):
        for step, word in ((1, "comes right after"), (-1, "comes right before")):
            right = MONTHS[(i + step) % 12]
            out.append(_item(rng, "months", f"Which month {word} {month}?", right,
                             _others(rng, [m for m in MONTHS if m != month], right)))
    for unit, whole, n in UNITS:
        out.append(_item(rng, "units", f"How many {unit} are in {whole}?", str(n), _near(rng, n, (2, 5, 10, 20))))
    for k in range(2, 10):
        out.append(_item(rng, "conversion", f"How many minutes are in {k} hours?", str(60 * k),
                         _near(rng, 60 * k, (10, 30, 60))))
        out.append(_item(rng, "conversion", f"How many centimetres are in {k} metres?", str(100 * k),
                         _near(rng, 100 * k, (10, 50, 100))))
        out.append(_item(rng, "conversion", f"How many grams are in {k} kilograms?", str(1000 * k),
                         _near(rng, 1000 * k, (100, 500, 1000))))
    for shape, n in SHAPES:
        out.append(_item(rng, "shapes", f"How many sides does a {shape} have?", str(n),
                         [str(x) for x in rng.sample([m for m in range(2, 11) if m != n], 3)]))
    for animal, n in LEGS:
        out.append(_item(rng, "legs", f"How many legs does a {animal} have?", str(n),
                         [str(x) for x in rng.sample([m for m in (0, 2, 4, 6, 8, 10) if m != n], 3)]))
    words = sorted({w for pair in OPPOSITES for w in pair})
    for a, b in OPPOSITES:
        out.append(_item(rng, "opposites", f"What is the opposite of \"{a}\"?", b,
                         _others(rng, [w for w in words if w not in (a, b)], b)))
    cities = sorted(CAPITALS.values())
    for country, city in CAPITALS.items():
        out.append(_item(rng, "capitals", f"What is the capital city of {country}?", city, _others(rng, cities, city)))
    for q, right, wrong in FACTS:
        out.append(_item(rng, "facts", q, right, wrong))
    for goal, right, wrong in PHYSICAL:
        out.append(_item(rng, "physical", f"{goal}:", right, wrong))
    return out


def build(seed: int = SEED) -> list[dict]:
    """Every item with its id and split (within each kind: seeded shuffle, alternating validation/test)."""
    rng = random.Random(seed)
    made = items(rng)
    kinds = list(dict.fromkeys(it["kind"] for it in made))
    out: list[dict] = []
    for kind in kinds:
        group = [it for it in made if it["kind"] == kind]
        rng.shuffle(group)
        for j, it in enumerate(group):
            out.append({"id": f"{kind}-{j:03d}", "split": "validation" if j % 2 == 0 else "test", **it})
    return out


def main() -> None:
    rows = build()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    n_val = sum(r["split"] == "validation" for r in rows)
    print(f"wrote {OUT}: {len(rows)} items ({n_val} validation, {len(rows) - n_val} test)")


if __name__ == "__main__":
    main()
