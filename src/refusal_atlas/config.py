"""Typed settings for a run. Defaults are the embedded CPU demo; a TOML file and CLI flags override.

Data roles follow the held-out rule: train splits build directions, val splits choose among them
(and drive searches), test splits and benchmarks produce the numbers we report.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from refusal_atlas.core.errors import ConfigError


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # model
    model: str = "embedded"
    device: str | None = None
    dtype: str | None = None
    # placement (accelerate): auto|balanced|balanced_low_0|sequential|<file.json>|{module: device}; "0=20GiB,cpu=64GiB"
    device_map: str | dict[str, int | str] | None = None
    max_memory: str | dict[str, str] | None = None
    dtype_fallback: bool = Field(True, description="reload in float32 when the dtype gives non-finite baseline logits")
    backend: Literal["hf", "vllm"] = Field("hf", description="generation engine of the held-out evaluation")
    system_prompt: str | None = Field(None, description="None: the chat template's own default")
    chat_template: str | None = Field(None, description="path to a Jinja chat template, for models without one")
    seed: int = 0
    # 32: on CPU a decoding step reads every weight once whatever the batch, so larger batches amortize
    # it (bench/batch_size.py, 2 cores: generation 0.85x the time of batch 16, identical greedy outputs)
    batch_size: int = Field(32, ge=1)
    # held-out generation only: a decoding step costs about the same for 32 rows as for 100, so one batch of
    # an evaluation set is cheapest (bench/batch_size.py, 2 cores, 100 prompts × 64 tokens: batch 100 took
    # 0.65x the time of batch 32, identical completions); forward passes stay at batch_size (larger is slower)
    generation_batch_size: int = Field(128, ge=1)
    # directions (train split)
    harmful_train: str = "harmful_train"
    harmless_train: str = "harmless_train"
    n_train: int = Field(128, ge=2)
    filter_train: bool = Field(True, description="keep harmful prompts the model refuses / harmless it answers")
    # selection (val split)
    harmful_val: str = "harmful_val"
    harmless_val: str = "harmless_val"
    n_val: int = Field(32, ge=1)
    layers: list[int] | None = Field(None, description="candidate layers; None: floor(L/3) .. 0.8·L")
    positions: list[int] | None = Field([-1], description="post-instruction positions; None: all")
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    prune_layer_frac: float = Field(0.2, ge=0.0, lt=1.0)
    strict_filters: bool = Field(False, description="fail instead of relaxing filters when no candidate passes")
    layer: int | None = Field(None, description="skip selection and use DIM at this layer")
    ablation_mode: Literal["subspace", "sequential"] = "subspace"
    # evaluation (held-out)
    eval_harmful: list[str] = ["jailbreakbench"]
    eval_harmless: str = "harmless_test"
    n_eval: int = Field(100, ge=1)
    # 32 keeps the CPU demo short. Measured (docs/evaluation.md): vs 256 tokens, 32 flips 2/50 baseline
    # verdicts (refusal reads 0.56 instead of 0.60) and no ablated one; 64 flips none. Use 64+ for reports.
    max_new_tokens: int = Field(32, ge=1)
    # a row stops once a refusal phrase appears (its substring verdict cannot change); false: full length
    stop_when_decided: bool = True

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str | None) -> str | None:
        if v not in (None, "auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"):
            raise ValueError("dtype must be float32, bfloat16 or float16 (or auto)")
        return v

    @field_validator("device_map")
    @classmethod
    def _device_map(cls, v):
        from refusal_atlas.model.placement import parse_device_map

        parse_device_map(v)
        return v

    @field_validator("max_memory")
    @classmethod
    def _max_memory(cls, v):
        from refusal_atlas.model.placement import parse_max_memory

        parse_max_memory(v)
        return v

    @field_validator("positions")
    @classmethod
    def _negative_positions(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(p >= 0 for p in v)):
            raise ValueError("positions are negative offsets from the end of the prompt (-1 = last token)")
        return v


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build a RunConfig from an optional TOML file plus overrides (None values are ignored)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML in {path}: {exc}") from None
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return RunConfig(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "config"
        raise ConfigError(f"invalid setting {where}: {first['msg']}") from None
