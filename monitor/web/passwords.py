"""Password hashing (argon2id, argon2-cffi's defaults) and reading a new password without it ever being a
command-line argument (visible in `ps` and shell history) or being logged."""

from __future__ import annotations

import getpass
import os
import sys

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from monitor.errors import ConfigError

MIN_LENGTH = 10
_hasher = PasswordHasher()
# verified against when the user does not exist, so an unknown name takes as long as a wrong password
_DUMMY = _hasher.hash("not-a-real-password-0")


def hash_password(password: str) -> str:
    if len(password) < MIN_LENGTH:
        raise ConfigError(f"a password needs at least {MIN_LENGTH} characters")
    return _hasher.hash(password)


def check_password(stored_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash or _DUMMY, password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def read_new_password(*, from_stdin: bool, from_env: str | None) -> str:
    """From standard input (one line), from a named environment variable, or typed twice at a prompt."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif from_env:
        password = os.environ.get(from_env, "")
        if not password:
            raise ConfigError(f"environment variable {from_env} is not set or empty")
    else:
        if not sys.stdin.isatty():
            raise ConfigError("no terminal to ask for the password: use --password-stdin or --password-env NAME")
        password = getpass.getpass("New password: ")
        if getpass.getpass("Repeat it: ") != password:
            raise ConfigError("the two passwords differ")
    if len(password) < MIN_LENGTH:
        raise ConfigError(f"a password needs at least {MIN_LENGTH} characters")
    return password
