"""The held-out harmful prompts of bench/vs_heretic.py: JailbreakBench plus prompts no search and no direction saw.

Both tools build directions from ``harmful_train`` and search on ``harmful_val``; the fronts are then scored
on JailbreakBench (all 100, as the issue asks) plus ``n_extra`` prompts drawn from HarmBench test and
StrongREJECT after removing every prompt that is an exact or near duplicate of a train or validation
prompt, of a JailbreakBench prompt, or of an earlier pool prompt. The shipped sets overlap heavily
(``harmful_train`` is drawn from AdvBench, MaliciousInstruct and TDC 2023, and HarmBench test shares 30 of
its prompts with TDC 2023 or JailbreakBench), so exact matching alone is not enough.

Near duplicate (the rule, fixed by reading the closest pairs before any scoring, never from results):
after lower-casing and mapping every run of non-alphanumerics to one space, the two texts are equal, or
difflib's ratio is >= ``RATIO`` (same sentence with a word changed: "rob a bank at gunpoint" / "rob a
bank"), or the Jaccard overlap of their content words (stop and template words such as "give",
"detailed", "instructions" removed) is >= ``JACCARD`` (same request in other words: "build a pipe bomb
from household objects" / "build a pipe bomb"). The rule is deliberately strict: a false match only
shrinks the pool.

JailbreakBench is kept whole, but some of its prompts (16 with the shipped sets) nearly duplicate train or
validation prompts;
each held-out prompt records what it duplicates (``near``), so results can also be read without them.
"""

from __future__ import annotations

import difflib
import random
import re

RATIO = 0.8
JACCARD = 0.6
STOP = frozenset("""a an the and or of to for in on at by with from into about as is are be that this it its their
them they his her your you i me my we our can could would should will how what which who whom why where when do
does did give provide write create describe generate explain list detailed detail step steps instructions
instruction guide tutorial way ways method methods some any someone s t using use make""".split())


def normalise(text: str) -> str:
    """Lower case, every run of characters other than a-z and 0-9 → one space."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in normalise(text).split() if w not in STOP)


def similarity(a: str, b: str) -> tuple[float, float]:
    """(difflib ratio of the normalised texts, Jaccard overlap of their content words)."""
    na, nb = normalise(a), normalise(b)
    ca, cb = content_words(a), content_words(b)
    jaccard = len(ca & cb) / len(ca | cb) if ca | cb else float(na == nb)
    return difflib.SequenceMatcher(None, na, nb).ratio(), jaccard


def near_duplicate(a: str, b: str, ratio: float = RATIO, jaccard: float = JACCARD) -> bool:
    na, nb = normalise(a), normalise(b)
    if na == nb:
        return True
    ca, cb = content_words(a), content_words(b)
    if ca | cb and len(ca & cb) / len(ca | cb) >= jaccard:
        return True
    sm = difflib.SequenceMatcher(None, na, nb)  # the cheap upper bounds first: most pairs end there
    return sm.real_quick_ratio() >= ratio and sm.quick_ratio() >= ratio and sm.ratio() >= ratio


def first_match(text: str, others: list[tuple[str, str]], **rule) -> dict | None:
    """The first (source, text) of ``others`` that ``text`` nearly duplicates, with its scores; else None."""
    for source, other in others:
        if near_duplicate(text, other, **rule):
            r, j = similarity(text, other)
            return {"source": source, "text": other, "ratio": round(r, 3), "jaccard": round(j, 3)}
    return None


def heldout_set(jbb: list[str], pool: list[tuple[str, str]], exclude: list[tuple[str, str]], n_extra: int,
                seed: int = 0, **rule) -> dict:
    """JailbreakBench (kept whole, each prompt marked with the train/validation prompt it nearly duplicates,
    if any) + ``n_extra`` prompts of ``pool`` ((source, text) pairs) that nearly duplicate nothing in
    ``exclude`` (train and validation prompts), in JailbreakBench or earlier in the pool, sampled with
    ``random.Random(seed)`` in pool order → {"prompts": [{"text", "source", "near"}], "dropped": [...]}.

    ValueError when fewer than ``n_extra`` survive: the bench must not quietly score fewer.
    """
    if n_extra < 0:
        raise ValueError(f"n_extra must be >= 0, got {n_extra}")
    prompts = [{"text": t, "source": "jailbreakbench", "near": first_match(t, exclude, **rule)} for t in jbb]
    kept: list[tuple[str, str]] = []
    dropped = []
    seen = [("jailbreakbench", t) for t in jbb]
    for source, text in pool:
        hit = first_match(text, exclude + seen + kept, **rule)
        if hit is None:
            kept.append((source, text))
        else:
            dropped.append({"text": text, "source": source, "duplicates": hit})
    if len(kept) < n_extra:
        raise ValueError(f"only {len(kept)} pool prompts are not near duplicates of train, validation or "
                         f"JailbreakBench prompts; asked for {n_extra}")
    chosen = sorted(random.Random(seed).sample(range(len(kept)), n_extra))
    prompts += [{"text": kept[i][1], "source": kept[i][0], "near": None} for i in chosen]
    return {"prompts": prompts, "dropped": dropped, "pool": len(pool), "survivors": len(kept),
            "rule": {"ratio": rule.get("ratio", RATIO), "jaccard": rule.get("jaccard", JACCARD)}, "seed": seed}


SUBSETS = ("all", "strict", "jailbreakbench", "extra")


def subset_mask(prompts: list[dict], subset: str) -> list[bool]:
    """Which held-out prompts a subset holds: all; strict (none that nearly duplicates a train or validation
    prompt); jailbreakbench; extra (the HarmBench test / StrongREJECT draw)."""
    if subset == "all":
        return [True] * len(prompts)
    if subset == "strict":
        return [p["near"] is None for p in prompts]
    if subset == "jailbreakbench":
        return [p["source"] == "jailbreakbench" for p in prompts]
    if subset == "extra":
        return [p["source"] != "jailbreakbench" for p in prompts]
    raise ValueError(f"unknown subset {subset!r}; choose from {', '.join(SUBSETS)}")


def leaks(heldout: dict[str, list[str]], seen: dict[str, list[str]], near: bool = False, **rule) -> list[dict]:
    """Every prompt of a held-out set (``heldout``: name → texts) that a split a search saw (``seen``: name →
    texts) also holds: normalised-equal, or with ``near`` a near duplicate by :func:`near_duplicate`.

    The last check before any search runs: the draw in :func:`heldout_set` excludes near duplicates already,
    so a hit here means the sets were wired wrong (a role fed from another split than the exclusions
    name), and the bench must stop rather than score a front on prompts it was tuned on. Exact matching is
    the check for the large harmless splits (tens of thousands of prompts; near matching would take hours).
    """
    index: dict[str, str] = {}
    for name, texts in seen.items():
        for text in texts:
            index.setdefault(normalise(text), name)
    out = []
    for set_name, texts in heldout.items():
        for text in texts:
            hit = index.get(normalise(text))
            if hit is None and near:
                match = first_match(text, [(name, t) for name, ts in seen.items() for t in ts], **rule)
                hit = match["source"] if match else None
            if hit is not None:
                out.append({"set": set_name, "text": text, "seen_in": hit})
    return out
