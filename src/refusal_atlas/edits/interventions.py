"""Activation interventions as context managers: directional ablation and activation addition.

Ablation removes the directions from the residual stream everywhere: on the input of every
block and on every residual write (attention and MLP outputs; Gemma-2's post-norm outputs), at
every position, including tokens produced during generation. For k directions the default
``mode="subspace"`` projects onto the orthogonal complement of their span (exact, order-free);
``mode="sequential"`` applies k rank-1 projections one after another in the given order, which is
what the SOM paper's code does (inexact for correlated directions; offered to reproduce it).

Hooks keep autograd intact, so the gradient methods (RDO, cones, RepInd) train through them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from refusal_atlas.core.errors import ConfigError
from refusal_atlas.core.io import vectors_fingerprint
from refusal_atlas.model.adapter import ModelAdapter

AblationMode = Literal["subspace", "sequential"]


def as_matrix(directions) -> torch.Tensor:
    """Accept a DirectionSet, a [d] vector or a [k, d] matrix → [k, d] tensor."""
    vectors = getattr(directions, "vectors", directions)
    if not isinstance(vectors, torch.Tensor):
        raise ConfigError(f"expected a tensor or DirectionSet, got {type(directions).__name__}")
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ConfigError(f"directions must have shape [k, d] with k >= 1, got {tuple(vectors.shape)}")
    return vectors


def orthonormal_basis(directions: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Orthonormal rows spanning the directions (QR in float64; near-dependent rows dropped)."""
    mat = as_matrix(directions)
    q, r = torch.linalg.qr(mat.to(torch.float64).T)
    keep = r.diagonal().abs() > tol * r.diagonal().abs().max().clamp_min(1e-30)
    return q[:, keep].T.to(mat.dtype)


