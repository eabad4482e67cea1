"""Node settings from a TOML file, environment variables and command-line flags (in rising
precedence). Every bad value is reported as ConfigError naming the setting and its source."""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

# Defaults, chosen for failover within about 0.4 s on a loaded 2-core machine (see
# server/DESIGN.md): a heartbeat every 50 ms, and an election after 200-400 ms without one. A
# follower must miss four heartbeats in a row before it even asks for pre-votes; PreVote and
# CheckQuorum keep one slow follower from disturbing a healthy leader.
DEFAULT_TICK_MS = 25
DEFAULT_HEARTBEAT_TICKS = 2
DEFAULT_ELECTION_TICKS = 8


@dataclass(frozen=True)
class TestHooks:
    """Faults a test harness may switch on in a node process: the one seam through which tests
    reach into a running node (raftsql/testing starts nodes with these variables set). Read
    once, from the environment, by load(); all off unless a RAFTSQL_TEST_* variable is set."""

    # RAFTSQL_TEST_BROKEN_READS=1: linearizable reads skip the ReadIndex round (the fault
    # tests' checker must then find a stale read: tests/faults, --broken-reads).
    broken_reads: bool = False
    # RAFTSQL_TEST_CORRUPT_SNAPSHOTS=N: the first N snapshot transfers send a damaged chunk.
    corrupt_snapshot_transfers: int = 0
    # RAFTSQL_TEST_SNAPSHOT_CHUNK_DELAY_MS: a pause between snapshot chunks (slow transfers).
    snapshot_chunk_delay_s: float = 0.0
    # RAFTSQL_TEST_BROKEN_TXN_VALIDATION=1: a transaction's commit applies without comparing
    # its statements' outcomes with what the client saw (the fault tests' transaction checker
    # must then find anomalies: tests/faults, benchmarks/faults.py --broken-txn-validation).
    # Every node of a cluster must have it, or their databases diverge.
    broken_txn_validation: bool = False
    # RAFTSQL_TEST_LEADERLESS_HINT_S: how long without a leader before the node's log says what
    # usually causes it (Node._leaderless_hint; 30 s otherwise).
    leaderless_hint_s: float = 30.0

    @classmethod
    def from_env(cls, env: dict[str, str]) -> TestHooks:
        try:
            return cls(
                broken_reads=env.get("RAFTSQL_TEST_BROKEN_READS") == "1",
                corrupt_snapshot_transfers=int(env.get("RAFTSQL_TEST_CORRUPT_SNAPSHOTS", "0")),
                snapshot_chunk_delay_s=float(env.get("RAFTSQL_TEST_SNAPSHOT_CHUNK_DELAY_MS", "0")) / 1000,
                broken_txn_validation=env.get("RAFTSQL_TEST_BROKEN_TXN_VALIDATION") == "1",
                leaderless_hint_s=float(env.get("RAFTSQL_TEST_LEADERLESS_HINT_S", "30")),
            )
        except ValueError as e:
            raise ConfigError(f"a RAFTSQL_TEST_* variable is not a number: {e}") from None


