"""The users file: `users: {NAME: {password_hash, roles, disabled?, claims?}}` with argon2id hashes."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from argon2 import Parameters, PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.users import UserRecord

ROLE = re.compile(r"^[A-Za-z0-9_.:/-]+$")


class _Entry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    password_hash: str = Field(pattern=r"^\$argon2id\$")
    roles: tuple[str, ...] = ()
    disabled: bool = False
    claims: dict[str, Any] = Field(default_factory=dict)

    @field_validator("roles")
    @classmethod
    def _roles(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for role in value:
            if not ROLE.match(role):
                raise ValueError(f"role {role!r} may only use letters, digits and _ . : / -")
        return value


class _File(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    users: dict[str, _Entry] = Field(default_factory=dict)


class UsersFileError(ValueError):
    pass


def hasher() -> PasswordHasher:
    """argon2id with argon2-cffi's defaults (RFC 9106 low-memory profile: t=3, m=64 MiB, p=4)."""
    return PasswordHasher()


class FileUsers:
    def __init__(self, path: str):
        self.path = path
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
            parsed = _File.model_validate(raw)
        except (OSError, yaml.YAMLError, ValidationError) as e:
            raise UsersFileError(f"{path}: {_brief(e)}") from None
        self._users = parsed.users
        self._hasher = hasher()
        # Unknown users are checked against this, so they cost what a real user costs: hashed
        # with the parameters most of the file's hashes use, not merely this version's defaults.
        dummy = _dummy_hasher(parsed.users)
        self._dummy = dummy.hash("not a real password, only spends the same time")

    async def authenticate(self, username: str, password: str) -> UserRecord | None:
        entry = self._users.get(username)
        digest = entry.password_hash if entry else self._dummy
        ok = await asyncio.to_thread(self._verify, digest, password)
        if not ok or entry is None or entry.disabled:
            return None
        return self._record(username, entry)

    def _verify(self, digest: str, password: str) -> bool:
        try:
            return self._hasher.verify(digest, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def current(self, sub: str) -> UserRecord | None | bool:
        entry = self._users.get(sub)
        if entry is None or entry.disabled:
            return None
        return self._record(sub, entry)

    @staticmethod
    def _record(name: str, entry: _Entry) -> UserRecord:
        return UserRecord(name, entry.roles, MappingProxyType(dict(entry.claims)))


def _dummy_hasher(users: dict[str, _Entry]) -> PasswordHasher:
    counts: Counter[str] = Counter()
    seen: dict[str, Parameters] = {}
    for entry in users.values():
        try:
            params = extract_parameters(entry.password_hash)
        except InvalidHashError:
            continue
        seen[repr(params)] = params
        counts[repr(params)] += 1
    if not counts:
        return hasher()
    return PasswordHasher.from_parameters(seen[counts.most_common(1)[0][0]])


def add_user(path: str, name: str, password: str, roles: tuple[str, ...]) -> None:
    """Create or replace a user in the users file (the file is created when missing)."""
    for role in roles:
        if not ROLE.match(role):
            raise UsersFileError(f"role {role!r} may only use letters, digits and _ . : / -")
    p = Path(path)
    data: dict[str, Any] = {}
    if p.exists():
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    users = data.setdefault("users", {})
    entry = dict(users.get(name) or {})
    entry["password_hash"] = hasher().hash(password)
    entry["roles"] = list(roles)
    users[name] = entry
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=True), encoding="utf-8")
    tmp.replace(p)


def _brief(e: Exception) -> str:
    if isinstance(e, ValidationError):
        return "; ".join(
            f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()
        )
    return str(e)
