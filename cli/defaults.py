"""Where a command's settings come from, and the files that give them.

Order, strongest first: the command line, ``--config FILE`` (TOML or YAML: any option of the
command, lists for a sweep's grid), ``FEATCACHE_*`` environment variables, ``featcache.toml`` in
the working directory (the encoders, data set and folders a project always uses, plus optional
``[align]``/``[sweep]``/... tables), then the built-in defaults. File and environment values go
through click's ``default_map`` (typer's own copy of click, hence no click import here), so
they are parsed and checked exactly as flags are. Every run
records in config.json where each of its settings came from (``setting_sources``).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from featcache.cache.errors import FeatcacheError

PROJECT_FILE = "featcache.toml"
# What featcache.toml and the environment may set for every command that has the option.
SHARED = ("image_model", "text_model", "dataset", "cache_dir", "runs_dir")
ENVIRONMENT = {"image_model": "FEATCACHE_IMAGE_MODEL", "text_model": "FEATCACHE_TEXT_MODEL",
               "dataset": "FEATCACHE_DATASET"}  # --cache-dir and --runs-dir read theirs when resolved
ORIGINS = "featcache_origins"  # ctx.meta key: option name -> the file or variable that gave it


def read_settings(path: Path) -> dict:
    """A TOML or YAML mapping of option names (``image-model`` or ``image_model``) to values."""
    try:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except (OSError, UnicodeDecodeError) as err:
        raise FeatcacheError(f"cannot read the settings file {path}: {err}", "check the path") from None
    except Exception as err:  # tomllib.TOMLDecodeError, yaml.YAMLError: the file's own syntax
        raise FeatcacheError(f"{path} is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'TOML'}: "
                             f"{str(err).splitlines()[0]}", "fix the line it names") from None
    if not isinstance(data, dict):
        raise FeatcacheError(f"{path} holds no table of settings", "write one setting per line: name = value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def as_option(name: str, value):
    """A file value as the command line would give it: lists joined (';' between layer choices)."""
    if isinstance(value, list):
        return (";" if name == "layers" else ",").join(str(v).lower() if isinstance(v, bool) else str(v)
                                                       for v in value)
    return value


def _commands(group, prefix: tuple = ()):
    """(path, command) of every command under a group (typer carries its own click: duck-typed)."""
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


def project_defaults(ctx) -> None:
    """Put featcache.toml's and the environment's values into ``ctx.default_map`` for every
    command that has the option (called by the app's callback, before the command parses)."""
    path = Path(PROJECT_FILE)
    shared, tables, origins = {}, {}, {}
    if path.is_file():
        for key, value in read_settings(path).items():
            if isinstance(value, dict):
                tables[key] = {k.replace("-", "_"): v for k, v in value.items()}
            elif key in SHARED:
                shared[key], origins[key] = value, PROJECT_FILE
            else:
                raise FeatcacheError(f"{PROJECT_FILE}: {key!r} is not a setting it can hold",
                                     f"top level: {', '.join(SHARED)}; others go in a table per command, "
                                     "such as [sweep]")
    for key, var in ENVIRONMENT.items():
        if os.environ.get(var):
            shared[key], origins[key] = os.environ[var], var
    if not (shared or tables):
        return
    default_map: dict = {}
    for path_, cmd in _commands(ctx.command):
        names = {p.name for p in cmd.params}
        values = {k: as_option(k, v) for k, v in shared.items() if k in names}
        table = tables.get(path_[-1], {})
        unknown = sorted(set(table) - names)
        if unknown:
            raise FeatcacheError(f"{PROJECT_FILE} [{path_[-1]}]: no option {', '.join(unknown)}",
                                 f"see featcache {' '.join(path_)} --help")
        values.update({k: as_option(k, v) for k, v in table.items()})
        origins.update({k: f"{PROJECT_FILE} [{path_[-1]}]" for k in table})
        node = default_map
        for part in path_[:-1]:
            node = node.setdefault(part, {})
        node[path_[-1]] = values
    ctx.default_map = default_map
    ctx.meta[ORIGINS] = origins


def load_config(ctx, param, value: str | None):
    """``--config FILE`` (an eager option): its values become this command's defaults, over
    featcache.toml's and the environment's, under the command line's."""
    if not value:
        return value
    path = Path(value)
    settings = read_settings(path)
    names = {p.name for p in ctx.command.params} - {param.name}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise FeatcacheError(f"{path}: no option {', '.join(unknown)} in featcache {ctx.info_name}",
                             f"see featcache {ctx.info_name} --help")
    ctx.default_map = {**(ctx.default_map or {}), **{k: as_option(k, v) for k, v in settings.items()}}
    ctx.meta[ORIGINS] = {**ctx.meta.get(ORIGINS, {}), **{k: str(path) for k in settings}}
    return value


def setting_sources(ctx) -> dict[str, str]:
    """Option name -> where its value came from: ``command line``, a file or variable, ``default``."""
    origins = ctx.meta.get(ORIGINS, {})
    out = {}
    for p in ctx.command.params:
        source = getattr(ctx.get_parameter_source(p.name), "name", None)  # by name: typer may bring its own click
        if source == "COMMANDLINE":
            out[p.name] = "command line"
        elif source == "DEFAULT_MAP":
            out[p.name] = origins.get(p.name, "settings file")
        elif source == "ENVIRONMENT":
            out[p.name] = "environment"
        else:
            out[p.name] = "default"
    for name, var in (("cache_dir", "FEATCACHE_CACHE_DIR"), ("runs_dir", "FEATCACHE_RUNS_DIR")):
        if out.get(name) == "default" and os.environ.get(var):
            out[name] = var
    return out
