"""The `chat` job: the original and an edited model of a run, as conversations that stream their answers.

The terminal loop (reading lines, slash commands, printing) is the CLI's; this module checks the run and
the edit before the model loads, then builds one :class:`~refusal_atlas.model.conversation.Conversation`
per side.
"""

from __future__ import annotations

from pathlib import Path

from refusal_atlas.core.errors import ArtifactError, ConfigError


def check_chat_run(run_dir: Path, directions: str) -> Path:
    """Fail before the model loads: a run directory with the direction file → its path."""
    if not (run_dir / "manifest.json").is_file():
        raise ArtifactError(f"{run_dir} is not a run directory (no manifest.json); run `refusal-atlas run` first")
    path = run_dir / "directions" / f"{directions}.safetensors"
    if not path.is_file():
        found = sorted(p.stem for p in (run_dir / "directions").glob("*.safetensors"))
        raise ArtifactError(f"no direction file {directions!r} in {run_dir} (available: {', '.join(found) or 'none'})")
    return path


def chat_sides(run_dir: Path, directions: str = "dim", edit: str = "ablate", max_new_tokens: int = 128,
               only_edited: bool = False) -> list[tuple[str, object]]:
    """(label, Conversation) for the original model (unless ``only_edited``) and the model under ``edit``
    (ablate, actadd or actadd:<coeff> of the direction file), in the run's chat format and system prompt."""
    path = check_chat_run(run_dir, directions)  # before any heavy import: a mistyped -r answers in milliseconds
    from refusal_atlas.directions.base import DirectionSet
    from refusal_atlas.evaluation.evaluate import check_interventions, parse_interventions

    check_interventions([edit])
    if edit == "none":
        raise ConfigError("--edit none would chat with the original model twice; use ablate or actadd")
    if max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be >= 1")
    from refusal_atlas.model.conversation import Conversation
    from refusal_atlas.workflows.workspace import reopen_workspace

    ws = reopen_workspace(run_dir)
    spec = parse_interventions([edit], DirectionSet.load(path), mode=ws.settings.selection.ablation_mode)[0]

    def side(intervention):
        return Conversation(ws.adapter, ws.chat.tokenizer, intervention, ws.settings.model.system_prompt,
                            max_new_tokens)

    sides: list[tuple[str, object]] = [] if only_edited else [("original", side(None))]
    sides.append((f"edited {spec.label}", side(spec)))
    return sides
