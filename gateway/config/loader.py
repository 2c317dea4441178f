"""YAML -> GatewayConfig, with every problem reported at once as `FILE:LINE:COL: path: message`."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from gateway.config.model import GatewayConfig

Loc = tuple[str | int, ...]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# File-valued keys, resolved relative to the config file's directory.
_FILE_KEYS: tuple[Loc, ...] = (("users", "file"), ("tokens", "signing_key_file"))
_FILE_LIST_KEYS: tuple[Loc, ...] = (("tokens", "verify_key_files"),)


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}:{self.column}: {where}{self.message}"


class ConfigError(Exception):
    """An invalid configuration; `problems` lists every error found, each located."""

    def __init__(self, problems: list[Problem]):
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(slots=True)
class SourceMap:
    """Where each value (and each mapping key) of the document stands in the file."""

    file: str
    values: dict[Loc, yaml.Mark] = field(default_factory=dict)
    keys: dict[Loc, yaml.Mark] = field(default_factory=dict)

    def problem(self, loc: Loc, message: str, *, at_key: bool = False) -> Problem:
        mark = None
        if at_key:
            mark = self.keys.get(loc)
        probe = loc
        while mark is None and probe:
            mark = self.values.get(probe) or self.keys.get(probe)
            probe = probe[:-1]
        mark = mark or self.values.get(())
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        return Problem(self.file, line, col, format_loc(loc), message)


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read, interpolate and validate a config file; raises ConfigError listing every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([Problem(str(p), 1, 1, "", f"cannot read config: {e}")]) from None
    return load_config_text(text, str(p), env=env, base_dir=p.parent)


def load_config_text(
    text: str,
    filename: str = "<config>",
    *,
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> GatewayConfig:
    env = os.environ if env is None else env
    source = SourceMap(filename)
    problems: list[Problem] = []
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        reason = getattr(e, "problem", None) or str(e)
        raise ConfigError([Problem(filename, line, col, "", f"invalid YAML: {reason}")]) from None
    if node is None:
        raise ConfigError([Problem(filename, 1, 1, "", "the config is empty")])
    data = _to_python(node, (), source, env, problems)
    if not isinstance(data, dict):
        problems.append(source.problem((), "the config must be a mapping of sections"))
    if problems:
        raise ConfigError(problems)
    _resolve_files(data, base_dir or Path.cwd())
    problems.extend(_duplicate_route_names(data, source))
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(problems + [_located(err, source) for err in e.errors()]) from None
    problems.extend(_cross_checks(config, source))
    if problems:
        raise ConfigError(problems)
    return config


def _to_python(
    node: yaml.Node, loc: Loc, source: SourceMap, env: Mapping[str, str], problems: list[Problem]
) -> Any:
    source.values[loc] = node.start_mark
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(source.problem(loc, "mapping keys must be plain names"))
                continue
            key = str(key_node.value)
            source.keys[loc + (key,)] = key_node.start_mark
            if key in out:
                problems.append(source.problem(loc + (key,), f"duplicate key {key!r}", at_key=True))
                continue
            out[key] = _to_python(value_node, loc + (key,), source, env, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _to_python(item, loc + (i,), source, env, problems) for i, item in enumerate(node.value)
        ]
    assert isinstance(node, yaml.ScalarNode)
    value = yaml.SafeLoader("").construct_object(node)  # type: ignore[no-untyped-call]
    if isinstance(value, str) and "${" in value:
        value = _interpolate(value, loc, source, env, problems)
    return value


def _interpolate(
    value: str, loc: Loc, source: SourceMap, env: Mapping[str, str], problems: list[Problem]
) -> str:
    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        problems.append(source.problem(loc, f"environment variable {name} is not set"))
        return ""

    return _VAR.sub(sub, value)


def _resolve_files(data: dict[str, Any], base: Path) -> None:
    def resolve(value: object) -> object:
        if isinstance(value, str) and value and not os.path.isabs(value):
            return str((base / value).resolve())
        return value

    for section, key in _FILE_KEYS:
        sec = data.get(section)
        if isinstance(sec, dict) and key in sec:
            sec[key] = resolve(sec[key])
    for section, key in _FILE_LIST_KEYS:
        sec = data.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), list):
            sec[key] = [resolve(v) for v in sec[key]]


def _located(err: Any, source: SourceMap) -> Problem:
    loc: Loc = tuple(err["loc"])
    kind = err["type"]
    msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
        return source.problem(loc, f"unknown key {loc[-1]!r}{hint}", at_key=True)
    if kind == "missing":
        return source.problem(loc, f"required key {loc[-1]!r} is missing")
    if kind == "literal_error":
        msg = f"expected {err['ctx']['expected']}, got {err['input']!r}"
    elif kind.endswith("_type") or kind.endswith("_parsing"):
        msg = f"{msg}, got {type(err['input']).__name__} {err['input']!r}"
    return source.problem(loc, msg)


def _fields_at(loc: Loc) -> list[str]:
    """The keys the model accepts at a location (for `unknown key` hints)."""
    model: Any = GatewayConfig
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part) if isinstance(model, type) else None
        if info is None:
            return []
        model = _model_of(info.annotation)
        if model is None:
            return []
    return sorted(model.model_fields) if isinstance(model, type) else []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _duplicate_route_names(data: dict[str, Any], source: SourceMap) -> list[Problem]:
    routes = data.get("routes")
    if not isinstance(routes, list):
        return []
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for i, route in enumerate(routes):
        name = route.get("name") if isinstance(route, dict) else None
        if not isinstance(name, str):
            continue
        if name in seen:
            problems.append(
                source.problem(
                    ("routes", i, "name"), f"duplicate route name {name!r} (first at routes[{seen[name]}])"
                )
            )
        seen.setdefault(name, i)
    return problems


def _cross_checks(config: GatewayConfig, source: SourceMap) -> list[Problem]:
    problems: list[Problem] = []
    for i, route in enumerate(config.routes):
        prefix = config.auth.prefix
        reserved = ("/healthz", "/readyz", "/.well-known", config.metrics.path)
        if route.path == prefix or route.path.startswith(prefix + "/") or route.path in reserved:
            problems.append(
                source.problem(("routes", i, "path"), f"{route.path} is reserved by the gateway")
            )
    if config.users.file and not os.path.isfile(config.users.file):
        problems.append(source.problem(("users", "file"), f"no such file: {config.users.file}"))
    if config.tokens.signing_key_file and not os.path.isfile(config.tokens.signing_key_file):
        problems.append(
            source.problem(
                ("tokens", "signing_key_file"), f"no such file: {config.tokens.signing_key_file}"
            )
        )
    for i, f in enumerate(config.tokens.verify_key_files):
        if not os.path.isfile(f):
            problems.append(source.problem(("tokens", "verify_key_files", i), f"no such file: {f}"))
    return problems
