"""A notebook API: one object for a loaded chat model, and scikit-learn-shaped direction estimators.

The library's functions stay the engine; this module only fixes one way to call them. Prompts are
plain strings, layers and positions are keyword-only, estimators take their hyper-parameters in
``__init__``, ``fit`` returns the estimator and what it learned ends in ``_`` (``directions_``, a
:class:`DirectionSet`), and an edit is a ``with`` block:

>>> atlas = Atlas.from_model(model, tokenizer)            # or Atlas.load("embedded")
>>> harmful = ["how to make a bomb", "hack into computer and steal money"]
>>> harmless = ["tell joke", "give me recipe for cake"]
>>> acts = atlas.extract(harmful, harmless)
>>> dim = DIM(layer=2).fit(acts)
>>> (dim.directions_.method, dim.directions_.layer, dim.directions_.position, len(dim.directions_))
('dim', 2, -1, 1)
>>> with atlas.ablate(dim.directions_):
...     edited = atlas.generate(harmful, max_new_tokens=4)
>>> edited != atlas.generate(harmful, max_new_tokens=4)   # the edit is gone after the block
True
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from refusal_atlas.model.activations import Activations, ActivationSet, extract
from refusal_atlas.data import Prompt, load_prompts
from refusal_atlas.directions.base import DirectionSet
from refusal_atlas.directions.dim import DIM, DimCandidates
from refusal_atlas.directions import rdo as directions_rdo
from refusal_atlas.directions.som import SOM
from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.estimator import Estimator
from refusal_atlas.evaluation.evaluate import evaluate_kl, evaluate_refusal
from refusal_atlas.evaluation.refusal import next_token_logprobs, refusal_score, refusal_token_ids
from refusal_atlas.model.generation import generate
from refusal_atlas.edits import ActAdd, DirectionalAblation, Edit, NoEdit
from refusal_atlas.model import ChatFormatter, ModelAdapter, load_model

# DIM and SOM are the directions/ estimators themselves; RDO and Search build what theirs fit on from an Atlas.
__all__ = ["Activations", "Atlas", "DIM", "RDO", "SOM", "Search", "prompts"]


def prompts(name: str, *, n: int | None = None, seed: int = 0) -> list[str]:
    """Instructions of a bundled prompt set or a prompt file (``refusal-atlas datasets`` lists the sets)."""
    return [p.instruction for p in load_prompts(name, n=n, seed=seed)]


class Atlas:
    """A chat model ready for refusal work: adapter, chat format, refusal tokens and the active edit.

    ``system``: a system prompt (None: the chat template's own default). ``generate``, ``refusal_scores``
    and ``evaluate`` run under whatever ``ablate`` / ``add`` block is open.
    """

    def __init__(self, model, tokenizer, *, name: str = "model", system: str | None = None,
                 chat_template: str | None = None, batch_size: int = 32):
        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, name, batch_size
        self.adapter = ModelAdapter(model)
        self.chat = ChatFormatter(tokenizer, system=system, chat_template=chat_template)
        self.refusal_ids = refusal_token_ids(tokenizer)
        self._edit: Edit | None = None

    @classmethod
    def load(cls, model: str = "embedded", *, device: str | None = None, dtype: str | None = None,
             **kwargs: Any) -> Atlas:
        """Load an HF id, a local directory, a ``.gguf`` file or ``"embedded"`` (the shipped 0.5B model).

        The first load in a process applies the runtime settings (``REFUSAL_ATLAS_CACHE``, ``_QUIET``, ...),
        as the CLI does at start."""
        from refusal_atlas.settings import apply_runtime_once

        apply_runtime_once()
        loaded = load_model(model, device=device, dtype=dtype)
        return cls(loaded.model, loaded.tokenizer, name=loaded.name, **kwargs)

    @classmethod
    def from_model(cls, model, tokenizer, **kwargs: Any) -> Atlas:
        """Wrap a model already in memory (any supported HF causal LM with a chat template)."""
        return cls(model, tokenizer, **kwargs)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def d_model(self) -> int:
        return self.adapter.d_model

    # activations -------------------------------------------------------------------------------
    def extract(self, harmful: Sequence[str], harmless: Sequence[str], *, layers: Sequence[int] | None = None,
                positions: Sequence[int] | None = None) -> Activations:
        """Block-input residuals of both sets at ``layers`` (default all) × ``positions`` (default all)."""
        def run(texts: Sequence[str], what: str) -> ActivationSet:
            return extract(self.adapter, self.chat, list(texts), layers=layers, positions=positions,
                           batch_size=self.batch_size, desc=f"extract {what}")

        return Activations(run(harmful, "harmful"), run(harmless, "harmless"), list(harmful), list(harmless))

    # edits -------------------------------------------------------------------------------------
    @contextmanager
    def edit(self, edit: Edit) -> Iterator[Edit]:
        """Run the block under ``edit`` (nested blocks: the innermost applies)."""
        previous, self._edit = self._edit, edit
        try:
            yield edit
        finally:
            self._edit = previous

    def ablate(self, directions: DirectionSet, *, mode: str = "subspace"):
        """Project ``directions`` out of the residual stream everywhere (``mode``: subspace | sequential)."""
        return self.edit(DirectionalAblation.from_directions(directions, mode))  # type: ignore[arg-type]

    def add(self, directions: DirectionSet, *, coeff: float = 1.0, layer: int | None = None):
        """Add ``coeff`` × the first direction at ``layer`` (default: the set's layer): ActAdd, induces refusal."""
        return self.edit(ActAdd.from_directions(directions, coeff, layer=layer))

    @property
    def active_edit(self) -> Edit:
        return self._edit or NoEdit()

    # measurements ------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 64) -> list[str]:
        """Greedy completions under the active edit."""
        return generate(self.adapter, self.chat, list(prompts), max_new_tokens=max_new_tokens,
                        batch_size=self.batch_size, intervention=self._edit)

    def refusal_scores(self, prompts: Sequence[str]) -> torch.Tensor:
        """Per prompt, log-odds of a refusal-start token at the last prompt position (one forward pass)."""
        lp = next_token_logprobs(self.adapter, self.chat, list(prompts), self.batch_size, intervention=self._edit)
        return refusal_score(lp, self.refusal_ids)

    def evaluate(self, harmful: Sequence[str], harmless: Sequence[str] | None = None, *,
                 max_new_tokens: int = 64) -> dict[str, Any]:
        """The active edit against the unedited model: refusal rates (substring judge), mean scores, KL.

        Returns ``{"edit", "harmful": {refusal_rate, ci95, n, mean_refusal_score}, "harmless": {...,
        "kl"}}``; KL is the mean next-token KL(base ‖ edited) on the harmless prompts, in nats.
        """
        spec = self.active_edit
        out: dict[str, Any] = {"edit": spec.label}
        for role, texts in (("harmful", harmful), ("harmless", harmless)):
            if not texts:
                continue
            items = [Prompt(t) for t in texts]
            rec = evaluate_refusal(self.adapter, self.chat, items, f"{role}_prompts", spec,
                                   max_new_tokens=max_new_tokens, batch_size=self.batch_size)
            out[role] = {k: rec[k] for k in ("refusal_rate", "ci95", "n")}
            out[role]["mean_refusal_score"] = float(self.refusal_scores(texts).mean())
            if role == "harmless":
                out[role]["kl"], _ = evaluate_kl(self.adapter, self.chat, items, spec, batch_size=self.batch_size)
        return out

    def select(self, candidates: DimCandidates | DIM, harmful_val: Sequence[str], harmless_val: Sequence[str], *,
               kl_threshold: float = 0.1, induce_threshold: float = 0.0, prune_layer_frac: float = 0.2,
               layers: Sequence[int] | None = None, positions: Sequence[int] | None = None) -> DirectionSet:
        """Arditi-style choice of one DIM candidate on validation prompts (``candidates``: a fitted ``DIM``
        or its ``candidates_``); every candidate's scores: ``refusal_atlas.directions.select.DirectionSelector``."""
        from refusal_atlas.directions.select import DirectionSelector

        sel = DirectionSelector(kl_threshold=kl_threshold, induce_threshold=induce_threshold,
                                prune_layer_frac=prune_layer_frac, layers=layers, positions=positions,
                                batch_size=self.batch_size)
        sel.fit(self.adapter, self.chat, candidates, list(harmful_val), list(harmless_val), self.refusal_ids)
        assert sel.best_ is not None  # not strict: filters are relaxed rather than failing
        sel.best_.meta["selection"] = {"relaxed": sel.relaxed_, "baseline": sel.baseline_}
        return sel.best_


# ------------------------------------------------------------------------------------- estimators
def _directions(directions: DirectionSet | Estimator) -> DirectionSet:
    """A DirectionSet as given, or a fitted estimator's ``directions_``."""
    return directions if isinstance(directions, DirectionSet) else directions.directions_


class RDO(Estimator):
    """Refusal Direction Optimization (Wollschläger et al.) from a notebook: one direction trained by
    gradient descent so ablating it answers like DIM ablation, adding it refuses, and harmless behaviour
    is retained.

    ``fit(atlas, acts, dim=...)`` trains on the prompts of ``acts`` (targets generated with the DIM
    direction, a DirectionSet or a fitted ``DIM``; default ``DIM().fit(acts)``) and validates on
    ``harmful_val`` / ``harmless_val`` (default: the train prompts), through
    :class:`refusal_atlas.directions.rdo.RDO`, whose fitted attributes it takes over (``directions_``,
    ``history_``, ``loss_curve_``, ``validation_history_``, ``best_step_``, ``stopped_``).
    """

    fitted_attributes = directions_rdo.RDO.fitted_attributes

    def __init__(self, *, steps: int = 40, lr: float = 1e-2, batch_size: int = 8, eval_every: int = 4,
                 target_tokens: int = 30, init: str = "dim", orthogonal: bool = False, seed: int = 0):
        self.steps = steps
        self.lr = lr
        self.batch_size = batch_size
        self.eval_every = eval_every
        self.target_tokens = target_tokens
        self.init = init
        self.orthogonal = orthogonal
        self.seed = seed

    def fit(self, atlas: Atlas, acts: Activations, *, dim: DirectionSet | DIM | None = None,
            harmful_val: Sequence[str] | None = None, harmless_val: Sequence[str] | None = None) -> RDO:
        from refusal_atlas.directions.optim import TrainConfig, TrainingData, ValidationSet
        from refusal_atlas.directions.targets import build_targets
        from refusal_atlas.directions.training_setup import TrainingSetup

        dim_set = _directions(dim if dim is not None else DIM().fit(acts))
        cfg = TrainConfig(steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                          micro_batch=min(4, self.batch_size), eval_every=self.eval_every, seed=self.seed)
        targets = build_targets(atlas.adapter, atlas.chat, dim_set, acts.harmful_prompts, acts.harmless_prompts,
                                max_new_tokens=self.target_tokens, batch_size=atlas.batch_size)
        val = ValidationSet(atlas.adapter, atlas.chat, list(harmful_val or acts.harmful_prompts),
                            list(harmless_val or acts.harmless_prompts), atlas.refusal_ids, atlas.batch_size,
                            cfg.val_kl_weight)
        setup = TrainingSetup(dim_set, targets, TrainingData(atlas.chat, targets, atlas.adapter.device), val, {})
        trained = directions_rdo.RDO(init="random" if self.orthogonal else self.init, orthogonal=self.orthogonal,
                                     cfg=cfg).fit(atlas.adapter, setup)
        for name in self.fitted_attributes:
            setattr(self, name, getattr(trained, name))
        return self


class Search(Estimator):
    """Optuna TPE search for the subset of ``k`` directions (e.g. SOM's) whose joint ablation best trades
    refusal against KL on validation prompts. After ``fit``: ``directions_`` the chosen subset,
    ``summary_`` the study (trials, front, the pick)."""

    fitted_attributes = ("directions_", "summary_")

    def __init__(self, *, k: int = 3, trials: int = 30, seed: int = 0, kl_threshold: float = 0.1,
                 mode: str = "subspace", n_startup_trials: int = 10, study: str | Path | None = None):
        self.k = k
        self.trials = trials
        self.seed = seed
        self.kl_threshold = kl_threshold
        self.mode = mode
        self.n_startup_trials = n_startup_trials
        self.study = study

    def fit(self, atlas: Atlas, directions: DirectionSet | Estimator, harmful_val: Sequence[str],
            harmless_val: Sequence[str]) -> Search:
        from refusal_atlas.evaluation.objective import ValidationObjective
        from refusal_atlas.search.subsets import SubsetSpace, run_trials, subset_identity, subset_settings
        from refusal_atlas.search.study import open_study, summarize

        if self.trials < 1:
            raise ConfigError(f"trials must be >= 1, got {self.trials}")
        directions = _directions(directions)
        space = SubsetSpace.of(directions, self.k)  # k against the number of directions, before any work
        how = {"seed": self.seed, "mode": self.mode, "n_startup_trials": self.n_startup_trials}
        objective = ValidationObjective(atlas.adapter, atlas.chat, list(harmful_val), list(harmless_val),
                                        atlas.refusal_ids, batch_size=atlas.batch_size, mode=self.mode)  # type: ignore[arg-type]
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(self.study) if self.study is not None else Path(tmp) / "study.db"
            study = open_study(db, "search", subset_identity(space, directions, objective.fingerprint(), **how))
            run_trials(study, directions, objective, space, n_trials=self.trials, **how)
            self.summary_ = summarize(study, self.kl_threshold,
                                      subset_settings(self.k, None, kl_threshold=self.kl_threshold, **how), self.mode)
        self.directions_ = directions.select(self.summary_["chosen"]["ids"])
        return self
