"""Settings from four layers: command line > ``HARVESTER_<NAME>`` variables > a TOML file >
the dataclass defaults, each value tagged with where it came from (``harvester config show``).

Nothing here lists the settings: they are the options of the command's argparse parser (its
``dest`` is the key, so ``--max-in-play`` is ``max_in_play`` and ``HARVESTER_MAX_IN_PLAY``),
and values from a file or the environment go through the option's own ``type`` and
``choices``, then through the same settings dataclass as the command line's. A new option is a
new key with no change here. Options that are not settings: ``--json`` (the output of this one
invocation), ``--config`` itself, and those whose help is suppressed (internal).
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError

ENV_PREFIX = "HARVESTER_"
CONFIG_ENV = "HARVESTER_CONFIG"  # the file to read when --config is not given
SOURCES = ("default", "file", "env", "cli")
NOT_SETTINGS = frozenset(("help", "version", "json", "config", "command", "config_command"))
# Never a setting anywhere: the token comes only from MASSIVE_API_TOKEN or --token-file.
_SECRET_KEYS = frozenset(("token", "api_token", "massive_api_token"))
_TRUE = frozenset(("1", "true", "yes", "on"))
_FALSE = frozenset(("0", "false", "no", "off", ""))
_UNSET: Any = object()  # the default of every setting while finding what the command line set


@dataclass(frozen=True)
class Resolved:
    """The effective settings of one command, and where each came from."""

    args: argparse.Namespace  # the parsed command line with every setting's effective value
    sources: dict[str, str]  # key -> one of SOURCES
    where: dict[str, str]  # key -> the file or the variable, for "file" and "env"
    config_file: Path | None


def leaf_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The (sub)parser that parsed the chosen command, like ``config show`` or ``run``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                return leaf_parser(action.choices[chosen], args)
    return parser


def setting_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's options that are settings, by key (their ``dest``), in declared order."""
    return {
        action.dest: action
        for action in parser._actions
        if action.option_strings
        and action.dest not in NOT_SETTINGS
        and action.help is not argparse.SUPPRESS
        and not isinstance(action, argparse._HelpAction | argparse._VersionAction)
    }


def resolve(
    parser: argparse.ArgumentParser,
    argv: list[str],
    args: argparse.Namespace,
    *,
    environ: Mapping[str, str] | None = None,
    keys_elsewhere: Callable[[], set[str]] = set,
) -> Resolved:
    """Merge the layers into ``args`` (which ``parser`` made from ``argv``).

    ``keys_elsewhere`` gives the keys of the other commands: a ``HARVESTER_*`` variable meant
    for one of them (``HARVESTER_STEP_SECONDS`` while running ``run``) is left alone, while
    one no command knows is an error, as a typo in a scheduler's environment should be.
    """
    environ = os.environ if environ is None else environ
    leaf = leaf_parser(parser, args)
    actions = setting_actions(leaf)
    on_cli = _given_on_cli(parser, argv, actions)
    config_file = getattr(args, "config", None)
    if config_file is None and environ.get(CONFIG_ENV):
        config_file = Path(environ[CONFIG_ENV])
    from_file = _file_layer(config_file, actions) if config_file is not None else {}
    from_env = _env_layer(environ, actions, keys_elsewhere)
    sources: dict[str, str] = {}
    where: dict[str, str] = {}
    for key, action in actions.items():
        if key in on_cli:
            sources[key] = "cli"
        elif key in from_env:
            sources[key] = "env"
            where[key], value = from_env[key]
            setattr(args, key, value)
        elif key in from_file:
            sources[key] = "file"
            where[key] = str(config_file)
            setattr(args, key, from_file[key])
        else:
            sources[key] = "default"
            setattr(args, key, action.default)
    _one_of_each_group(leaf, args, actions, sources, where)
    return Resolved(args, sources, where, config_file)


