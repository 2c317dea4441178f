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

from gateway.config.model import GatewayConfig, Tokens

Loc = tuple[str | int, ...]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# File-valued keys, resolved relative to the config file's directory.
_FILE_KEYS: tuple[tuple[str, str], ...] = (("users", "file"), ("tokens", "signing_key_file"))
_FILE_LIST_KEYS: tuple[tuple[str, str], ...] = (("tokens", "verify_key_files"),)
#: More values than any real config has: aliases of aliases can expand a few lines into billions.
_MAX_VALUES = 100_000


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
    #: Values with an unset `${VAR}`: already reported, so their validation errors are not.
    unresolved: set[Loc] = field(default_factory=set)

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


def source_map(path: str | os.PathLike[str]) -> SourceMap:
    """Where each key of a (loadable) config file stands, to locate problems found after
    loading, such as a key file that does not hold a key."""
    source = SourceMap(str(path))
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return source
    if node is not None:
        _to_python(node, (), source, {}, [])
    return source


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
    except RecursionError:
        raise ConfigError([Problem(filename, 1, 1, "", "invalid YAML: nested too deeply")]) from None
    if node is None:
        raise ConfigError([Problem(filename, 1, 1, "", "the config is empty")])
    try:
        data = _to_python(node, (), source, env, problems)
    except RecursionError:
        raise ConfigError([Problem(filename, 1, 1, "", "an alias refers to itself")]) from None
    if not isinstance(data, dict):
        problems.append(source.problem((), "the config must be a mapping of sections"))
        raise ConfigError(problems)
    _resolve_files(data, base_dir or Path.cwd())
    problems.extend(_duplicate_route_names(data, source))
    problems.extend(_reserved_route_paths(data, source))
    problems.extend(_missing_files(data, source))
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as e:
        problems.extend(_located(err, source) for err in e.errors()
                        if not _is_unresolved(tuple(err["loc"]), source))
        raise ConfigError(_in_file_order(problems)) from None
    if problems:
        raise ConfigError(_in_file_order(problems))
    return config


def _is_unresolved(loc: Loc, source: SourceMap) -> bool:
    return any(loc[:n] in source.unresolved for n in range(len(loc) + 1))


def _in_file_order(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.line, p.column))


def _to_python(
    node: yaml.Node, loc: Loc, source: SourceMap, env: Mapping[str, str], problems: list[Problem]
) -> Any:
    source.values[loc] = node.start_mark
    if len(source.values) > _MAX_VALUES:
        raise ConfigError([source.problem(loc, f"more than {_MAX_VALUES} values (aliases?)")])
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
    try:
        value = yaml.SafeLoader("").construct_object(node)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:
        # An unknown tag (`!x`) or a tagged value that is not of its type (`!!int a`).
        reason = getattr(e, "problem", None) or str(e)
        problems.append(source.problem(loc, f"invalid YAML value: {reason}"))
        return None
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
        source.unresolved.add(loc)
        return ""

    return _VAR.sub(sub, value)


def _resolve_files(data: dict[str, Any], base: Path) -> None:
    def resolve(value: object) -> object:
        if isinstance(value, str) and value and not os.path.isabs(value):
            try:
                return str((base / value).resolve())
            except (OSError, ValueError, RuntimeError):  # NUL byte, symlink loop
                return value  # reported as a missing file
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
    elif kind.endswith(("_type", "_parsing")):
        msg = f"{msg}, got {type(err['input']).__name__} {err['input']!r}"
    return source.problem(loc, msg)


def _fields_at(loc: Loc) -> list[str]:
    """The keys the model accepts at a location (for `unknown key` hints)."""
    model: Any = GatewayConfig
    for part in loc:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part) if _is_model(model) else None
        if info is None:
            return []
        model = _model_of(info.annotation)
        if model is None:
            return []
    return sorted(model.model_fields) if _is_model(model) else []


def _is_model(model: object) -> bool:
    return isinstance(model, type) and issubclass(model, BaseModel)


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
    tokens = data.get("tokens")
    audience = tokens.get("audience") if isinstance(tokens, dict) else None
    if audience is None:
        audience = list(Tokens.model_fields["audience"].default)
    audiences = {audience} if isinstance(audience, str) else (
        {a for a in audience if isinstance(a, str)} if isinstance(audience, list) else set())
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
        if name in audiences:
            problems.append(source.problem(
                ("routes", i, "name"),
                f"route name {name!r} is also an access-token audience (tokens.audience): the "
                "route's identity tokens (aud = route name) would pass as access tokens"))
    return problems


def _reserved_route_paths(data: dict[str, Any], source: SourceMap) -> list[Problem]:
    """Routes cannot take the gateway's own paths (checked before validation, so these are
    reported together with every other problem)."""
    routes = data.get("routes")
    if not isinstance(routes, list):
        return []

    def setting(section: str, key: str, default: str) -> str:
        sec = data.get(section)
        value = sec.get(key) if isinstance(sec, dict) else None
        return value.strip() if isinstance(value, str) else default

    prefix = setting("auth", "prefix", "/auth")
    reserved = ("/healthz", "/readyz", "/.well-known", "/.well-known/jwks.json",
                setting("metrics", "path", "/metrics"))
    problems: list[Problem] = []
    for i, route in enumerate(routes):
        path = route.get("path") if isinstance(route, dict) else None
        if not isinstance(path, str):
            continue
        path = path.strip().rstrip("/") or "/"
        if path == prefix or path.startswith(prefix + "/") or path in reserved:
            problems.append(
                source.problem(("routes", i, "path"), f"{path} is reserved by the gateway")
            )
    return problems


def _missing_files(data: dict[str, Any], source: SourceMap) -> list[Problem]:
    problems: list[Problem] = []

    def check(loc: Loc, value: object) -> None:
        if isinstance(value, str) and value and not os.path.isfile(value):
            problems.append(source.problem(loc, f"no such file: {value}"))

    for section, key in _FILE_KEYS:
        sec = data.get(section)
        if isinstance(sec, dict):
            check((section, key), sec.get(key))
    for section, key in _FILE_LIST_KEYS:
        sec = data.get(section)
        values = sec.get(key) if isinstance(sec, dict) else None
        for i, value in enumerate(values if isinstance(values, list) else ()):
            check((section, key, i), value)
    return problems
