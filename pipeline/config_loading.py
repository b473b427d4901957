"""Loading the config: a YAML file (or a run's saved config.yaml) and `--set KEY=VALUE` overrides merged onto the
defaults, validated as one pipeline.config.Config.

Every problem, pydantic's included, becomes one BadInputError line naming the dotted key (and the file, when the
bad value came from it), before Ray starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline.bounded_yaml import Budget, parse_yaml, read_bounded
from pipeline.config import Config, to_plain
from pipeline.messages import cap
from stages.common.errors import BadInputError
from stages.training.train_settings import CLIP, clip, did_you_mean

MAX_KEY_PARTS = 8  # of an override's dotted key


def load_config(path: Path | None = None, overrides: list[str] = ()) -> Config:
    """Merges `path` onto the defaults, applies `key=value` overrides, and validates the result.

    A file's sections merge into the defaults key by key; every value, a list or the whole `train.search_space`
    included, replaces the default as a whole. An override replaces the one value its dotted key names, so
    `--set train.search_space.dropout=...` changes one entry (null removes it).

    Raises:
      BadInputError: the file cannot be read or parsed, an override is malformed, or any value is invalid; the
        message names the file or the override it came from.
    """
    text = None
    if path is not None:
        try:
            text = read_bounded(Path(path))
        except FileNotFoundError:
            raise BadInputError(f"config file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as error:
            raise BadInputError(f"cannot read config file {path}: {error}") from None
    return _merge(text, str(path) if path is not None else None, overrides)


def load_run_config(config_file: str, overrides: list[str] = ()) -> Config:
    """`load_config` for the config.yaml a run saved (a local path or a URI), as `run --resume` reads it."""
    from stages.common import storage

    try:
        # the run's own file; read_bytes of a URI cannot stop early, parse_yaml refuses what is too big
        text = storage.read_bytes(config_file).decode() if storage.is_uri(config_file) else read_bounded(
            Path(config_file)
        )
    except FileNotFoundError:
        raise BadInputError(f"no run to resume: {config_file} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BadInputError(f"cannot read {config_file}: {error}") from None
    return _merge(text, config_file, overrides)


def _merge(text: str | None, where: str | None, overrides: list[str]) -> Config:
    raw = to_plain(Config())
    budget = Budget()  # one for the file and every override: many small ones add up too
    if text is not None:
        from_file = parse_yaml(text, where, budget)
        if from_file is not None and not isinstance(from_file, dict):
            raise BadInputError(f"{where}: the config must be a mapping of sections, got {type(from_file).__name__}")
        for section, values in (from_file or {}).items():
            if isinstance(values, dict) and isinstance(raw.get(section), dict):
                raw[section].update(values)
            else:
                raw[section] = values
    override_keys = [_apply_override(raw, override, budget) for override in overrides]
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        key, message = describe_validation_error(error, Config)
        # name the file only when the bad value came from it; an override's key speaks for itself
        from_override = any(_related(override_key, key) for override_key in override_keys)
        source = f"{where}: " if where is not None and not from_override else ""
        raise BadInputError(f"{source}{cap(f'{key}: {message}')}") from None


def describe_validation_error(error: ValidationError, schema: type[BaseModel]) -> tuple[str, str]:
    """The dotted key of the first problem, and one line saying what is wrong (and how many more problems)."""
    problems = error.errors()
    first = problems[0]
    key = _dotted(first["loc"])
    if first["type"] == "extra_forbidden":
        parent = _model_at(schema, first["loc"][:-1])
        name = str(first["loc"][-1])
        message = f"unknown key{did_you_mean(name, parent.model_fields) if parent else ''}"
    else:
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "model_type":  # "...instance of TrainSettings" means nothing to a user
            message = "should be a section: a mapping of keys to values"
        if first["type"] not in ("value_error", "assertion_error") and "input" in first:
            message += f" (got {clip(first['input'])})"
        # validators that check a whole section say which key they mean: "validation_size: ..."
        named = re.match(r"([A-Za-z_][\w.]*): ", message)
        if named:
            key, message = f"{key}.{named.group(1)}" if key else named.group(1), message[named.end():]
    more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    return key, message + more


def _related(override_key: str, error_key: str) -> bool:
    """Whether a problem at `error_key` can come from the override of `override_key`."""
    a, b = override_key.split("."), re.split(r"[.\[]", error_key)
    return a[: len(b)] == b[: len(a)]


def _apply_override(raw: dict, override: str, budget: Budget) -> str:
    """Sets the value of one `dotted.key=yaml` override in `raw`; returns the dotted key."""
    key, equals, text = override.partition("=")
    if not equals or not key.strip():
        raise BadInputError(f"--set expects KEY=VALUE (e.g. train.epochs=2), got {clip(override)}")
    shown = _key_text(key)
    parts = key.strip().split(".")
    if len(parts) > MAX_KEY_PARTS:
        raise BadInputError(f"--set {shown}: no setting is {len(parts)} levels deep")
    value = parse_yaml(text, f"--set {shown}", budget) if text.strip() else None
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise BadInputError(f"--set {shown}: {_key_text('.'.join(parts[: depth + 1]))} is a value, not a section")
        node = child
    node[parts[-1]] = value
    return key.strip()


def _dotted(location: tuple) -> str:
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{_key_text(part)}" if text else _key_text(part))
    return text


def _key_text(key: Any) -> str:
    """A key as a message shows it: as it is when short and printable, else clipped (a key can be 1 MB too)."""
    return key if isinstance(key, str) and len(key) <= CLIP and key.isprintable() else clip(key)


def _model_at(schema: type[BaseModel], location: tuple) -> type[BaseModel] | None:
    for part in location:
        field = schema.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        schema = field.annotation
    return schema
