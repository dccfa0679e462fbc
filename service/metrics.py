"""Prometheus metrics: requests and latency by route template, bytes in and out, and (read from
the database at scrape time) jobs by state and stored vs logical bytes.

Each app gets its own :class:`~prometheus_client.CollectorRegistry`, so several apps can live
in one process (tests) without clashing.

Several API processes (``slim serve --workers N``): the supervisor points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before it starts them, so every process
writes its counters and histograms there and a scrape — answered by whichever process the
kernel hands the connection — sums them all (:meth:`Metrics.exposition`). The
``slim_api_process_requests`` counter keeps one series per process id, so an operator sees how
requests spread over the processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from storage.models import JobState
from storage.repo import stats

UNMATCHED = "<unmatched>"
#: Where prometheus_client keeps the values of every process when several share the metrics.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """The app's metric families."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.pid = str(os.getpid())
        self._database: DatabaseCollector | None = None
        self.requests = Counter(
            "slim_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "slim_http_request_duration_seconds",
            "Time from request to the last byte of the answer, by route template.",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=self.registry,
        )
        self.bytes_in = Counter(
            "slim_http_received_bytes",
            "Request body bytes received, by route template.",
            ["route"],
            registry=self.registry,
        )
        self.bytes_out = Counter(
            "slim_http_sent_bytes",
            "Response body bytes sent, by route template.",
            ["route"],
            registry=self.registry,
        )
        self.process_requests = Counter(
            "slim_api_process_requests",
            "HTTP requests answered, by the API process (pid) that answered them.",
            ["pid"],
            registry=self.registry,
        )

    def watch_database(self, sessions: sessionmaker[Session]) -> None:
        self._database = DatabaseCollector(sessions)
        self.registry.register(self._database)

    def exposition(self) -> bytes:
        """The text format of every metric: this process's, or with ``PROMETHEUS_MULTIPROC_DIR``
        set, every API process's summed (the database figures once either way)."""
        directory = os.environ.get(MULTIPROCESS_ENV)
        if not directory:
            return bytes(generate_latest(self.registry))
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        if self._database is not None:
            registry.register(self._database)
        return bytes(generate_latest(registry))


class DatabaseCollector(Collector):
    """Jobs by state, checkpoints by state, and storage totals, queried at scrape time."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("slim_database_up", "Whether the last scrape reached the database.")
        try:
            with self.sessions() as session:
                totals = stats(session)
        except SQLAlchemyError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("slim_jobs", "Jobs by state.", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], totals.jobs_by_state.get(state.value, 0))
        yield jobs
        ckpts = GaugeMetricFamily("slim_checkpoints", "Checkpoints by state.", labels=["state"])
        for state_name, count in sorted(totals.checkpoints_by_state.items()):
            ckpts.add_metric([state_name], count)
        yield ckpts
        yield GaugeMetricFamily(
            "slim_logical_bytes",
            "Bytes the stored models would take as plain files.",
            value=totals.logical_bytes,
        )
        yield GaugeMetricFamily(
            "slim_stored_bytes",
            "Bytes the referenced blobs take (each distinct blob once).",
            value=totals.stored_bytes,
        )
        yield GaugeMetricFamily("slim_bases", "Bases.", value=totals.num_bases)
        yield GaugeMetricFamily("slim_blobs", "Referenced blobs.", value=totals.num_blobs)


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP request by the route template it matched."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        received = sent = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            route = _route_template(scope)
            method = scope.get("method", "")
            m = self.metrics
            m.requests.labels(method, route, str(status)).inc()
            m.process_requests.labels(m.pid).inc()
            m.latency.labels(method, route).observe(time.perf_counter() - started)
            if received:
                m.bytes_in.labels(route).inc(received)
            if sent:
                m.bytes_out.labels(route).inc(sent)


def _route_template(scope: MutableMapping[str, Any]) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED
