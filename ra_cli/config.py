"""Settings precedence: command-line option > environment variable (RA_MODEL, RA_DEVICE, ...) >
$RA_HOME/config.toml > built-in default.

click (vendored in typer) resolves option > envvar > `default_map` > default, so the config file only has to
become a `default_map`. Top-level keys apply to every command that has that option; a table
named after a command applies to it alone and wins ([ask], [repl], [index], [cache.gc]):

    model = "~/models/qwen2.5-1.5b-instruct-q4_k_m.gguf"
    max_tokens = 400

    [ask]
    top_k = 200

Keys are option names with `_` or `-` (`max_tokens`, `max-tokens`); an unknown key is an error.
"""
from __future__ import annotations

from pathlib import Path


from core.errors import ConfigError


def read_config(home: Path) -> tuple[dict, Path]:
    """The parsed config.toml of the data directory ({} when there is none)."""
    path = home / "config.toml"
    if not path.exists():
        return {}, path
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")), path
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None


def _norm(d: dict) -> dict:
    return {k.replace("-", "_"): v for k, v in d.items()}


def default_map(group, config: dict, path: Path) -> dict:
    """click's default_map for `group` (typer.main.get_command(app)) from a parsed config file."""
    config = _norm(config)
    used: set[str] = set()

    def build(cmd, table: dict, name: str) -> dict:
        params = {p.name for p in cmd.params if p.param_type_name == "option"}
        subcommands = getattr(cmd, "commands", {})
        out = {k: config[k] for k in params if k in config and not isinstance(config[k], dict)}
        used.update(out)
        for k, v in table.items():
            if k in subcommands:
                continue
            if k not in params:
                raise ConfigError(f"{path}: [{name}] has no setting {k!r}")
            out[k] = v
        for sub_name, sub in subcommands.items():
            sub_table = _norm(table.get(sub_name, {})) if isinstance(table.get(sub_name), dict) else {}
            out[sub_name] = build(sub, sub_table, f"{name}.{sub_name}")
        return out

    result = {}
    for name, cmd in group.commands.items():
        table = config.get(name)
        result[name] = build(cmd, _norm(table) if isinstance(table, dict) else {}, name)
    for k, v in config.items():
        if isinstance(v, dict):
            if k not in group.commands:
                raise ConfigError(f"{path}: unknown command table [{k}]")
        elif k not in used:
            raise ConfigError(f"{path}: unknown setting {k!r}")
    return result
