"""A section of settings as a typed dataclass: each field is the one description of a setting.

Its type (choices as `Literal[...]`), default and help (`setting(default, "help")`) are all
the project says about the setting: values are coerced and checked from them here, the steps'
flags are made from them (cli_args.add_config_flags), and params.yaml holds only values.
components/common/config.py declares the sections of params.yaml on top of this.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal, Sequence

from components.common.params_yaml import ConfigError, shown


def setting(default: Any, help: str):  # noqa: A002 - argparse's word for it
    """A field with its help text (the flag's help, and the key's one explanation)."""
    return dataclasses.field(default=default, metadata={"help": help})


def choices_of(kind) -> tuple[str, ...]:
    """The names a `Literal[...]` field type allows (() for any other type)."""
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else ()


def _coerce(kind, value, where: str):
    """`value` as the field type `kind`: what YAML, argparse and KFP's Struct hand over."""
    if value is None:
        if kind is type(None) or type(None) in typing.get_args(kind):
            return None
        raise ConfigError(f"{where}: a value is required")
    args = typing.get_args(kind)
    if typing.get_origin(kind) is Literal:
        return _choose(args, value, where)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {shown(value)} is not a {kind}")
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {shown(value)}")
        return tuple(_coerce(args[0], v, where) for v in value)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, float) and value.is_integer():  # KFP's Struct: 100 -> 100.0
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        # PyYAML reads 1e-5 (no dot) as a string; argparse and KFP give numbers.
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: {shown(value)} is not a {getattr(kind, '__name__', kind)}")


def _choose(choices: tuple[str, ...], value, where: str) -> str:
    """`value` as one of `choices`. YAML 1.1 (PyYAML) reads unquoted on/off/yes/no/true/false
    as booleans, and DVC writes `on` unquoted when it rewrites params.yaml (`dvc exp run -S`):
    for a key whose choices are on/off, a boolean means those."""
    if isinstance(value, bool) and {"on", "off"} <= set(choices):
        return "on" if value else "off"
    if value not in choices:
        hint = (" (unquoted on/off/yes/no/true/false are booleans in YAML: quote the name)"
                if isinstance(value, bool) else "")
        raise ConfigError(f"{where} = {shown(value)}: must be one of {', '.join(choices)}{hint}")
    return value


def _cut(key: Any) -> str:
    text = str(key)
    return text if len(text) <= 40 else text[:40] + "..."


def check_keys(values: dict, known: Sequence[str], prefix: str, source: str) -> None:
    """Refuse a key nothing reads: a typo (`kubeflow.resorces`) must not be ignored silently."""
    if unknown := sorted(map(str, set(values) - set(known))):
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ConfigError(f"{source}: unknown key {prefix}{_cut(unknown[0])}{more}; "
                          f"known: {', '.join(known)}")


def check_mapping(value, key: str, source: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key} = {shown(value)} is not a mapping of settings")


class Settings:
    """Base of the sections: coercing and checking values, reading a section's dict."""
    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        hints = self.key_types()
        for f in dataclasses.fields(self):
            where = f"{self.SECTION}.{f.name}"
            setattr(self, f.name, _coerce(hints[f.name], getattr(self, f.name), where))
        self.check()

    def check(self) -> None:
        """Raise ConfigError for a value the step cannot use (subclasses add their rules)."""

    @classmethod
    def key_types(cls) -> dict[str, Any]:
        """{key: its type}, the annotations resolved."""
        return typing.get_type_hints(cls)

    @classmethod
    def choices(cls) -> dict[str, tuple[str, ...]]:
        """{key: the names it takes} for the keys that take one of a few names."""
        return {name: c for name, kind in cls.key_types().items() if (c := choices_of(kind))}

    @classmethod
    def from_dict(cls, values: dict, source: str = "arguments"):
        """The config from a section's values (None: the default); unknown keys are errors."""
        values = {} if values is None else values
        check_mapping(values, cls.SECTION, source)
        values = {k: v for k, v in values.items() if v is not None}
        check_keys(values, [f.name for f in dataclasses.fields(cls)], f"{cls.SECTION}.", source)
        try:
            return cls(**values)
        except ConfigError as err:
            raise ConfigError(f"{err} (from {source})") from None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def require(ok: bool, cfg: Settings, key: str, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{cfg.SECTION}.{key} = {shown(getattr(cfg, key))}: {rule}")
