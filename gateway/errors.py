"""Why a request gets no generation, in terms of no protocol: each front (gRPC, HTTP) maps the outcome to
its own status once, and bloomduo_requests_total counts it under the same outcome whichever front it came by.
"""

from __future__ import annotations

from typing import ClassVar

from bloomduo.core.metrics import Outcome


class RequestFailed(Exception):
    """The message is for the caller; it says what to do about it where anything can be done."""

    outcome: ClassVar[Outcome]


class ValidationError(RequestFailed, ValueError):
    """A request field breaks a bound; the message starts with the field's name."""

    outcome = Outcome.INVALID_ARGUMENT

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field_name = field_name


class Overloaded(RequestFailed):
    """Too many requests in flight: refused at once rather than queued without bound."""

    outcome = Outcome.OVERLOADED


class Unavailable(RequestFailed):
    """The gateway cannot generate right now (loading, a worker down, shutting down); another try may."""

    outcome = Outcome.UNAVAILABLE
