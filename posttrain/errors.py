"""User-facing errors: the CLI prints these as one line and exits with code 2."""

import json


class PosttrainError(Exception):
    """A problem the user can fix (bad config, bad data, missing model); never a bug."""


class ConfigError(PosttrainError):
    """Unknown key, wrong type or inconsistent values in a run config."""


class DataError(PosttrainError):
    """A malformed file or row; the message names file, row/line and field."""


class TemplateError(PosttrainError):
    """A chat template that cannot render or label a conversation safely."""


class ModelSourceError(PosttrainError):
    """A model name or path that cannot be resolved or loaded."""


def http_error_text(err) -> str:
    """'HTTP 404: <message>' from an OpenAI-style error body (a urllib HTTPError), else 'HTTP 404'."""
    try:
        message = json.loads(err.read())["error"]["message"]
    except Exception:  # noqa: BLE001 - any body that is not OpenAI's error shape
        return f"HTTP {err.code}"
    return f"HTTP {err.code}: {message}"
