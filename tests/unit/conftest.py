"""Fixtures of the unit tests beyond tests/conftest.py."""

import pytest
from gradient_fixtures import gradient_dim, gradient_parts, gradient_setup  # noqa: F401  (pytest fixtures)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory on a tiny model saved to disk: activations, DIM at layer 2, 3x3 SOM directions.

    Module-scoped: each test module gets its own (tests may add studies and edits to it)."""
    from tiny import TinyLoaded

    from refusal_atlas.settings import load_settings
    from refusal_atlas.directions.som import SomDirections
    from refusal_atlas.model.saving import save_model_dir
    from refusal_atlas.workflows.run import dim_step, extract_step, select_step
    from refusal_atlas.core.rundir import RunDir
    from refusal_atlas.workflows.som import som_step
    from refusal_atlas.workflows.workspace import load_prompt_sets, open_workspace

    root = tmp_path_factory.mktemp("tiny_run")
    tiny = TinyLoaded("qwen2")
    save_model_dir(tiny.model, tiny.tokenizer, root / "model")
    cfg = load_settings(None, dict(model=str(root / "model"), device="cpu", n_train=16, n_val=4, n_eval=4,
                                 max_new_tokens=2, filter_train=False, layer=2))
    ws = open_workspace(cfg, root / "run")
    sets = load_prompt_sets(cfg)
    select_step(ws, dim_step(ws.run, extract_step(ws, sets)), sets)  # fixed layer: no selection run
    som_step(RunDir(root / "run"), SomDirections(grid=(3, 3), iterations=2000))
    return root, ws, sets
