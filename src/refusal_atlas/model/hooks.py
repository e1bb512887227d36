"""Forward hooks with one removable handle: the only place that registers them on a model.

Everything that reads or rewrites the residual stream (edits, activation capture, the prefix pass's
hidden-state capture, RepInd's representation capture) registers hooks here, so each follows the
same rules: a hook sees the module's *hidden state* (a block's first argument or its
``hidden_states`` keyword; a module's output, or the first element of an output tuple) and returns
its replacement, or None to leave it unchanged; and every hook registered through one :class:`Hooks`
is removed together, by :meth:`Hooks.remove` or on leaving its ``with`` block, also when the block
raised or a registration failed part-way. A hook left behind would silently edit every later pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

HiddenFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def _input_hook(fn: HiddenFn):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            new = fn(args[0])
            return None if new is None else ((new, *args[1:]), kwargs)
        if "hidden_states" not in kwargs:
            return None
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})

    return hook


def _around_hook(fn: Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = args[0] if args else kwargs.get("input", kwargs.get("hidden_states"))
        if isinstance(output, tuple):
            new = fn(x, output[0])
            return None if new is None else (new, *output[1:])
        return fn(x, output)

    return hook


def _output_hook(fn: HiddenFn):
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            new = fn(output[0])
            return None if new is None else (new, *output[1:])
        return fn(output)

    return hook


class Hooks:
    """A group of forward hooks, removed together.

    ``Hooks().inputs(module, fn).outputs(module, fn)`` registers (in that order: hooks on one module
    run in registration order); ``remove()`` or leaving ``with Hooks() as hooks: ...`` removes all of
    them. Registering inside the ``with`` block is what makes a failure part-way safe.
    """

    def __init__(self) -> None:
        self._handles: list = []

    def inputs(self, module: nn.Module, fn: HiddenFn) -> Hooks:
        """Call ``fn`` on the hidden state ``module`` is given, before it runs; its result replaces it."""
        self._handles.append(module.register_forward_pre_hook(_input_hook(fn), with_kwargs=True))
        return self

    def outputs(self, module: nn.Module, fn: HiddenFn) -> Hooks:
        """Call ``fn`` on the hidden state ``module`` returns; its result replaces it."""
        self._handles.append(module.register_forward_hook(_output_hook(fn)))
        return self

    def around(self, module: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]) -> Hooks:
        """Call ``fn(input, output)`` after ``module`` ran (its hidden-state input and output); its result
        replaces the output. For edits that add a function of a module's input to what it writes (a low-rank
        update ``B·A·x`` of a projection)."""
        self._handles.append(module.register_forward_hook(_around_hook(fn), with_kwargs=True))
        return self

    def reparametrize(self, module: nn.Module, attr: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Hooks:
        """Read ``module.<attr>`` (a parameter) as ``fn(parameter)`` until removed: for a change inside a module
        that calls no sub-module to hook (fused experts multiply by their ``down_proj`` tensor directly). The
        stored parameter is never written, and on removal the same parameter object is back."""
        from torch.nn.utils import parametrize

        added = _Reparametrization(fn)
        parametrize.register_parametrization(module, attr, added, unsafe=True)
        self._handles.append(_ParametrizationHandle(module, attr, added))
        return self

    def remove(self) -> None:
        """Remove every hook of this group (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class _Reparametrization(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class _ParametrizationHandle:
    """Removes one reparametrization, leaving any other on the same parameter (nested edits) in place."""

    def __init__(self, module: nn.Module, attr: str, added: nn.Module):
        self.module, self.attr, self.added = module, attr, added

    def remove(self) -> None:
        from torch.nn.utils import parametrize

        chain = self.module.parametrizations[self.attr]
        if len(chain) > 1:
            del chain[next(i for i, p in enumerate(chain) if p is self.added)]
        else:
            parametrize.remove_parametrizations(self.module, self.attr, leave_parametrized=False)


def hook_inputs(module: nn.Module, fn: HiddenFn) -> Hooks:
    """One input hook (see :meth:`Hooks.inputs`), as a handle to remove or a ``with`` block."""
    return Hooks().inputs(module, fn)


def hook_outputs(module: nn.Module, fn: HiddenFn) -> Hooks:
    """One output hook (see :meth:`Hooks.outputs`), as a handle to remove or a ``with`` block."""
    return Hooks().outputs(module, fn)
