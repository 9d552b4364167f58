"""What the web UI may touch, and the checks its JSON fields pass before any work starts.

Files: only inside `--workdir` or a `--data-dir` folder named on the command line, after symlinks are
resolved (a link inside a data folder that points outside it is refused). Models: those given with
`--model`, or folders inside the workdir (runs the UI started). Anything else is a 403 naming the field;
a field of the wrong type or range is a 400. Relative paths are read from where `posttrain ui` started.
"""

from __future__ import annotations

import re
from pathlib import Path

from posttrain.errors import ConfigError
from posttrain.serve.api import ApiError

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a plain folder name: no separators, no leading dot


class Forbidden(ApiError):
    def __init__(self, message: str, param: str, code: str):
        super().__init__(403, message, "permission_error", param=param, code=code)


class Allowed:
    """The folders and models one `posttrain ui` may use."""

    def __init__(self, workdir: Path, data_dirs=(), models=()):
        for folder in data_dirs:
            if not Path(folder).expanduser().is_dir():
                raise ConfigError(f"--data-dir {folder}: not a folder")
        self.workdir = Path(workdir).expanduser().resolve()
        self.roots = [self.workdir, *(Path(d).expanduser().resolve() for d in data_dirs)]
        self.models = [str(m) for m in models]
        self.model_paths = {Path(m).expanduser().resolve() for m in self.models if Path(m).expanduser().exists()}

    def file(self, value, field: str) -> Path:
        """The resolved path of a file the UI may read or write."""
        value = text_field({field: value}, field)
        real = _resolved(value, field)
        if not any(real.is_relative_to(root) for root in self.roots):
            folders = ", ".join(map(str, self.roots))
            raise Forbidden(f"{field}: {value} is outside the folders this UI may use ({folders}); start posttrain "
                            "ui with --data-dir FOLDER to allow another folder", field, "path_not_allowed")
        return real

    def model(self, value, field: str = "model") -> str:
        """The reference to load: as given when it was given with --model, else the resolved run folder."""
        ref = text_field({field: value}, field)
        if ref in self.models:
            return ref
        real = _resolved(ref, field)
        if real in self.model_paths or (real.is_relative_to(self.workdir) and real.is_dir()):
            return str(real)
        raise Forbidden(f"{field}: {ref!r} is not a model this UI serves: it loads the models given with --model and "
                        f"run folders inside its workdir {self.workdir}", field, "model_not_allowed")


def _resolved(value: str, field: str) -> Path:
    try:
        return Path(value).expanduser().resolve()
    except (ValueError, OSError, RuntimeError) as err:  # a NUL byte, an unknown ~user, a symlink loop
        raise ApiError(400, f"{field}: not a usable path ({err})", param=field) from None


def text_field(body: dict, key: str, default: str | None = None) -> str:
    value = body.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, f"'{key}' must be a non-empty text", param=key)
    return value.strip()


def int_field(body: dict, key: str, default: int, low: int, high: int) -> int:
    """An integer field (a number or its text) within [low, high]; missing or empty: `default`."""
    value = body.get(key)
    if value is None or value == "":
        return default
    try:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ValueError
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ApiError(400, f"'{key}' must be a whole number", param=key) from None
    if not low <= number <= high:
        raise ApiError(400, f"'{key}' must be between {low} and {high}", param=key)
    return number


def run_name(value) -> str | None:
    """A run folder name that stays inside <workdir>/runs; None when none was given."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not RUN_NAME.fullmatch(value):
        raise ApiError(400, "the run name must be a plain folder name: letters, digits, '.', '_' and '-', up to 100 "
                       "characters, not starting with '.'", param="name")
    return value
