"""``GET /status``: what an operator (or a load balancer) needs to see at a glance, as JSON.

The report itself is assembled by :class:`mtad.status.StatusReporter`; this module only serves it, so the
same report can be printed by the CLI or exported as metrics.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest


class StatusReport(Protocol):
    def report(self) -> Deferred[dict[str, Any]]: ...


class StatusApp:
    """The status endpoint; answers 200 when Redis and SQL answer, 503 otherwise."""

    app = Klein()

    def __init__(self, reporter: StatusReport) -> None:
        self._reporter = reporter

    @app.route("/status", methods=["GET"])
    async def status(self, request: IRequest) -> bytes:
        report = await self._reporter.report()
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        healthy = report.get("redis", {}).get("reachable") and report.get("database", {}).get("reachable")
        request.setResponseCode(200 if healthy else 503)  # type: ignore[no-untyped-call]
        return json.dumps(report, indent=2, sort_keys=True).encode("utf-8") + b"\n"
