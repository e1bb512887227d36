"""The settings of `refusal-atlas reproduce`: how many prompts, tokens, steps and trials each row gets.

``quick`` is sized for the embedded 0.5B model on 2 CPU cores (about 30 minutes, estimated from the
measured costs of extraction, generation and training steps; not yet timed end to end): one-forward-pass
logit refusal scores for every curve and sweep, greedy generation with the substring judge only for
the headline held-out comparisons. ``full`` is the papers' scale, meant for a GPU and a 7B-class
model (docs/reproduce.md). A run directory remembers its budget: rerunning with other numbers is an
error, because finished rows would mix with new ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from refusal_atlas.core.errors import ConfigError


@dataclass(frozen=True)
class ReproduceBudget:
    name: str = "quick"
    # data: the SOM paper's map needs a large harmful set; SaladBench train ships 1,184 prompts
    harmful_train: str = "salad_harmful_train"
    harmless_train: str = "salad_harmless_train"
    n_harmful_train: int = 1184
    n_harmless_train: int = 128
    filter_train: bool = True
    harmful_val: str = "salad_harmful_val"
    harmless_val: str = "harmless_val"
    n_val: int = 12
    eval_harmful: str = "jailbreakbench"
    eval_harmless: str = "harmless_test"
    n_eval: int = 50  # held-out prompts of every generation comparison
    n_logit: int = 32  # held-out prompts of the one-pass curves (refusal score, geometry)
    n_xstest: int = 32
    max_new_tokens: int = 24
    batch_size: int = 32
    layer: int | None = None  # None: DIM selection on the validation prompts
    # (a), (b): SOM
    som_grid: tuple[int, int] = (4, 4)
    som_iterations: int = 10_000
    k_max: int = 7
    subset_trials: int = 4  # search trials per k and ablation mode (validation only)
    # gradient methods (c), (d), (e)
    # on the embedded model a step of 8 prompts × 30 target tokens costs ~26 s on 2 cores
    # (docs/results/data/gradient_embedded.json), so quick trains briefly on small batches
    grad_n_train: int = 16
    grad_n_val: int = 8
    target_tokens: int = 12
    grad_batch: int = 4
    rdo_steps: int = 8
    cone_k_max: int = 3
    cone_steps: int = 4
    cone_samples: int = 6
    n_random: int = 6
    repind_steps: int = 4
    # (g): the edit search
    edit_trials: int = 12
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_harmful_train", "n_harmless_train"):
            if getattr(self, name) < 2:
                raise ConfigError(f"reproduce budget: {name} must be >= 2")
        for name in ("n_val", "n_eval", "n_logit", "n_xstest", "max_new_tokens", "batch_size", "som_iterations",
                     "subset_trials", "grad_n_train", "grad_batch", "grad_n_val", "target_tokens", "rdo_steps", "cone_steps",
                     "cone_samples", "n_random", "repind_steps", "edit_trials"):
            if getattr(self, name) < 1:
                raise ConfigError(f"reproduce budget: {name} must be >= 1")
        if not 1 <= self.k_max <= 7:
            raise ConfigError("reproduce budget: k_max must be in 1..7")
        if self.cone_k_max < 2:
            raise ConfigError("reproduce budget: cone_k_max must be >= 2 (k = 1 is RDO itself)")
        if self.k_max > self.som_grid[0] * self.som_grid[1]:
            raise ConfigError("reproduce budget: k_max exceeds the SOM grid's neurons")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["som_grid"] = list(self.som_grid)
        return out

    def run_settings(self, model: str, device: str | None, dtype: str | None) -> dict[str, Any]:
        """The settings (flat names) of the run directory the library steps work in."""
        return dict(model=model, device=device, dtype=dtype, seed=self.seed, batch_size=self.batch_size,
                    harmful_train=self.harmful_train, harmless_train=self.harmless_train,
                    n_train=max(self.n_harmful_train, self.n_harmless_train), filter_train=self.filter_train,
                    harmful_val=self.harmful_val, harmless_val=self.harmless_val, n_val=self.n_val,
                    eval_harmful=[self.eval_harmful], eval_harmless=self.eval_harmless, n_eval=self.n_eval,
                    max_new_tokens=self.max_new_tokens, layer=self.layer)


QUICK = ReproduceBudget()
# The papers' scale (SOM: ~4k harmful points, 10k updates; RDO/cones: hundreds of steps); a GPU job.
FULL = replace(QUICK, name="full", n_harmless_train=1184, n_val=128, n_eval=100, n_logit=100, n_xstest=250,
               max_new_tokens=256, batch_size=16, subset_trials=40, grad_n_train=256, grad_n_val=64,
               target_tokens=30, grad_batch=8, rdo_steps=400, cone_k_max=5, cone_steps=200, cone_samples=32,
               n_random=32, repind_steps=200, edit_trials=200)
BUDGETS = {"quick": QUICK, "full": FULL}


def budget_named(name: str) -> ReproduceBudget:
    try:
        return BUDGETS[name]
    except KeyError:
        raise ConfigError(f"unknown --budget {name!r}; choose quick or full") from None


def check_same_budget(recorded: dict[str, Any] | None, budget: ReproduceBudget, model: str) -> None:
    """A run directory continues only with the budget and model it was started with."""
    if not recorded:
        return
    now = {"model": model, **budget.to_json()}
    diff = {k: (recorded.get(k), v) for k, v in now.items() if recorded.get(k) != v}
    if diff:
        detail = "; ".join(f"{k}: {a!r} (run) vs {b!r} (now)" for k, (a, b) in sorted(diff.items()))
        raise ConfigError(f"this reproduce run directory was made with other settings ({detail}); its finished rows "
                          "would be mixed with new ones. Use a new --run-dir or the run's own --budget/--model")
