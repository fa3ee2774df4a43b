"""A Prometheus exporter per rank: every metric as a gauge `keel_<name>`, labelled by run, rank and host.

A family member `<family>/<member>` is the gauge `keel_<family>_group` with the extra label `group="<member>"`.
"""

from __future__ import annotations

import socket
import time

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from keel.errors import LaunchError
from keel.observe.metrics import FAMILIES, UNITS


def _cannot_listen(host: str, port: int, e: OSError) -> str:
    if isinstance(e, socket.gaierror):
        return f"observe.prometheus_host: cannot resolve {host!r} ({e.strerror}); give an address such as 127.0.0.1"
    return f"observe.prometheus_port: cannot listen on {host}:{port} ({e.strerror}); choose a free port"


def check_ports(host: str, first_port: int, count: int) -> None:
    """Refuse, before any process starts, exporter ports (first_port + local rank) that cannot be listened on."""
    for port in range(first_port, first_port + count):
        try:
            # The address and family start_http_server picks, and like it SO_REUSEADDR (create_server's default).
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            socket.create_server((info[4][0], port), family=info[0]).close()
        except OSError as e:
            raise LaunchError(_cannot_listen(host, port, e)) from None


class PrometheusSink:
    """Serves this rank's latest values over HTTP for Prometheus to scrape; binds to loopback by default."""

    def __init__(self, run: str, rank: int, host: str, port: int):
        self.registry = CollectorRegistry()
        labels = ["run", "rank", "host"]
        self._labels = {"run": run, "rank": str(rank), "host": socket.gethostname()}
        self._gauges = {
            name: Gauge(f"keel_{name}", f"Keel {name} ({unit})", labels, registry=self.registry)
            for name, unit in UNITS.items()
        }
        self._families = {
            family: Gauge(
                f"keel_{family}_group", f"Keel {family} per group ({unit})", [*labels, "group"], registry=self.registry
            )
            for family, unit in FAMILIES.items()
        }
        self._step = Gauge("keel_step", "Last optimizer step recorded", labels, registry=self.registry)
        self._updated = Gauge(
            "keel_last_update_timestamp_seconds",
            "Unix time of the last record (the heartbeat)",
            labels,
            registry=self.registry,
        )
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise LaunchError(_cannot_listen(host, port, e)) from None
        self.port = port

    def write(self, step: int, time_: float, values: dict[str, float]) -> None:
        for name, value in values.items():
            family, _, member = name.partition("/")
            if member:
                self._families[family].labels(**self._labels, group=member).set(value)
            else:
                self._gauges[name].labels(**self._labels).set(value)
        self._step.labels(**self._labels).set(step)
        self._updated.labels(**self._labels).set(time_ or time.time())

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
