"""The scikit-learn shape every direction estimator shares (DESIGN.md).

Hyper-parameters go to ``__init__`` and are stored under their own names, as given, with no work
done there (checks run in ``fit``), so ``get_params()`` can read them back off ``__init__``'s
signature and ``type(e)(**e.get_params())`` is the same unfitted estimator. ``fit`` returns
``self``; what it learned lives in attributes ending in ``_``, which do not exist before ``fit``:
reading one raises :class:`~refusal_atlas.core.errors.NotFittedError` naming the estimator, rather
than a bare AttributeError or a None that fails later.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from refusal_atlas.core.errors import ConfigError, NotFittedError


class Estimator:
    """Base class: ``get_params``/``set_params``, a readable ``repr`` and the not-fitted error.

    A subclass lists the attributes its ``fit`` sets in ``fitted_attributes`` (each ends in ``_``).
    """

    fitted_attributes: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def param_names(cls) -> list[str]:
        """The hyper-parameters: ``__init__``'s named parameters, in order."""
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self) -> dict[str, Any]:
        """The hyper-parameters as given to ``__init__`` (or ``set_params``)."""
        return {name: getattr(self, name) for name in self.param_names()}

    def set_params(self, **params: Any) -> Estimator:
        """Change hyper-parameters (they take effect at the next ``fit``); unknown names are an error."""
        unknown = sorted(set(params) - set(self.param_names()))
        if unknown:
            raise ConfigError(f"{type(self).__name__} has no hyper-parameter {', '.join(unknown)} "
                              f"(it has {', '.join(self.param_names())})")
        for name, value in params.items():
            setattr(self, name, value)
        return self

    @property
    def is_fitted(self) -> bool:
        return all(name in vars(self) for name in self.fitted_attributes)

    def __getattr__(self, name: str) -> Any:  # only called when normal lookup fails
        if name in type(self).fitted_attributes:
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit(...) before reading {name}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"