@dataclass
class NodeConfig:
    id: str
    data_dir: str
    listen: tuple[str, int]
    peers: dict[str, tuple[str, int]]  # the other initial voters
    certs_dir: str
    tick_ms: int = DEFAULT_TICK_MS
    heartbeat_ticks: int = DEFAULT_HEARTBEAT_TICKS
    election_ticks: int = DEFAULT_ELECTION_TICKS
    max_frame_size: int = 64 * 1024 * 1024
    max_request_size: int = 4 * 1024 * 1024  # wire.DEFAULT_MAX_REQUEST_SIZE: see there
    session_timeout_ms: int = 6 * 3600 * 1000
    query_timeout_s: float = 10.0
    request_timeout_s: float = 10.0  # the longest a client request may wait
    # Connections (server/transport.py, DESIGN.md "Connections"): client connections past the
    # hello (node certificates are not counted), a client frame's first-to-last-byte limit,
    # and an optional limit on a client connection's silence between requests (None: none).
    max_client_connections: int = 1024
    frame_timeout_s: float = 30.0
    client_idle_timeout_s: float | None = None
    advertise: str | None = None  # host:port clients should use; default: listen address
    extra: dict[str, Any] = field(default_factory=dict)
    # The cluster's first voters, the base every CONF_CHANGE applies to. Empty: id + peers.
    # Set from DATA_DIR/membership.json (server/membership.py), so a joined node knows them too.
    bootstrap_voters: tuple[str, ...] = ()
    # Log compaction (server/snapshot.py): snapshot after this many entries or bytes of entry
    # data, and compact only once this many more are applied after the snapshot.
    snapshot_entries: int = 10_000
    snapshot_bytes: int = 64 << 20
    snapshot_trailing: int = 5_000
    # Durable log entries the core keeps in memory; older ones are read back from the log store.
    log_cache_bytes: int = 32 << 20
    # SQLite's hard heap limit for the node process (sqlite3_hard_heap_limit64): past it an
    # allocation fails with SQLITE_NOMEM instead of growing the process until the kernel kills
    # it. A read gets the error; a write's entry is applied again without the limit
    # (server/DESIGN.md, "Heap limit"). 0: no limit.
    sqlite_heap_limit: int = 1 << 30
    # Writes at durability "leader" answered before their quorum and not yet known committed,
    # at most (server/DESIGN.md, "Leader durability"): what a leader crash can lose. 0: every
    # write waits for its quorum.
    max_unreplicated_writes: int = 64
    # Record when each write passes each stage (raftsql/trace.py; benchmarks/breakdown.py).
    trace: bool = False
    # Where Prometheus scrapes this node's metrics over HTTPS (server/metrics_http.py); None:
    # no metrics server at all (nothing listens).
    metrics_listen: tuple[str, int] | None = None
    hooks: TestHooks = field(default_factory=TestHooks)  # off, unless a test harness sets them

    def voters(self) -> tuple[str, ...]:
        return tuple(sorted(self.bootstrap_voters or {self.id, *self.peers}))



_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def valid_node_id(text: str) -> bool:
    """Letters, digits, '-' and '_', at most 63, not starting with '-' or '_'."""
    return bool(_ID.match(text))

# setting -> (type, environment variable)
SETTINGS: dict[str, tuple[type, str]] = {
    "id": (str, "RAFTSQL_ID"),
    "data_dir": (str, "RAFTSQL_DATA_DIR"),
    "listen": (str, "RAFTSQL_LISTEN"),
    "advertise": (str, "RAFTSQL_ADVERTISE"),
    "peers": (dict, "RAFTSQL_PEERS"),  # env: "n2=127.0.0.1:4002,n3=127.0.0.1:4003"
    "certs": (str, "RAFTSQL_CERTS"),
    "tick_ms": (int, "RAFTSQL_TICK_MS"),
    "heartbeat_ticks": (int, "RAFTSQL_HEARTBEAT_TICKS"),
    "election_ticks": (int, "RAFTSQL_ELECTION_TICKS"),
    "max_frame_size": (int, "RAFTSQL_MAX_FRAME_SIZE"),
    "max_request_size": (int, "RAFTSQL_MAX_REQUEST_SIZE"),
    "session_timeout_ms": (int, "RAFTSQL_SESSION_TIMEOUT_MS"),
    "query_timeout_s": (float, "RAFTSQL_QUERY_TIMEOUT_S"),
    "request_timeout_s": (float, "RAFTSQL_REQUEST_TIMEOUT_S"),
    # Connections (server/DESIGN.md, "Connections"); client_idle_timeout_s unset: no idle limit
    "max_client_connections": (int, "RAFTSQL_MAX_CLIENT_CONNECTIONS"),
    "frame_timeout_s": (float, "RAFTSQL_FRAME_TIMEOUT_S"),
    "client_idle_timeout_s": (float, "RAFTSQL_CLIENT_IDLE_TIMEOUT_S"),
    # Log compaction (server/DESIGN.md, "Snapshots and InstallSnapshot")
    "snapshot_entries": (int, "RAFTSQL_SNAPSHOT_ENTRIES"),
    "snapshot_bytes": (int, "RAFTSQL_SNAPSHOT_BYTES"),
    "snapshot_trailing": (int, "RAFTSQL_SNAPSHOT_TRAILING"),
    "log_cache_bytes": (int, "RAFTSQL_LOG_CACHE_BYTES"),  # server/DESIGN.md, "Bounded log memory"
    "sqlite_heap_limit": (int, "RAFTSQL_SQLITE_HEAP_LIMIT"),  # server/DESIGN.md, "Heap limit"
    # Early answers to durability="leader" writes (server/DESIGN.md, "Leader durability"); 0: off
    "max_unreplicated_writes": (int, "RAFTSQL_MAX_UNREPLICATED_WRITES"),
    # Per-stage timing of writes, fetched with the "trace" request (raftsql/trace.py)
    "trace": (bool, "RAFTSQL_TRACE"),
    # DSN of a running cluster to join as a learner (first start only; see server/membership.py)
    "join": (str, "RAFTSQL_JOIN"),
    # HOST:PORT of the opt-in metrics endpoint (README, "Monitoring")
    "metrics_listen": (str, "RAFTSQL_METRICS_LISTEN"),
}


