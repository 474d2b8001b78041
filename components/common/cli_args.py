"""One flag style for every command: `--snake_case`, as the paper repository's `train.py`
spells its flags (`--train_csv`, `--out_dir`). Every flag also answers to its dashed spelling
(`--train-csv`), which help does not list.

Every step takes its settings from params files the same way:

    --params params.yaml                 the full params file (default: ./params.yaml if any)
    --params_file params.demo.yaml ...   partial files merged over it, in order

and `params_paths(args)` is the list of files to hand to config.load_params. A step's flags
for its section's keys are made from its config dataclass (`add_config_flags`), and every
command that overrides params keys takes them one way: `-S/--set SECTION.KEY=VALUE`
(`add_set_flag`).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

from components.common.config import PARAMS_FILE, ConfigError, parse_yaml
from components.common.settings import Settings, choices_of


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Lists each option under its first (snake_case) spelling only (--x, --no-x for a
    boolean)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or len(action.option_strings) == 1:
            return super()._format_action_invocation(action)
        if isinstance(action, argparse.BooleanOptionalAction):
            return ", ".join(action.option_strings[:2])
        first = argparse.Action(action.option_strings[:1], action.dest, nargs=action.nargs,
                                choices=action.choices, metavar=action.metavar)
        return super()._format_action_invocation(first)


def _dashed(option: str) -> str | None:
    """--train_csv -> --train-csv (None when there is no underscore)."""
    if option.startswith("--") and "_" in option[2:]:
        return "--" + option[2:].replace("_", "-")
    return None


class _Aliasing:
    """add_argument that registers the dashed alias of every snake_case option."""

    def add_argument(self, *names, **kwargs):
        aliases = [d for d in map(_dashed, names) if d and d not in names]
        return super().add_argument(*names, *aliases, **kwargs)

    def add_argument_group(self, *args, **kwargs):
        group = _Group(self, *args, **kwargs)
        self._action_groups.append(group)
        return group

    def add_mutually_exclusive_group(self, **kwargs):
        group = _Exclusive(self, **kwargs)
        self._mutually_exclusive_groups.append(group)
        return group


class _Group(_Aliasing, argparse._ArgumentGroup):
    pass


class _Exclusive(_Aliasing, argparse._MutuallyExclusiveGroup):
    pass


class ArgumentParser(_Aliasing, argparse.ArgumentParser):
    """argparse with the project's flag style (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        # No abbreviations: a retired flag (`--param`) must be refused, not taken for
        # another that it happens to begin (`--params_file`).
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def add_params_flags(parser: argparse.ArgumentParser) -> None:
    """--params FILE and --params_file FILE... (see the module docstring)."""
    parser.add_argument("--params", metavar="FILE",
                        help=f"params file (default: ./{PARAMS_FILE} when there is one)")
    parser.add_argument("--params_file", action="append", metavar="FILE",
                        help="partial params file merged over it (repeatable)")


def add_config_flags(parser, cls: type[Settings]) -> None:
    """A flag for every key of the section `cls` that `parser` does not have yet, made from
    its field: `--key` with the field's help and type; a Literal's names as choices; a bool
    as --key/--no-key; a tuple as comma-separated values (16,32,48,64); a union (bool | str,
    int | str) read as YAML (true, 3, auto). Unset, each is None: the params files' value
    stands (StepConfig.resolve)."""
    for field in dataclasses.fields(cls):
        option = f"--{field.name}"
        if option in parser._option_string_actions:  # a step's own flag for it
            continue
        kind = cls.key_types()[field.name]
        kwargs: dict[str, Any] = {"help": field.metadata["help"].replace("%", "%%"),
                                  "default": None}
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        tuple_ = next((t for t in (kind, *args) if typing.get_origin(t) is tuple), None)
        if choices := choices_of(kind):
            kwargs["choices"] = choices
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif tuple_ is not None:
            kwargs.update(type=_comma_list(typing.get_args(tuple_)[0]), metavar="A,B,...")
        elif len(args) > 1:  # int | str, bool | str: as a params file would read it
            kwargs["type"] = _yaml_value
            if bool in args:
                kwargs.update(nargs="?", const=True)
        else:
            kwargs["type"] = kind
        parser.add_argument(option, **kwargs)


# argparse names a flag's type function in its error: `invalid comma-separated value: 'a,b'`
def _comma_list(item: type):
    def read(text: str) -> tuple:
        return tuple(item(v) for v in text.split(","))
    read.__name__ = f"comma-separated {item.__name__}"
    return read


def _yaml_value(text: str) -> Any:
    return parse_yaml(text, "the value")


_yaml_value.__name__ = "YAML"


def config_flags(args: argparse.Namespace, cls: type[Settings]) -> dict[str, Any]:
    """{key: the flag's value} for the section's keys (None where the flag was not given)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}


def params_paths(args: argparse.Namespace) -> list[str]:
    """The params files the flags name, base first (see the module docstring)."""
    base = args.params or (PARAMS_FILE if Path(PARAMS_FILE).is_file() else None)
    return [p for p in (base, *(args.params_file or ())) if p]


def os_error(err: OSError) -> str:
    """An OSError as one line, the path first (`out/train: Read-only file system`), instead of
    a traceback or `[Errno 30] ...`."""
    if err.filename is None or not err.strerror:
        return str(err)
    return f"{err.filename}: {err.strerror}"


def add_set_flag(parser: argparse.ArgumentParser, help: str) -> None:  # noqa: A002
    """`-S/--set SECTION.KEY=VALUE` (repeatable, into args.set): every command's overrides of
    params keys, one grammar (dvc exp run's -S); parse_assignment reads each."""
    parser.add_argument("-S", "--set", action="append", default=[], dest="set",
                        metavar="SECTION.KEY=VALUE", help=f"{help} (repeatable; the value is "
                        f"read as YAML: 2, 0.005, true, [1, 2])")


def parse_assignment(item: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (KEY, VALUE read as YAML: `2` an int, `0.005` a float, `true` a bool),
    by the params files' loader (no aliases); a ConfigError for a value it cannot read."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"-S {item!r}: expected SECTION.KEY=VALUE")
    return key, parse_yaml(raw, f"-S {key}") if raw != "" else ""


def set_dotted(params: dict, dotted: str, value: Any, add: bool = False) -> None:
    """params[a][b] = value for `a.b`; the key must exist unless `add` (dvc's `-S +a.b=v`)."""
    node = params
    *parents, leaf = dotted.split(".")
    for key in parents:
        if add and node.get(key) is None:
            node[key] = {}
        if not isinstance(node.get(key), dict):
            raise ConfigError(f"{dotted}: {key!r} is not a section of params.yaml")
        node = node[key]
    if leaf not in node and not add:
        raise ConfigError(f"{dotted}: no such key in params.yaml")
    node[leaf] = value
