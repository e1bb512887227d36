"""The settings of `refusal-atlas reproduce`: how many prompts, tokens, steps and trials each row gets.

``quick`` is a check of the evidence pipeline on the embedded 0.5B model on 2 CPU cores (under an hour, an
estimate): one-forward-pass logit refusal scores for every curve and sweep, greedy generation with the
substring judge only for the headline held-out comparisons, small n. ``standard`` is the smallest budget meant
to decide (about two hours on the same machine: rows (b)-(g) took 86 minutes idle on 2026-12-07,
docs/results/2026-12-07_reproduce_standard.md): at least 300 held-out harmful
prompts for every compared rate, gradient methods given enough steps to leave their initialisation (the
row's training curve says whether they did). ``full`` is the papers' scale, meant for a GPU and a 7B-class
model (docs/reproduce.md). Every generated rate uses 64 new tokens or more, the shortest length whose
verdicts matched 256-token verdicts (docs/evaluation.md). A run directory remembers
its budget: rerunning with other numbers is an error, because finished rows would mix with new ones.
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
    harmless_val: str = "salad_harmless_val"  # the SaladBench family's: disjoint from its train file
    n_val: int = 12
    # held-out harmful sets, pooled in this order (each shuffled with the seed, repeats and train/val prompts
    # dropped) and cut at n_eval: the later sets fill what the earlier ones leave
    eval_harmful: tuple[str, ...] = ("jailbreakbench",)
    eval_harmless: str = "harmless_test"
    n_eval: int = 50  # held-out prompts of every generation comparison (harmful pool; harmless KL set)
    n_logit: int = 32  # held-out prompts of the one-pass curves (refusal score, geometry): the pool's first
    n_xstest: int = 32
    max_new_tokens: int = 64
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
    # (b), (g) at matched damage: every method's strength swept on validation prompts (uniform weight s on every
    # write, as the search's warm starts), then `strength_refine` steps interpolated toward the target validation KL
    strength_grid: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
    strength_refine: int = 2
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
        if not self.eval_harmful or len(set(self.eval_harmful)) != len(self.eval_harmful):
            raise ConfigError("reproduce budget: eval_harmful must name at least one set, each once")
        if self.n_logit > self.n_eval:
            raise ConfigError("reproduce budget: n_logit must be <= n_eval (the curves use the pool's first prompts)")
        grid = self.strength_grid
        if len(grid) < 2 or list(grid) != sorted(set(grid)) or not 0.1 <= grid[0] or grid[-1] > 1.5:
            raise ConfigError("reproduce budget: strength_grid must be >= 2 increasing strengths in [0.1, 1.5] "
                              "(the edit search's peak range)")
        if self.strength_refine < 0:
            raise ConfigError("reproduce budget: strength_refine must be >= 0")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("som_grid", "eval_harmful", "strength_grid"):
            out[name] = list(out[name])
        return out

    def run_settings(self, model: str, device: str | None, dtype: str | None) -> dict[str, Any]:
        """The settings (flat names) of the run directory the library steps work in."""
        return dict(model=model, device=device, dtype=dtype, seed=self.seed, batch_size=self.batch_size,
                    harmful_train=self.harmful_train, harmless_train=self.harmless_train,
                    n_train=max(self.n_harmful_train, self.n_harmless_train), filter_train=self.filter_train,
                    harmful_val=self.harmful_val, harmless_val=self.harmless_val, n_val=self.n_val,
                    eval_harmful=list(self.eval_harmful), eval_harmless=self.eval_harmless, n_eval=self.n_eval,
                    max_new_tokens=self.max_new_tokens, layer=self.layer)


QUICK = ReproduceBudget()
# JailbreakBench 100 + HarmBench test 159 + StrongREJECT (shuffled, as many as needed): none is in any train
# or validation split, and JBB/HarmBench/StrongREJECT share 10 prompts, dropped from the later set.
HELD_OUT_HARMFUL = ("jailbreakbench", "harmbench_test", "strongreject")
# Sized for the embedded model on 2 CPU cores in about two hours (rows (b)-(g) took 86 minutes on an idle
# machine on 2026-12-07; preparation and part of (b) ran in an earlier sitting, so no one-sitting time exists):
# n = 300 pooled held-out prompts for every compared rate, 64 validation prompts per side for every choice,
# and gradient training of 8-example steps long enough that the validated iterate leaves its start.
STANDARD = replace(QUICK, name="standard", n_harmless_train=256, n_val=64, eval_harmful=HELD_OUT_HARMFUL, n_eval=300,
                   n_logit=100, n_xstest=100, grad_n_train=64, grad_n_val=16, target_tokens=16, grad_batch=8,
                   rdo_steps=24, cone_steps=16, cone_samples=12, n_random=12, repind_steps=20, edit_trials=24,
                   strength_refine=4)
# The papers' scale (SOM: ~4k harmful points, 10k updates; RDO/cones: hundreds of steps); a GPU job.
FULL = replace(STANDARD, name="full", n_harmless_train=1184, n_val=128, n_eval=500, n_logit=100, n_xstest=250,
               max_new_tokens=256, batch_size=16, subset_trials=40, grad_n_train=256, grad_n_val=64,
               target_tokens=30, grad_batch=8, rdo_steps=400, cone_k_max=5, cone_steps=200, cone_samples=32,
               n_random=32, repind_steps=200, edit_trials=200, strength_refine=6)
BUDGETS = {"quick": QUICK, "standard": STANDARD, "full": FULL}


def budget_named(name: str) -> ReproduceBudget:
    try:
        return BUDGETS[name]
    except KeyError:
        raise ConfigError(f"unknown --budget {name!r}; choose {', '.join(BUDGETS)}") from None


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