# Numeric settings for which 0 means "off" (the others must be positive).
ZERO_ALLOWED = {"max_unreplicated_writes", "sqlite_heap_limit"}


class ConfigError(ValueError):
    """Raised when a node setting is missing or invalid; the message names it and its source."""


def parse_address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what}: {text!r} is not host:port")
    return host.strip("[]"), int(port)


def parse_peers(items: list[str] | str, what: str) -> dict[str, str]:
    if isinstance(items, str):
        items = [p for p in re.split(r"[,\s]+", items) if p]
    out = {}
    for item in items:
        pid, sep, addr = item.partition("=")
        if not sep:
            raise ConfigError(f"{what}: {item!r} must be ID=HOST:PORT")
        pid = pid.strip()
        if pid in out and out[pid] != addr.strip():
            raise ConfigError(f"{what}: peer {pid} is given twice ({out[pid]} and {addr.strip()})")
        out[pid] = addr.strip()
    return out


def load(flags: dict[str, Any], config_file: str | None = None, env: dict[str, str] | None = None) -> NodeConfig:
    env = os.environ if env is None else env
    merged: dict[str, tuple[Any, str]] = {}
    if config_file:
        try:
            with open(config_file, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {config_file}: {e.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {config_file} is not valid TOML: {e}") from None
        for k, v in data.items():
            if k not in SETTINGS:
                raise ConfigError(f"config file {config_file}: unknown setting {k!r} (known: {', '.join(SETTINGS)})")
            merged[k] = (v, f"config file {config_file}")
    for k, (_, var) in SETTINGS.items():
        if var in env and env[var] != "":
            merged[k] = (parse_peers(env[var], var) if k == "peers" else env[var], f"${var}")
    for k, v in flags.items():
        if v is not None and v != () and v != {}:
            merged[k] = (v, f"--{k.replace('_', '-')}")
    cfg = _build(merged)
    cfg.hooks = TestHooks.from_env(env)
    return cfg


# Upper bounds past which a setting only breaks the node (a tick of 10^20 ms killed the ticker
# thread with an OverflowError while the process kept listening and never elected).
_INT_MAX = {"tick_ms": 60_000, "heartbeat_ticks": 1_000_000, "election_ticks": 1_000_000}


def _typed(key: str, value: Any, source: str) -> Any:
    typ = SETTINGS[key][0]
    if typ is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a table of ID = \"HOST:PORT\"")
        return value
    if typ is str:
        if not isinstance(value, str):  # data_dir = 7 in a config file made ./7
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    try:
        if typ is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError  # 1.5 is no tick length; int() would make it 1
        v = typ(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{source}: {key} must be {typ.__name__}, got {value!r}") from None
    if typ is float and not math.isfinite(v):
        raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
    if typ is int and v > (most := _INT_MAX.get(key, 1 << 62)):
        raise ConfigError(f"{source}: {key} must be at most {most}, got {value!r}")
    if typ in (int, float) and (v < 0 if key in ZERO_ALLOWED else v <= 0):
        if key in ZERO_ALLOWED:
            raise ConfigError(f"{source}: {key} must be 0 or more, got {value!r}")
        raise ConfigError(f"{source}: {key} must be positive, got {value!r}")
    return v


def _build(merged: dict[str, tuple[Any, str]]) -> NodeConfig:
    vals: dict[str, Any] = {}
    for key, (value, source) in merged.items():
        vals[key] = _typed(key, value, source)
    for key in ("id", "data_dir", "listen", "certs"):
        if key not in vals:
            raise ConfigError(f"missing setting {key!r} (flag --{key.replace('_', '-')}, ${SETTINGS[key][1]} or the config file)")
    if not _ID.match(vals["id"]):
        raise ConfigError(f"id {vals['id']!r}: use letters, digits, '-' and '_' (at most 63)")
    listen = parse_address(vals["listen"], "listen")
    peers = {}
    for pid, addr in vals.get("peers", {}).items():
        if not _ID.match(pid):
            raise ConfigError(f"peer id {pid!r} is not valid")
        if pid == vals["id"]:
            raise ConfigError(f"peer {pid} is this node itself; list only the other nodes")
        peers[pid] = parse_address(addr, f"peer {pid}")
    if not os.path.isdir(vals["certs"]):
        raise ConfigError(f"certs directory {vals['certs']!r} does not exist (make it with: raftsql certs init DIR)")
    kw = {k: vals[k] for k in ("tick_ms", "heartbeat_ticks", "election_ticks", "max_frame_size", "max_request_size",
                               "session_timeout_ms", "query_timeout_s", "request_timeout_s", "advertise",
                               "max_client_connections", "frame_timeout_s", "client_idle_timeout_s",
                               "snapshot_entries", "snapshot_bytes", "snapshot_trailing", "log_cache_bytes",
                               "trace", "max_unreplicated_writes", "sqlite_heap_limit") if k in vals}
    if "advertise" in vals:
        host, _ = parse_address(vals["advertise"], "advertise")  # refuses port 0 too
        if host in ("0.0.0.0", "::"):
            raise ConfigError(f"advertise {vals['advertise']!r}: clients must be able to dial it "
                              "(a real host, not a wildcard)")
    if "metrics_listen" in vals:
        kw["metrics_listen"] = parse_address(vals["metrics_listen"], "metrics_listen")
        if kw["metrics_listen"] == listen:
            raise ConfigError("metrics_listen must differ from listen")
    cfg = NodeConfig(id=vals["id"], data_dir=vals["data_dir"], listen=listen, peers=peers, certs_dir=vals["certs"], **kw)
    if cfg.election_ticks <= cfg.heartbeat_ticks:
        raise ConfigError("election_ticks must be greater than heartbeat_ticks")
    if cfg.max_request_size > cfg.max_frame_size // 2:
        # An entry made from the largest request, plus its envelope, must fit one frame to
        # the followers (a message larger than a frame could never be delivered).
        raise ConfigError(
            f"max_request_size ({cfg.max_request_size}) must be at most half of max_frame_size "
            f"({cfg.max_frame_size})"
        )
    if "join" in vals:
        if not vals["join"].startswith("raftsql://"):
            raise ConfigError(f"join: {vals['join']!r} is not a raftsql:// DSN")
        cfg.extra["join"] = vals["join"]
    return cfg
