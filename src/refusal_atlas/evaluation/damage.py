"""Damage metrics: how much an intervention changes the model on harmless inputs."""

from __future__ import annotations

import torch


def next_token_kl(base_logprobs: torch.Tensor, new_logprobs: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-prompt KL(P_base ‖ P_new) of the next-token distribution (float64, Arditi's epsilon)."""
    p = base_logprobs.to(torch.float64).exp()
    q = new_logprobs.to(torch.float64).exp()
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(dim=-1)
