"""The opt-in metrics endpoint: `GET /metrics` in Prometheus text format, over HTTPS, on
`--metrics-listen HOST:PORT` (README, "Monitoring"; server/DESIGN.md, "Metrics").

Only the node command imports this module, and only when metrics_listen is set: nothing else
listens, and prometheus-client (the optional extra `raftsql[metrics]`) is needed only here.
The figures are read when a scrape comes: the node's counters and histograms
(server/metrics.py), Node.status() and the transport, through one custom collector; plus
prometheus-client's process collector (CPU, memory, open descriptors).

TLS as everywhere else: the node presents its own certificate and requires a client certificate
from the cluster's CA, with a raftsql role (any client role, or a node's) and not revoked.
Prometheus scrapes it with `scheme: https` and a `tls_config` naming such a certificate (a
`--role read` client certificate is enough). At most MAX_SCRAPES connections are served at
once; more are closed at once, so a flood of scrapers costs a few threads, not one each.
"""

from __future__ import annotations

import http.server
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

from raftsql.server import metrics
from raftsql.server.config import ConfigError
from raftsql.server.tls import peer_identity, server_context

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector
    from prometheus_client import generate_latest as _generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )
except ImportError:  # pragma: no cover - the error says how to install it
    CollectorRegistry = None  # type: ignore[assignment,misc]

log = logging.getLogger("raftsql.metrics")

MAX_SCRAPES = 16
HANDSHAKE_TIMEOUT = 5.0
ROLES = ("leader", "follower", "candidate", "pre_candidate")


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class NodeCollector:
    """A prometheus-client collector that reads one node when it is scraped."""

    def __init__(self, node: Any):
        self.node = node

    def collect(self) -> Iterator[Any]:
        node = self.node
        st = node.status()
        figs = metrics.figures(node, st)
        nid = node.cfg.id

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["node"])
            g.add_metric([nid], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["node"])
            c.add_metric([nid], value)
            return c

        role = GaugeMetricFamily("raftsql_role", "1 for this node's Raft role, 0 for the others.",
                                 labels=["node", "role"])
        for r in ROLES:
            role.add_metric([nid, r], 1.0 if st["role"] == r else 0.0)
        yield role
        yield gauge("raftsql_learner", "1 if this node is a learner (it does not vote).",
                    1.0 if nid in st["learners"] else 0.0)
        yield gauge("raftsql_term", "The current Raft term.", st["term"])
        yield counter(metrics.LEADER_CHANGES.name, metrics.LEADER_CHANGES.doc,
                      figs[metrics.LEADER_CHANGES.name])
        yield gauge("raftsql_commit_index", "The highest log index known to be committed.",
                    st["commit_index"])
        yield gauge("raftsql_applied_index", "The highest log index applied to SQLite.",
                    st["applied_index"])
        yield gauge("raftsql_last_log_index", "The last index in this node's log.", st["last_index"])
        yield gauge("raftsql_snapshot_index", "The index the log is compacted to.",
                    st["snapshot_index"])
        yield gauge("raftsql_log_entries", "Entries in the log after the snapshot index.",
                    figs["log_entries"])
        yield gauge("raftsql_log_bytes", "Bytes of the log's segment files.", figs["log_bytes"])
        yield counter(metrics.PROPOSALS.name, metrics.PROPOSALS.doc, figs[metrics.PROPOSALS.name])
        yield counter(metrics.APPLIED_ENTRIES.name, metrics.APPLIED_ENTRIES.doc,
                      figs[metrics.APPLIED_ENTRIES.name])
        yield counter(metrics.FOREIGN_PEERS.name, metrics.FOREIGN_PEERS.doc,
                      figs[metrics.FOREIGN_PEERS.name])
        for h in metrics.HISTOGRAMS:
            cumulative, total, _ = h.snapshot()
            fam = HistogramMetricFamily(h.name, h.doc, labels=["node"])
            fam.add_metric([nid], [(_le(b), c) for b, c in cumulative], sum_value=total)
            yield fam
        lag = GaugeMetricFamily("raftsql_peer_lag_entries",
                                "On the leader: the leader's last index minus the peer's match "
                                "index (entries the peer has not acknowledged).",
                                labels=["node", "peer"])
        for peer, n in sorted(figs["peer_lag_entries"].items()):
            lag.add_metric([nid, peer], n)
        yield lag
        connected = GaugeMetricFamily("raftsql_peer_connected",
                                      "1 while this node's stream to the peer is connected.",
                                      labels=["node", "peer"])
        dropped = CounterMetricFamily("raftsql_peer_dropped_messages",
                                      "Raft messages to the peer dropped (queue full or "
                                      "reconnecting); Raft resends what matters.",
                                      labels=["node", "peer"])
        for peer, p in sorted((st.get("peers") or {}).items()):
            connected.add_metric([nid, peer], 1.0 if p.get("connected") else 0.0)
            dropped.add_metric([nid, peer], p.get("dropped") or 0)
        yield connected
        yield dropped
        yield gauge("raftsql_client_connections", "Client connections open now.",
                    figs["client_connections"])
        refusals = CounterMetricFamily("raftsql_client_refusals", metrics.REFUSALS.doc,
                                       labels=["node", "reason"])
        counts = figs[metrics.REFUSALS.name]
        for reason in ("permission", "revoked", "connection_limit"):
            refusals.add_metric([nid, reason], counts.get(reason, 0))
        yield refusals
        yield gauge("raftsql_revoked_certificates", "Entries in the replicated deny list.",
                    figs["revoked_certificates"])
        snap = st.get("snapshot") or {}
        for key, doc in (("taken", "Snapshots this node took."),
                         ("installed", "Snapshots this node installed from the leader."),
                         ("received", "Snapshot transfers this node received whole."),
                         ("rejected", "Snapshot transfers this node rejected (damaged)."),
                         ("take_failures", "Snapshots that failed to be taken.")):
            yield counter(f"raftsql_snapshots_{key}", doc, snap.get(key) or 0)


