"""A params file's YAML, read safely: the loader under components.common.config.load_params.

PyYAML's safe loader still expands aliases (a billion-laughs file of a few lines becomes
billions of values), recurses once per nesting level and keeps the last of two equal keys
silently; a params file needs none of that, so `parse_yaml` refuses it, and every error is
one line naming the file and line, never echoing a huge value (`shown`).
"""
from __future__ import annotations

import copy
import os
import reprlib
import subprocess
from pathlib import Path
from typing import Any

import yaml

# A params file is a few kilobytes, three levels deep (kubeflow.resources.train.cpu): these
# bounds refuse a hostile one before it costs time or memory.
MAX_PARAMS_BYTES = 64 << 10  # params.yaml, comments and all, is under 8 KiB
MAX_DEPTH = 8


class ConfigError(ValueError):
    """A params file or setting that cannot be used; the message names key, value and source."""


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 40
_short.maxlevel = 2


def shown(value: Any) -> str:
    """`value`'s repr, cut short: an error message never echoes a huge value."""
    return _short.repr(value)


def deep_merge(base: dict, override: dict) -> dict:
    """`override` over `base`, recursively for dicts; neither input is modified."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that a params file must not hold."""

    def __init__(self, problem: str, mark) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader without what a params file never needs: anchors and aliases (a
    few lines of them expand to billions of values), nesting deeper than MAX_DEPTH (the
    composer recurses) and a key given twice (YAML keeps the last one silently)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused("anchors and aliases (&, *) are not allowed in a params file",
                           event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _Refused(f"key {shown(key)} is given twice", key_node.start_mark)
                seen.add(key)
            except TypeError:  # unhashable: SafeConstructor says so below
                break
        return super().construct_mapping(node, deep)


def _too_big(source: str) -> ConfigError:
    return ConfigError(f"{source} is over {MAX_PARAMS_BYTES >> 10} KiB: not a params file")


def parse_yaml(text: str, source: str) -> Any:
    """A params file's text (or an `-S` value) as Python values, through _ParamsLoader;
    one line naming `source` and the line for anything it cannot read."""
    if len(text) > MAX_PARAMS_BYTES:  # PyYAML reads about 70 KiB a second
        raise _too_big(source)
    try:
        return yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = "" if isinstance(err, _Refused) else "not valid YAML at "
        problem = str(err.problem or err.context)[:160]
        raise ConfigError(f"{source}: {what}{where}{problem}") from None
    except (yaml.YAMLError, ValueError) as err:  # ValueError: an int of over 4300 digits
        raise ConfigError(f"{source}: not valid YAML: {shown(str(err))}") from None


def read_text(path: str | os.PathLike) -> str:
    """A params file's text: a ConfigError naming it when it is missing, unreadable, not
    UTF-8 or larger than a params file can be."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_PARAMS_BYTES:
            raise _too_big(f"params file {path}")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"params file {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"params file {path} is not UTF-8 text: {err}") from None
    except OSError as err:
        raise ConfigError(f"params file {path} cannot be read: {err.strerror}") from None


def committed_text(path: str | os.PathLike) -> str | None:
    """The file's text at git HEAD (what experiments and pipelines start from), or None outside
    a git checkout (an installed image) or when the file is not committed."""
    path = Path(path)
    try:
        return subprocess.run(["git", "show", f"HEAD:./{path.name}"], cwd=path.parent,
                              capture_output=True, text=True, check=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
