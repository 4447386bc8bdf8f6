"""structlog set-up shared by every bloomduo process: one event per line, JSON when not on a terminal."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(service: str, *, json_output: bool | None = None, level: str | None = None) -> None:
    """Route structlog (and stdlib logging) to stderr, one event per line, tagged with the service name.

    json_output defaults to JSON unless stderr is a terminal; BLOOMDUO_LOG_FORMAT=json|console and
    BLOOMDUO_LOG_LEVEL override both defaults.
    """
    fmt = os.environ.get("BLOOMDUO_LOG_FORMAT")
    if json_output is None:
        json_output = fmt == "json" if fmt else not sys.stderr.isatty()
    level_name = (level or os.environ.get("BLOOMDUO_LOG_LEVEL") or "INFO").upper()
    log_level = logging.getLevelNamesMapping().get(level_name, logging.INFO)
    renderer = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(log_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    logging.basicConfig(
        level=max(log_level, logging.WARNING), stream=sys.stderr, format="%(name)s %(message)s"
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
