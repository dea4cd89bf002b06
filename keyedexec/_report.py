"""Where failures that have no caller to return to are reported: logger "keyedexec"."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("keyedexec")


def log_task_error(key: Any, exc: BaseException) -> None:
    """The default ``on_error``: log a fire-and-forget task's exception with its key."""
    logger.error("task for key %r raised", key, exc_info=(type(exc), exc, exc.__traceback__))


def report_failure(what: str, exc: BaseException) -> None:
    """Report an exception nobody can receive (e.g. an ``on_error`` that raised)."""
    logger.error("%s", what, exc_info=(type(exc), exc, exc.__traceback__))