def project_out(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x minus its component in span(basis); ``basis`` rows must be orthonormal.

    Computed in float32 (at least) whatever the model dtype: in bf16 the rounding of ``x @ b.T``
    leaves part of the direction in.
    """
    work = torch.promote_types(x.dtype, torch.float32)
    xw, b = x.to(work), basis.to(device=x.device, dtype=work)
    return (xw - (xw @ b.T) @ b).to(x.dtype)


def project_out_sequential(x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Rank-1 projections applied in order (the SOM paper's multi-direction ablation)."""
    work = torch.promote_types(x.dtype, torch.float32)
    out = x.to(work)
    for d in directions:
        u = d.to(device=x.device, dtype=work)
        u = u / (u.norm() + 1e-8)
        out = out - (out @ u).unsqueeze(-1) * u
    return out.to(x.dtype)


def _make_projector(directions, mode: AblationMode):
    mat = as_matrix(directions)
    if mode == "subspace":
        basis = orthonormal_basis(mat)
        return lambda x: project_out(x, basis.to(x.device))
    if mode == "sequential":
        return lambda x: project_out_sequential(x, mat.to(x.device))
    raise ConfigError(f"unknown ablation mode {mode!r}; choose 'subspace' or 'sequential'")


def _pre_hook(fn):
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs

    return hook


def _post_hook(fn):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    return hook


@contextmanager
def _hooks(registrations: list) -> Iterator[None]:
    handles = []
    try:
        for module, kind, hook in registrations:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _adapter(model) -> ModelAdapter:
    return model if isinstance(model, ModelAdapter) else ModelAdapter(model)


@contextmanager
def ablate(
    model: nn.Module | ModelAdapter,
    directions,
    mode: AblationMode = "subspace",
    layers: Sequence[int] | None = None,
) -> Iterator[None]:
    """Project ``directions`` out of the residual stream (block inputs and residual writes)."""
    adapter = _adapter(model)
    fn = _make_projector(directions, mode)
    regs = []
    for layer in layers if layers is not None else range(adapter.n_layers):
        adapter.check_layer(layer)
        regs += [
            (adapter.layers[layer], "pre", _pre_hook(fn)),
            (adapter.attn_write(layer), "post", _post_hook(fn)),
            (adapter.mlp_write(layer), "post", _post_hook(fn)),
        ]
    with _hooks(regs):
        yield


@contextmanager
def add_activation(
    model: nn.Module | ModelAdapter, vector: torch.Tensor, layer: int, coeff: float = 1.0
) -> Iterator[None]:
    """Add ``coeff * vector`` to the input of block ``layer`` at every position (ActAdd).

    The vector's norm sets the strength (Arditi et al. add the raw difference-in-means); coeff=-1
    subtracts it.
    """
    adapter = _adapter(model)
    adapter.check_layer(layer)
    vec = as_matrix(vector)
    if vec.shape[0] != 1:
        raise ConfigError("activation addition takes one vector")
    delta = coeff * vec[0]
    with _hooks([(adapter.layers[layer], "pre", _pre_hook(lambda x: x + delta.to(x.dtype).to(x.device)))]):
        yield


@contextmanager
def no_intervention() -> Iterator[None]:
    """The baseline, so callers can treat 'no intervention' like any other."""
    yield


class Intervention:
    """A named, reusable intervention: ``with spec.apply(adapter): ...``.

    ``kind``: "none", "ablate" (directions projected out, ``mode`` subspace|sequential) or "actadd"
    (``coeff`` × the first vector added at ``layer``, default the DirectionSet's layer).
    The label names the direction file (``ablate:rdo_b``; the method when the set was not loaded from
    a file) and :meth:`describe` adds its content fingerprint, so two direction files never share a
    metrics row or a completions line.
    """

    def __init__(self, kind: str = "none", directions=None, *, mode: AblationMode = "subspace",
                 layer: int | None = None, coeff: float = 1.0, label: str | None = None):
        if kind not in ("none", "ablate", "actadd"):
            raise ConfigError(f"unknown intervention kind {kind!r}")
        if kind != "none" and directions is None:
            raise ConfigError(f"intervention {kind!r} needs directions")
        self.kind, self.directions, self.mode, self.coeff = kind, directions, mode, coeff
        self.layer = layer if layer is not None else getattr(directions, "layer", None)
        if kind == "actadd" and self.layer is None:
            raise ConfigError("actadd needs a layer")
        self.fingerprint = None if kind == "none" else self._fingerprint()
        self.label = label or self._default_label()

    @property
    def source(self) -> str:
        """The direction file's name (stem) when the set was loaded from one, else its method."""
        return getattr(self.directions, "name", None) or getattr(self.directions, "method", "custom")

    def _fingerprint(self) -> str:
        if hasattr(self.directions, "fingerprint"):
            return self.directions.fingerprint()
        vectors = as_matrix(self.directions)  # hashed as the DirectionSet(vectors, layer or -1, "custom") it is
        if not torch.isfinite(vectors).all():
            raise ConfigError("direction vectors contain NaN or inf")
        return vectors_fingerprint(vectors, list(range(vectors.shape[0])), -1 if self.layer is None else self.layer)

    def _default_label(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "ablate":
            k = as_matrix(self.directions).shape[0]
            return f"ablate:{self.source}" + (f"[k={k},{self.mode}]" if k > 1 else "")
        return f"actadd:{self.source}@{self.layer}x{self.coeff:g}"

    def apply(self, model):
        if self.kind == "none":
            return no_intervention()
        if self.kind == "ablate":
            return ablate(model, self.directions, mode=self.mode)
        return add_activation(model, as_matrix(self.directions)[0], self.layer, self.coeff)

    def describe(self) -> dict:
        d = {"intervention": self.label, "kind": self.kind}
        if self.kind != "none":
            d["method"] = getattr(self.directions, "method", "custom")
            d["directions"] = getattr(self.directions, "name", None)
            d["fingerprint"] = self.fingerprint
            d["layer"] = self.layer
            ids = getattr(self.directions, "ids", None)
            if ids is not None:
                d["direction_ids"] = list(ids)
                d["k"] = len(ids)
        if self.kind == "ablate":
            d["mode"] = self.mode
        if self.kind == "actadd":
            d["coeff"] = self.coeff
        return d