def check_available() -> None:
    """Raise ConfigError (a one-line message) if prometheus-client is not installed."""
    if CollectorRegistry is None:
        raise ConfigError("--metrics-listen needs prometheus-client: pip install 'raftsql[metrics]'")


def make_registry(node: Any) -> Any:
    check_available()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    ProcessCollector(registry=registry)
    return registry


def generate_latest(registry: Any) -> bytes:
    return _generate_latest(registry)


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "raftsql-metrics"
    timeout = 10  # a scraper that stops mid-request frees its place
    registry: Any = None

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics is served here")
            return
        body = generate_latest(self.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        log.debug("%s: " + format, self.address_string(), *args)


class MetricsServer:
    """HTTPS on `listen`: GET /metrics for certificates of the cluster's CA (see above)."""

    def __init__(self, node: Any, listen: tuple[str, int], certs_dir: str, node_id: str,
                 is_revoked: Callable[[str | None, str | None], bool]):
        self._registry = make_registry(node)
        self._ctx = server_context(certs_dir, node_id)
        self._is_revoked = is_revoked
        self._listen = listen
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        handler = type("Handler", (_Handler,), {"registry": self._registry})
        self._handler = handler

    @property
    def address(self) -> tuple[str, int]:
        assert self._sock is not None
        return self._sock.getsockname()[:2]

    def start(self) -> None:
        host, port = self._listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._sock = socket.create_server((host, port), family=family, backlog=64)
        except OSError as e:
            raise ConfigError(f"metrics_listen {host}:{port}: {e.strerror or e}") from None
        self._sock.settimeout(1.0)
        self._thread = threading.Thread(target=self._accept_loop, name="metrics-accept",
                                        daemon=True)
        self._thread.start()
        log.info("metrics on https://%s:%d/metrics", *self.address)

    def stop(self) -> None:
        self._stopped.set()
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(2.0)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopped.is_set():
            try:
                raw, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopped.is_set():
                    return
                continue
            if not self._slots.acquire(blocking=False):
                raw.close()  # MAX_SCRAPES busy: a scraper retries at its next interval
                continue
            threading.Thread(target=self._serve, args=(raw, addr), name="metrics-conn",
                             daemon=True).start()

    def _serve(self, raw: socket.socket, addr: Any) -> None:
        try:
            raw.settimeout(HANDSHAKE_TIMEOUT)
            try:
                tls = self._ctx.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError) as e:
                log.debug("metrics: TLS handshake with %s failed: %s", addr, e)
                return
            try:
                why = self._refusal(tls)
                if why is not None:
                    log.info("metrics: refused %s: %s", addr, why)
                    tls.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n"
                                b"Connection: close\r\n\r\n")
                    return
                self._handler(tls, addr, self)
            except (OSError, ssl.SSLError) as e:
                log.debug("metrics: connection from %s: %s", addr, e)
            finally:
                try:
                    tls.close()
                except OSError:
                    pass
        finally:
            raw.close()
            self._slots.release()

    def _refusal(self, tls: ssl.SSLSocket) -> str | None:
        who = peer_identity(tls)
        if who.role is None:
            return "the certificate has no raftsql role"
        if who.role == "client" and who.client_role is None:
            return "the certificate has conflicting client roles"
        if self._is_revoked(who.name, who.serial):
            return f"certificate {who.name!r} (serial {who.serial}) is revoked"
        return None
