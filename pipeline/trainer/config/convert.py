"""YAML + ``key.sub=value`` overrides -> a typed ``TrainConfig``.

``load_config(path, overrides)`` reads the YAML with OmegaConf, merges the overrides, resolves
``${variables.x}`` interpolations and converts the plain dict into the schema's dataclasses with
``from_dict``. Unknown or misspelled keys, missing required keys and wrong types raise ``ConfigError``
naming the dotted key path. OmegaConf's structured configs would do the typing, but they support
neither ``Literal`` choices nor unions such as ``str | int`` (durations), so the conversion is ours.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pipeline.trainer.config.errors import ConfigError
from pipeline.trainer.config.schema import SHAPE_FIELDS, TrainConfig

log = logging.getLogger(__name__)


def load_config(
    path: str | os.PathLike, overrides: list[str] | None = None, world_size: int | None = None
) -> TrainConfig:
    """Read, merge, resolve, convert and check a training YAML.

    With ``model.init_from`` set, the checkpoint defines the model's shape: shape keys written in the
    YAML are not used (one INFO line names them); a shape key given on the command line is kept and
    must match the checkpoint (checked with the run inputs).

    Args:
        path: the YAML file.
        overrides: ``key.sub=value`` strings (OmegaConf dotlist; values parsed as YAML).
        world_size: processes of the run (default: ``$WORLD_SIZE`` as set by the composer launcher, or 1).
    Raises:
        ConfigError: the first problem found, naming its key.
    """
    from pipeline.trainer.config.checks import check_consistency

    path = Path(path)
    overrides = list(overrides or [])
    data, max_seq_len_source = _resolved_yaml(path, overrides)
    _drop_recipe_shape(data, overrides)
    cfg = from_dict(TrainConfig, data)
    check_consistency(cfg, world_size=world_size, max_seq_len_source=max_seq_len_source)
    return cfg


def _resolved_yaml(path: Path, overrides: list[str]) -> tuple[dict[str, Any], Any]:
    """(the YAML merged with the overrides and resolved, as a plain dict; ``max_seq_len`` as written,
    before interpolation, for messages)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not path.is_file():
        raise ConfigError("", f"config file {path} not found")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and OmegaConf errors: report the parser's position
        raise ConfigError("", f"cannot parse {path}: {e}") from None
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError("", f"override {item!r} is not of the form key.sub=value")
    try:
        given = OmegaConf.from_dotlist(overrides)
        for item in overrides:
            # A mapping given for a list (diffusion.noise_interval={4: [...], 8: [...]}) or the other
            # way round replaces the YAML's value: OmegaConf cannot merge the two kinds.
            key = item.split("=", 1)[0]
            kw = dict(throw_on_missing=False, throw_on_resolution_failure=False, default=None)
            old, new = OmegaConf.select(raw, key, **kw), OmegaConf.select(given, key, **kw)
            if (
                OmegaConf.is_config(old)
                and OmegaConf.is_config(new)
                and OmegaConf.is_list(old) != OmegaConf.is_list(new)
            ):
                OmegaConf.update(raw, key, None, merge=False)
        merged = OmegaConf.merge(raw, given)
        data = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        msg = str(e).splitlines()[0]
        if "Missing mandatory value" in msg:
            msg = f"is required ('???' in the YAML): pass {key}=VALUE on the command line"
        else:
            msg = f"{msg} (check the ${{...}} interpolations and the override syntax)"
        raise ConfigError(key, msg) from None
    if not isinstance(data, dict):
        raise ConfigError("", f"{path} must be a mapping of sections, got {type(data).__name__}")
    return data, OmegaConf.to_container(merged, resolve=False).get("max_seq_len")


def _drop_recipe_shape(data: dict[str, Any], overrides: list[str]) -> None:
    """With ``model.init_from`` set, forget the shape keys the YAML file wrote (not the command line's)."""
    model = data.get("model")
    if not isinstance(model, dict) or model.get("init_from") is None:
        return
    explicit = {item.split("=", 1)[0].strip() for item in overrides}
    dropped = [k for k in SHAPE_FIELDS if model.get(k) is not None and f"model.{k}" not in explicit]
    for key in dropped:
        del model[key]
    if dropped:
        log.info(
            "model.init_from is set: the checkpoint's config.json defines the shape; the recipe's %s "
            "were not used",
            ", ".join(f"model.{k}" for k in dropped),
        )


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list (items: {_type_name(typing.get_args(tp)[0])})"
    if origin is tuple:
        args = typing.get_args(tp)
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a section (mapping)"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _convert(value: Any, tp, key: str) -> Any:
    # One branch per kind of annotation the schema uses (union, section, Literal, list, tuple, dict,
    # scalar): long, but each branch reads alone.
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, f"must not be null: expected {_type_name(tp)}")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                if (dataclasses.is_dataclass(arg) or typing.get_origin(arg) is dict) and isinstance(
                    value, dict
                ):
                    raise  # a section (or sections) with a bad key inside: report that key, not the union
                last = e
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}") from last
    if value is None:
        raise ConfigError(key, f"must not be null: expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a section (mapping of keys), got {value!r}")
        return from_dict(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(key, f"must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        args = typing.get_args(tp)
        if not args:
            return dict(value)
        k_tp, v_tp = args
        out = {}
        for k, v in value.items():
            # YAML and dotlist overrides may write integer keys as strings ("4": ...).
            k = int(k) if k_tp is int and isinstance(k, str) and k.isdigit() else k
            out[_convert(k, k_tp, f"{key}.{k}")] = _convert(v, v_tp, f"{key}.{k}")
        return out
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }
    if not ok.get(tp, False):
        raise ConfigError(key, f"expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return float(value) if tp is float else value


def from_dict(cls, data: dict[str, Any], prefix: str = ""):
    """Build dataclass ``cls`` from a plain dict: unknown keys, keys the run sets itself
    (``cls.NOT_IN_YAML``), missing required keys and wrong types raise ``ConfigError`` with the dotted
    key path."""
    hints = typing.get_type_hints(cls)
    derived = getattr(cls, "NOT_IN_YAML", {})
    names = [f.name for f in dataclasses.fields(cls) if f.name not in derived]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key in derived:
            raise ConfigError(path, f"is not a YAML key: the run sets it to {derived[key]}; remove it")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = (
                f"did you mean {prefix + '.' if prefix else ''}{close[0]}?"
                if close
                else f"known keys: {names}"
            )
            raise ConfigError(path, f"unknown key; {hint}")
        kwargs[key] = _convert(value, hints[key], path)
    for f in dataclasses.fields(cls):
        if (
            f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            path = f"{prefix}.{f.name}" if prefix else f.name
            raise ConfigError(
                path,
                f"missing required key ({_type_name(hints[f.name])}): add it to the YAML or pass {path}=...",
            )
    try:
        return cls(**kwargs)
    except ValueError as e:  # a library dataclass validating itself in __post_init__
        first, _, rest = str(e).partition(" ")
        # "top_p must be ..." -> key callbacks.generation.top_p; "noise_interval.8 must ..." -> its entry
        if first.split(".", 1)[0] in names and rest:
            raise ConfigError(f"{prefix}.{first}" if prefix else first, rest) from None
        raise ConfigError(prefix, str(e)) from None
