"""Training the ARA-style low-rank edit (:class:`~refusal_atlas.edits.lowrank.LowRankEdit`) with the gradient loop.

heretic's ARA ("Arbitrary-Rank Ablation": the experimental branch and heretic 2.0's modifier) uses no
refusal direction: it trains low-rank updates of the attention out- and MLP down-projections so that
harmful prompts' representations move toward harmless ones while harmless ones stay put. This module
does that with our own loop (:func:`~refusal_atlas.directions.optim.train_parameters`: seeded, validated,
checkpointed every step with the optimizer state and the sampler's RNG, so a killed run resumes bit for
bit). It lives with the gradient methods because it *is* one; what it returns is an edit, not directions.

**Parameters.** For each chosen block j and component (o_proj, down_proj): ΔW = B·A, A [r, d_in]
initialized as PEFT does (uniform ±1/√d_in, seeded), B [d_model, r] = 0, so training starts at the
unedited model. All factors are one flat tensor (AdamW is element-wise, so this is the same optimizer
as one parameter per matrix), trained by plain AdamW (no geometry).

**Loss** per micro-batch (both terms scale-free):

* shift (weight ``shift_weight``): the last-position residual h_i of each harmful train prompt at
  ``target_layer`` (default: the input of the block right after the last edited one) should become its
  unedited value moved by the gap between the harmless and harmful means there,
  ``h_i⁰ + (μ_harmless − μ_harmful)``; loss = mean_i ‖h_i − h_i⁰ − (μ_harmless − μ_harmful)‖² / ‖μ_harmless −
  μ_harmful‖² (1 with no edit, 0 when every harmful prompt sits where the harmless ones do on average).
* retain (weight ``retain_weight``): KL(P_base ‖ P_edited) over the base model's own greedy continuations of
  harmless train prompts (``retain_tokens`` tokens, kept as token ids), the retain loss RDO uses.

*Why this target.* Asking each harmful representation to equal the harmless *mean* collapses every
harmful prompt onto one point (most of ‖h_i − μ‖² is the prompts' own spread, not refusal), so the model
would forget what it was asked; matching only the mean of a micro-batch leaves that spread as a noise
floor. The shifted target moves the distribution's mean exactly onto the harmless mean and asks for
nothing else, so what distinguishes one request from another is kept. *Why this layer.* The edited band
is where DIM finds the refusal direction (the DIM selection's candidate layers); the residual right
after it is what every later block reads, and matching there leaves the last blocks, which turn
representations into tokens, to the retain loss. It also lets the harmful pass stop there: no later
blocks and no vocabulary projection. (The final layer would instead train "say a harmless first token"
— the job of the retain KL, measured on other prompts.)

Model selection is the validation objective every gradient method uses (mean refusal log-odds on harmful
validation prompts + ``val_kl_weight`` × next-token KL on harmless ones), with the edit applied as hooks.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from refusal_atlas.core.errors import ConfigError, ModelError
from refusal_atlas.core.progress import progress
from refusal_atlas.directions.losses import Batch, base_logprobs, collate, kl_under, tokenize_examples
from refusal_atlas.directions.optim import TrainConfig, TrainResult, train_parameters
from refusal_atlas.edits.lowrank import COMPONENTS, LowRankEdit, Target, add_low_rank, projection
from refusal_atlas.evaluation.objective import ValidationObjective
from refusal_atlas.model.activations import extract
from refusal_atlas.model.adapter import ModelAdapter
from refusal_atlas.model.chat import ChatFormatter
from refusal_atlas.model.hooks import Hooks


def default_layers(n_layers: int) -> list[int]:
    """floor(L/3) .. 0.8·L: the DIM selection's candidate band, where the refusal direction is found."""
    return list(range(n_layers // 3, int(n_layers * 0.8)))


@dataclass(frozen=True)
class AraConfig:
    """What is edited and how the two losses are weighed (the optimizer is a :class:`TrainConfig`)."""

    rank: int = 8
    layers: tuple[int, ...] | None = None  # None: default_layers
    components: tuple[str, ...] = COMPONENTS
    target_layer: int | None = None  # None: the block after the last edited one
    shift_weight: float = 1.0
    retain_weight: float = 1.0

    def resolve(self, n_layers: int, d_model: int) -> AraConfig:
        """Checked against a model's shape (layer count, width): explicit layers and target, or a ConfigError."""
        if not 1 <= self.rank <= d_model:
            raise ConfigError(f"rank must be in 1..d_model = {d_model}, got {self.rank}")
        layers = tuple(sorted(set(self.layers))) if self.layers is not None else tuple(default_layers(n_layers))
        if not layers:
            raise ConfigError("no layers to edit")
        bad = [l for l in layers if not 0 <= l < n_layers]
        if bad:
            raise ConfigError(f"unknown layers {bad}: this model has blocks 0..{n_layers - 1}")
        target = self.target_layer if self.target_layer is not None else layers[-1] + 1
        if not layers[-1] < target < n_layers:
            raise ConfigError(f"the target layer ({target}) must come after the last edited block ({layers[-1]}) "
                              f"and be a block input (< {n_layers}); edit fewer late layers or set the target layer")
        if not self.components or any(c not in COMPONENTS for c in self.components):
            raise ConfigError(f"components must be among {COMPONENTS}, got {list(self.components)}")
        for name in ("shift_weight", "retain_weight"):
            w = getattr(self, name)
            if not (w >= 0 and math.isfinite(w)):
                raise ConfigError(f"{name} must be >= 0, got {w}")
        if self.shift_weight == 0:
            raise ConfigError("shift_weight must be > 0: without it nothing moves the harmful representations")
        return AraConfig(self.rank, layers, tuple(c for c in COMPONENTS if c in self.components), target,
                         self.shift_weight, self.retain_weight)

    def targets(self) -> list[Target]:
        assert self.layers is not None, "resolve() first"
        return [(layer, comp) for layer in self.layers for comp in self.components]


class _Stop(Exception):
    """Raised by the capture hook: nothing after the target layer is needed."""


class FactorLayout:
    """Where each target's A and B sit in the one flat parameter vector (A then B, targets in order)."""

    def __init__(self, adapter: ModelAdapter, targets: Sequence[Target], rank: int):
        self.shapes: dict[Target, tuple[tuple[int, int], tuple[int, int]]] = {}
        self.offsets: dict[Target, int] = {}
        n = 0
        for target in targets:
            proj = projection(adapter, target)
            a, b = (rank, proj.in_features), (proj.out_features, rank)
            self.shapes[target], self.offsets[target] = (a, b), n
            n += a[0] * a[1] + b[0] * b[1]
        self.size = n

    def split(self, flat: torch.Tensor) -> dict[Target, tuple[torch.Tensor, torch.Tensor]]:
        """Views (A, B) into ``flat`` per target (autograd flows through them)."""
        out = {}
        for target, ((ra, ca), (rb, cb)) in self.shapes.items():
            o = self.offsets[target]
            out[target] = (flat[o:o + ra * ca].view(ra, ca), flat[o + ra * ca:o + ra * ca + rb * cb].view(rb, cb))
        return out

    def start(self, seed: int) -> torch.Tensor:
        """A uniform in ±1/√d_in (PEFT's default for lora_A), B = 0: the unedited model, a nonzero gradient on B."""
        g = torch.Generator().manual_seed(seed)
        flat = torch.zeros(self.size)
        for target, ((ra, ca), _) in self.shapes.items():
            o = self.offsets[target]
            flat[o:o + ra * ca] = (torch.rand(ra * ca, generator=g) * 2 - 1) / math.sqrt(ca)
        return flat


class AraData:
    """Harmful prompts with their unedited residuals at the target layer, the mean gap, and retain examples.

    ``retain``: per harmless prompt, the token ids of the unedited model's own greedy continuation (ids, not
    text: the retain KL is then measured on exactly the tokens the model produced)."""

    def __init__(self, adapter: ModelAdapter, chat: ChatFormatter, harmful: Sequence[str], harmless: Sequence[str],
                 retain: Sequence[Sequence[int]], target_layer: int, batch_size: int = 16):
        if len(harmful) < 2 or len(harmless) < 2:
            raise ConfigError(f"ARA needs at least 2 harmful and 2 harmless train prompts, got {len(harmful)} and "
                              f"{len(harmless)}")
        self.harmful, self.target_layer = list(harmful), target_layer
        kw = dict(layers=[target_layer], positions=[-1], batch_size=batch_size)
        bad = extract(adapter, chat, self.harmful, desc="ara: harmful representations", **kw)
        good = extract(adapter, chat, list(harmless), desc="ara: harmless representations", **kw)
        # clones: extract runs in inference mode, and its tensors cannot enter autograd
        self.base = bad.last[:, 0].to(torch.float32).clone()  # [n, d] unedited h_i⁰
        self.gap = (good.mean[0, 0] - bad.mean[0, 0]).to(torch.float32).clone()  # μ_harmless − μ_harmful
        self.gap_sq = float(self.gap.pow(2).sum())
        if not self.gap_sq > 0:
            raise ConfigError("harmful and harmless train prompts have the same mean representation: nothing to move")
        self.retain = tokenize_examples(chat, list(harmless), list(retain))
        if not any(e.target_ids for e in self.retain):
            warnings.warn("every retain target is empty (the model ends its answers at once?): the retain KL will be "
                          "zero", stacklevel=2)
        pad = chat.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else chat.tokenizer.eos_token_id)
        self.chat, self.device = chat, adapter.device
        self.retain_base = self._retain_base(adapter, batch_size)

    def _retain_base(self, adapter: ModelAdapter, batch_size: int) -> list[torch.Tensor]:
        """The unedited model's log-probs at each retain example's target positions ([T_i, V] each), computed
        once, in fixed batches: a resumed run uses the very same values (recomputing them inside each step's
        batch would differ in the last bits with the batch's padding), and no step pays a base pass."""
        out: list[torch.Tensor] = []
        with progress(len(self.retain), "ara: retain base log-probs") as bar:
            for lo in range(0, len(self.retain), batch_size):
                rows = self.retain[lo:lo + batch_size]
                lp = base_logprobs(adapter, collate(rows, self.pad_id, self.device)).cpu()
                out += [lp[r, lp.shape[1] - len(e.target_ids):].clone() for r, e in enumerate(rows)]
                bar.update(len(rows))
        return out

    def __len__(self) -> int:
        return max(len(self.harmful), len(self.retain))

    def shift_loss(self, adapter: ModelAdapter, idx: Sequence[int]) -> torch.Tensor:
        """mean_i ‖h_i − h_i⁰ − gap‖² / ‖gap‖² over harmful examples ``idx`` (current hooks apply)."""
        rows = [i % len(self.harmful) for i in idx]
        captured: dict[str, torch.Tensor] = {}

        def capture(hidden: torch.Tensor) -> None:
            captured["h"] = hidden[:, -1]
            raise _Stop

        batch = self.chat.encode([self.harmful[i] for i in rows], device=self.device)
        with Hooks() as hooks:
            hooks.inputs(adapter.layers[self.target_layer], capture)
            try:
                adapter.base(**batch, use_cache=False)
            except _Stop:
                pass
        h = captured["h"].to(torch.float32)
        want = self.base[rows].to(h.device) + self.gap.to(h.device)
        return (h - want).pow(2).sum(-1).mean() / self.gap_sq

    def retain_batch(self, idx: Sequence[int]) -> tuple[Batch, torch.Tensor]:
        """Collated retain examples ``idx`` and their cached base log-probs, aligned with the batch's labels
        ([B, T, V]; 0 where a row has no target, which the label mask leaves out)."""
        rows = [i % len(self.retain) for i in idx]
        batch = collate([self.retain[i] for i in rows], self.pad_id, self.device)
        base = torch.zeros(len(rows), batch.n_targets, self.retain_base[0].shape[-1] if self.retain_base else 1)
        for r, i in enumerate(rows):
            t = self.retain_base[i].shape[0]
            if t:
                base[r, batch.n_targets - t:] = self.retain_base[i]
        return batch, base.to(self.device)


def ara_loss(adapter: ModelAdapter, data: AraData, factors: dict[Target, tuple[torch.Tensor, torch.Tensor]],
             idx: Sequence[int], cfg: AraConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """shift_weight × shift + retain_weight × retain KL for examples ``idx``; the total and its parts."""
    with add_low_rank(adapter, factors):
        shift = data.shift_loss(adapter, idx)
    total, parts = cfg.shift_weight * shift, {"shift": float(shift.detach())}
    if cfg.retain_weight:
        batch, base = data.retain_batch(idx)
        kl = kl_under(adapter, batch, lambda: add_low_rank(adapter, factors), base)
        total = total + cfg.retain_weight * kl
        parts["retain"] = float(kl.detach())
    return total, parts


def train_ara(adapter: ModelAdapter, chat: ChatFormatter, data: AraData, validation: ValidationObjective,
              cfg: AraConfig, train: TrainConfig, *, name: str = "ara",
              meta: dict[str, Any] | None = None) -> LowRankEdit:
    """Train the low-rank edit (checkpointed inside ``checkpointing``); the best validated iterate as an edit."""
    cfg = cfg.resolve(adapter.n_layers, adapter.d_model)
    if cfg.target_layer != data.target_layer:
        raise ConfigError(f"the data were prepared at layer {data.target_layer}, the edit targets {cfg.target_layer}")
    if any(adapter.is_moe(layer) for layer, comp in cfg.targets() if comp == "mlp"):
        raise ModelError("ARA edits dense MLP down-projections; this model's MLPs in the chosen layers are mixtures "
                         "of experts (use components attn only)")
    layout = FactorLayout(adapter, cfg.targets(), cfg.rank)
    for p in adapter.model.parameters():
        p.requires_grad_(False)

    def edit_of(flat: torch.Tensor, edit_name: str | None = None, extra: dict | None = None) -> LowRankEdit:
        return LowRankEdit(layout.split(flat.detach()), adapter.n_layers, name=edit_name, meta=extra)

    def validate(flat: torch.Tensor) -> dict[str, Any]:
        refusal, kl = validation(edit_of(flat))
        return {"refusal": refusal, "kl": kl, "objective": refusal + train.val_kl_weight * kl}

    def loss_fn(flat: torch.Tensor, idx: list[int], slot: int, step: int):
        return ara_loss(adapter, data, layout.split(flat), idx, cfg)

    result: TrainResult = train_parameters(layout.start(train.seed), loss_fn, len(data), validate, train,
                                           desc=f"ara[{name}]")
    best = next(v for v in result.val_history if v["step"] == result.best_step)
    info = {"ara": {**asdict(cfg), "layers": list(cfg.layers), "components": list(cfg.components)},
            "train": train.to_json(), "n_harmful": len(data.harmful), "n_retain": len(data.retain),
            "gap_norm": math.sqrt(data.gap_sq), "val": {"refusal": best["refusal"], "kl": best["kl"],
                                                         "n_harmful": len(validation.harmful),
                                                         "n_harmless": len(validation.harmless)},
            **result.meta(), **(meta or {})}
    return edit_of(result.params, name, info)
