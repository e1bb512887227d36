"""refusal-atlas: map how a chat model encodes refusal, and switch it off or on.

Research software for interpretability and safety work. The flow is one-way:
data → model → activations → directions → interventions → evaluation → search → report.

The notebook API (``refusal_atlas.api``) is re-exported here, loaded on first use so that
``import refusal_atlas`` (and the CLI's fail-fast checks) never pay for torch:

    from refusal_atlas import Atlas, DIM
    atlas = Atlas.load("embedded")
"""

__version__ = "0.1.0"

__all__ = ["Activations", "Atlas", "DIM", "DirectionSet", "RDO", "SOM", "Search", "__version__", "build_report",
           "prompts"]

_LAZY = {"Activations": "refusal_atlas.api", "Atlas": "refusal_atlas.api", "DIM": "refusal_atlas.api",
         "RDO": "refusal_atlas.api", "SOM": "refusal_atlas.api", "Search": "refusal_atlas.api",
         "prompts": "refusal_atlas.api", "DirectionSet": "refusal_atlas.directions.base",
         "build_report": "refusal_atlas.report.html"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'refusal_atlas' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
