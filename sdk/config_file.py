"""One TOML file for every fleet command: ``aggregate``, ``device`` and ``simulate`` read the same file.

Layout (keys are the command's flag names, ``-`` or ``_``)::

    [fleet]        # shared: each command takes the keys it has a flag for (broker, fleet, bundle, seed…)
    [aggregate]    # only ``edgetrain aggregate``
    [device]       # only ``edgetrain device``
    [simulate]     # only ``edgetrain simulate``

Keys at the top level, outside any section, count as ``[fleet]`` (the flat experiments/*.toml form).
A command's own section wins over ``[fleet]``; the command line wins over the file. Every key of every
section is checked, whichever command reads the file: a key no command knows is refused, naming the
key and its section. In a shared section, ``devices`` (the fleet's size) is also a device's ``--count``.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from .errors import ConfigError

SHARED_SECTION = "fleet"
TOP_LEVEL = "top level"  # how messages name keys outside any section
# A shared key read under another name by one command: the fleet's size is each device's partition count.
SHARED_ALIASES: Mapping[str, Mapping[str, str]] = {"device": {"devices": "count"}}
_NOT_SETTINGS = {"help", "version", "config", "func", "command"}
MAX_CONFIG_BYTES = 1 << 20  # a config is a page of settings; refuse to parse anything huge


@dataclass(frozen=True)
class ConfigFile:
    """A parsed config file: its shared settings (``[fleet]`` and top-level keys) and one table per command."""

    path: Path
    shared: Mapping[str, Any]
    shared_origin: Mapping[str, str]  # key -> the section it came from ("fleet" or TOP_LEVEL), for messages
    sections: Mapping[str, Mapping[str, Any]]


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE.toml",
                        help="settings from a TOML file: [fleet] shared, then this command's section "
                             "(keys are flag names); flags given here win")


def load_config_file(path: Path, commands: Sequence[str]) -> ConfigFile:
    """Read and sort ``path``'s tables; ConfigError for unreadable TOML or a section no command has."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"--config {path}: larger than {MAX_CONFIG_BYTES} bytes; not a settings file")
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    shared: dict[str, Any] = {}
    origin: dict[str, str] = {}
    sections: dict[str, Mapping[str, Any]] = {}
    for key, value in raw.items():
        if not isinstance(value, dict):
            shared[key], origin[key] = value, TOP_LEVEL
        elif key == SHARED_SECTION:
            for name, item in value.items():
                if name in shared:
                    raise ConfigError(f"--config {path}: {name!r} is set both at the top level and in [fleet]")
                shared[name], origin[name] = item, SHARED_SECTION
        elif key in commands:
            sections[key] = value
        else:
            raise ConfigError(f"--config {path}: unknown section [{key}] (sections: "
                              f"[{SHARED_SECTION}], {', '.join(f'[{c}]' for c in commands)})")
    return ConfigFile(path=path, shared=shared, shared_origin=origin, sections=sections)


def _settings(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in _NOT_SETTINGS and a.option_strings}


def _convert(path: Path, section: str, key: str, value: Any, action: argparse.Action) -> Any:
    """``value`` as the flag would have parsed it; ConfigError names the file, section and key."""
    where = f"--config {path}: [{section}] {key} = {value!r}" if section != TOP_LEVEL else \
        f"--config {path}: {key} = {value!r}"
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    if isinstance(value, (bool, dict, list)):
        raise ConfigError(f"{where}: expected a {'number' if action.type in (int, float) else 'value'} "
                          "as the flag takes")
    if action.type is not None:
        try:
            value = action.type(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    else:
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: choose from {', '.join(map(str, action.choices))}")
    return value


def settings_for(config: ConfigFile, command: str, parsers: Mapping[str, argparse.ArgumentParser]
                 ) -> dict[str, Any]:
    """The settings ``command`` takes from ``config`` as ``{dest: value}``, after checking the whole file
    against every command in ``parsers`` (so a typo fails whichever command reads the file first)."""
    known = {name: _settings(p) for name, p in parsers.items()}
    result: dict[str, Any] = {}
    for key, value in config.shared.items():
        dest = key.replace("-", "_")
        takers = {name for name, actions in known.items()
                  if dest in actions or dest in SHARED_ALIASES.get(name, {})}
        if not takers:
            raise ConfigError(f"--config {config.path}: unknown setting {key!r} in [{config.shared_origin[key]}] "
                              f"(settings are flag names of {', '.join(sorted(parsers))})")
        for name in takers:  # checked for every command, kept for this one
            target = SHARED_ALIASES.get(name, {}).get(dest, dest)
            converted = _convert(config.path, config.shared_origin[key], key, value, known[name][target])
            if name == command:
                result[target] = converted
    for section, table in config.sections.items():
        for key, value in table.items():
            dest = key.replace("-", "_")
            action = known[section].get(dest)
            if action is None:
                raise ConfigError(f"--config {config.path}: unknown setting {key!r} in [{section}] "
                                  f"(edgetrain {section} has no --{dest.replace('_', '-')})")
            converted = _convert(config.path, section, key, value, action)
            if section == command:
                result[dest] = converted
    return result


def parse_with_config(parser: argparse.ArgumentParser, commands: Mapping[str, argparse.ArgumentParser],
                      argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, where the command's ``--config FILE`` supplies the defaults.

    The file's settings become the subcommand's defaults before the real parse, so whatever the
    command line gives wins, even a value equal to the built-in default; a flag argparse requires
    may come from the file instead.
    """
    command = next((a for a in argv if a in commands), None)
    if command is not None and any(a.dest == "config" for a in commands[command]._actions):
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", type=Path)
        given, _ = pre.parse_known_args(argv[argv.index(command) + 1:])
        if given.config is not None:
            readers = {name: p for name, p in commands.items() if any(a.dest == "config" for a in p._actions)}
            settings = settings_for(load_config_file(given.config, list(readers)), command, readers)
            sub = commands[command]
            sub.set_defaults(**settings)
            for action in sub._actions:
                if action.dest in settings:
                    action.required = False
    return parser.parse_args(argv)