def _one_of_each_group(
    leaf: argparse.ArgumentParser,
    args: argparse.Namespace,
    actions: dict[str, argparse.Action],
    sources: dict[str, str],
    where: dict[str, str],
) -> None:
    """Options that exclude each other (``--rates`` or ``--ramp``) are one setting: the
    highest layer that sets any of them decides, and the lower layers' members are dropped."""
    rank = SOURCES.index
    for group in leaf._mutually_exclusive_groups:
        keys = [a.dest for a in group._group_actions if a.dest in actions]
        top = max((rank(sources[key]) for key in keys), default=0)
        for key in keys:
            if 0 < rank(sources[key]) < top:
                sources[key] = "default"
                where.pop(key, None)
                setattr(args, key, actions[key].default)


def _given_on_cli(
    parser: argparse.ArgumentParser, argv: list[str], actions: dict[str, argparse.Action]
) -> set[str]:
    """The keys the command line set: ``argv`` parsed again with every default unset.

    Parsing again (rather than scanning ``argv`` for option names) keeps argparse's own
    rules: abbreviations, ``--opt=value``, the last of repeated options.
    """
    saved = {key: action.default for key, action in actions.items()}
    try:
        for action in actions.values():
            action.default = _UNSET
        again, _ = parser.parse_known_args(argv)
    finally:
        for key, action in actions.items():
            action.default = saved[key]
    return {key for key in actions if getattr(again, key, _UNSET) is not _UNSET}


def _nearest(key: str, keys: list[str]) -> str:
    return (difflib.get_close_matches(key, keys, n=1, cutoff=0.0) or keys)[0]


def _file_layer(path: Path, actions: dict[str, argparse.Action]) -> dict[str, Any]:
    """The settings of a TOML file, each parsed as the command line would; unknown keys fail."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc.strerror})") from exc
    except UnicodeDecodeError:
        raise UsageError(f"--config {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {path}: not valid TOML ({exc})") from exc
    values = {}
    for key, raw in document.items():
        if key in _SECRET_KEYS:
            raise UsageError(
                f"{path}: {key!r} is not a setting: the token comes only from "
                "MASSIVE_API_TOKEN or --token-file, never from a config file"
            )
        if key not in actions:
            raise UsageError(
                f"{path}: unknown key {key!r}; the nearest valid key is "
                f"{_nearest(key, list(actions))!r}"
            )
        values[key] = convert(actions[key], raw, f"{path}: {key}")
    return values


def _env_layer(
    environ: Mapping[str, str],
    actions: dict[str, argparse.Action],
    keys_elsewhere: Callable[[], set[str]],
) -> dict[str, tuple[str, Any]]:
    """``HARVESTER_<KEY>`` variables, by key: (the variable, its parsed value)."""
    values = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key in _SECRET_KEYS:
            raise UsageError(
                f"{name} is not a setting: the token comes only from MASSIVE_API_TOKEN or "
                "--token-file"
            )
        if key not in actions:
            if key in keys_elsewhere():
                continue  # another command's setting, set for that command
            nearest = ENV_PREFIX + _nearest(key, list(actions)).upper()
            raise UsageError(f"{name}: unknown setting {key!r}; the nearest valid one is {nearest}")
        values[key] = (name, convert(actions[key], raw, name))
    return values


def convert(action: argparse.Action, raw: object, where: str) -> Any:
    """``raw`` (a TOML value or a variable's text) as the option's parser takes it, or a
    one-line UsageError naming ``where``."""
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise UsageError(f"{where}: must be true or false (got {raw!r})")
    if isinstance(raw, list | dict):
        raise UsageError(f"{where}: must be a single value, not a list or table")
    if action.type is None and not isinstance(raw, str):
        raise UsageError(f"{where}: must be a string (got {raw!r})")
    text = raw if isinstance(raw, str) else str(raw).lower() if isinstance(raw, bool) else str(raw)
    value: Any = text
    if callable(action.type):
        try:
            value = action.type(text)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"{where}: {exc}") from None
        except (TypeError, ValueError):
            kind = {int: "a whole number", float: "a number"}.get(action.type, "a valid value")  # type: ignore[call-overload]
            raise UsageError(f"{where}: must be {kind} (got {text!r})") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise UsageError(f"{where}: must be one of {choices} (got {text!r})")
    return value


def shown(value: object) -> object:
    """A setting's value as JSON shows it: paths and shards as their text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
