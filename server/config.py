"""Node settings from a TOML file, environment variables and command-line flags (in rising
precedence). Every bad value is reported as ConfigError naming the setting and its source."""

from __future__ import annotations

import os
import re
import tomllib
from typing import Any

from raftsql.server.node import NodeConfig

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")

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
    # DSN of a running cluster to join as a learner (first start only; see server/admin.py)
    "join": (str, "RAFTSQL_JOIN"),
}


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
        out[pid.strip()] = addr.strip()
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
        except tomllib.TOMLDecodeError as e:
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
    return _build(merged)


def _typed(key: str, value: Any, source: str) -> Any:
    typ = SETTINGS[key][0]
    if typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a table of ID = \"HOST:PORT\"")
        return value
    try:
        if typ is int and isinstance(value, bool):
            raise ValueError
        v = typ(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} must be {typ.__name__}, got {value!r}") from None
    if typ in (int, float) and v <= 0:
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
                               "snapshot_entries", "snapshot_bytes", "snapshot_trailing", "log_cache_bytes") if k in vals}
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
