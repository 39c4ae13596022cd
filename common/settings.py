"""Shared plumbing for the per-process config classes: YAML file, environment and flags, in that order
of increasing precedence, built once in cli.main() and validated with messages that name the field."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, CliSettingsSource, PydanticBaseSettingsSource

from common.data import EMBEDDED
from common.errors import ConfigError

S = TypeVar("S", bound=BaseSettings)


class Section(BaseModel):
    """A nested config section; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def _distinct_labels(value: list[str]) -> list[str]:
    if len(value) < 2 or len(set(value)) != len(value):
        raise ValueError("needs at least two distinct labels")
    return value


Labels = Annotated[list[str], AfterValidator(_distinct_labels)]  # class names in index order


class ModelSection(Section):
    """The base model. Agents load it; the coordinator derives the run's model spec from it (its config.json
    is enough there), so both sides must set it alike."""

    path: str = Field(
        EMBEDDED, description="model directory, 'embedded' for MiniLM-L6, 'embedded-llm' for SmolLM2-135M-Instruct"
    )
    name: str = Field(
        "",
        description="the name this base goes by between the coordinator and agents that stay up across runs (a key "
        "of the agents' `models`); default: path",
    )
    task: Literal["auto", "seq-cls", "causal-lm"] = Field(
        "auto", description="seq-cls or causal-lm; auto: causal-lm for embedded-llm and *ForCausalLM models"
    )
    include_mlp: bool = Field(False, description="offer MLP projections as LoRA candidates")
    candidates: list[str] | None = Field(
        None, description="module name suffixes that may carry LoRA, for architectures without a built-in table"
    )


class YamlSource(PydanticBaseSettingsSource):
    """Values from an optional YAML file; an unknown key is rejected by the model (extra="forbid")."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.data: dict[str, Any] = {}
        if path is not None:
            if not path.is_file():
                raise ConfigError(f"--config: {path} does not exist")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"--config: {path} must hold a mapping at the top level")
            self.data = loaded

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        """Unused: __call__ returns the whole mapping."""
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data)


def split_config_flag(argv: Sequence[str]) -> tuple[Path | None, list[str]]:
    """Take `--config FILE` (or `--config=FILE`) out of argv."""
    rest: list[str] = []
    path: Path | None = None
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a file path")
            path = Path(args[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return path, rest


def describe(error: ValidationError) -> str:
    """One line per problem, each naming the dotted field."""
    lines = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "(config)"
        if problem["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown key")
        elif not problem["loc"]:  # a check across fields names its fields in the message
            lines.append(str(problem["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"{field}: {problem['msg']} (got {problem.get('input')!r})")
    return "; ".join(lines)


def build(settings_cls: type[S], argv: Sequence[str], prog: str) -> S:
    """The settings from flags > environment > YAML (--config) > defaults; ConfigError names the field."""
    path, rest = split_config_flag(argv)
    yaml_source = YamlSource(settings_cls, path)

    class _Sourced(settings_cls):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, yaml_source)

    cli: CliSettingsSource[Any] = CliSettingsSource(
        _Sourced, cli_parse_args=rest, cli_prog_name=prog, cli_kebab_case=True, cli_implicit_flags=True
    )
    try:
        built: S = _Sourced(_cli_settings_source=cli)
    except ValidationError as err:
        raise ConfigError(describe(err)) from None
    return built


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of two config mappings; override wins, nested mappings merge key by key."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dump(settings: BaseModel) -> dict[str, Any]:
    """JSON-ready view of a config, for the run directory and logs."""
    return settings.model_dump(mode="json")
