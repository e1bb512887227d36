"""Registry of the prompt sets shipped inside the package.

Record counts are hard-coded so that listing datasets never has to parse ~8 MB of JSON;
``tests/unit/test_data.py`` loads every set and checks each count against its file.
Licences follow ``DATASETS.md`` (several rest on secondary sources); the Alpaca-derived
harmless sets are non-commercial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from refusal_atlas.core.errors import DataError

Role = Literal["harmful", "harmless", "over_refusal"]
Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class DatasetInfo:
    """One shipped prompt set: where it lives, what it is for and under which terms."""

    name: str
    path: str  # relative to the package's ``prompts/`` folder
    role: Role
    split: Split | None
    n: int
    source: str
    license: str


_ARDITI = "Arditi et al. 2024 splits (andyrdt/refusal_direction)"
_SALAD = "Wollschlaeger et al. 2025 splits (IQ-QI214/geometry-of-refusal)"
_ALPACA, _ALPACA_LIC = "Stanford Alpaca, empty-input instructions", "CC BY-NC 4.0 (non-commercial)"
_TEST = "JailbreakBench + HarmBench test + StrongREJECT, concatenated"
_SALAD_LIC = "Apache-2.0 (aggregated sub-sources keep their own terms)"
_N = {  # family -> (harmful train/val/test, harmless train/val/test)
    "arditi": ((260, 39, 572), (18793, 6264, 6266)),
    "saladbench": ((1184, 128, 572), (25058, 3132, 3133)),
}
_HARMFUL = {  # (family, split) -> (source, licence)
    ("arditi", "train"): (f"{_ARDITI}: AdvBench + MaliciousInstruct + TDC 2023 sample",
                          "MIT (AdvBench, TDC 2023); none stated (MaliciousInstruct)"),
    ("arditi", "val"): (f"{_ARDITI}: HarmBench val standard behaviours", "MIT"),
    ("arditi", "test"): (f"{_ARDITI}: {_TEST}", "MIT"),
    ("saladbench", "train"): (f"{_SALAD}: SALAD-Bench base set", _SALAD_LIC),
    ("saladbench", "val"): (f"{_SALAD}: SALAD-Bench base set", _SALAD_LIC),
    ("saladbench", "test"): (f"{_SALAD}: {_TEST}, plus JBB targets", "MIT"),
}


def _splits() -> list[DatasetInfo]:
    roles: tuple[Role, Role] = ("harmful", "harmless")
    splits: tuple[Split, Split, Split] = ("train", "val", "test")
    out: list[DatasetInfo] = []
    for family, prefix, family_src in (("arditi", "", _ARDITI), ("saladbench", "salad_", _SALAD)):
        for role, counts in zip(roles, _N[family]):
            for split, n in zip(splits, counts):
                if role == "harmful":
                    source, lic = _HARMFUL[(family, split)]
                else:
                    source, lic = f"{family_src}: {_ALPACA}", _ALPACA_LIC
                path = f"splits/{family}/{role}_{split}.json"
                out.append(DatasetInfo(f"{prefix}{role}_{split}", path, role, split, n, source, lic))
    return out


_BENCHMARKS: list[tuple[str, Role, int, str, str]] = [
    ("jailbreakbench", "harmful", 100, "JailbreakBench JBB-Behaviors goals", "MIT"),
    ("harmbench_val", "harmful", 41, "HarmBench val, standard behaviours", "MIT"),
    ("harmbench_test", "harmful", 159, "HarmBench test, standard behaviours", "MIT"),
    ("advbench", "harmful", 520, "AdvBench harmful_behaviors goals", "MIT"),
    ("strongreject", "harmful", 313, "StrongREJECT forbidden prompts", "MIT"),
    ("malicious_instruct", "harmful", 100, "MaliciousInstruct", "none stated (unconfirmed)"),
    ("tdc2023", "harmful", 100, "TDC 2023 red-teaming behaviours, dev + test", "MIT"),
    ("xstest", "over_refusal", 250, "XSTest v2, safe prompts only", "CC-BY-4.0"),
    ("orbench_hard", "over_refusal", 1319, "OR-Bench hard-1k", "CC-BY-4.0"),
]

_ALL: tuple[DatasetInfo, ...] = (
    *_splits(),
    *(DatasetInfo(name, f"benchmarks/{name}.json", role, None, n, src, lic)
      for name, role, n, src, lic in _BENCHMARKS),
)
REGISTRY: dict[str, DatasetInfo] = {info.name: info for info in _ALL}


def list_datasets() -> list[DatasetInfo]:
    """All shipped prompt sets: Arditi splits, then SaladBench splits, then benchmarks."""
    return list(_ALL)


def dataset_info(name: str) -> DatasetInfo:
    """Look up one registered set; unknown names raise :class:`DataError` with a hint."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise DataError(f"Unknown prompt set {name!r}. {registry_hint()}") from None


def registry_hint() -> str:
    """One sentence pointing users at valid names, shared by every 'unknown set' error."""
    examples = "harmful_train, harmless_val, salad_harmful_test, jailbreakbench, xstest"
    return f"Registered sets include {examples}; run `refusal-atlas datasets` to list all {len(REGISTRY)}."
