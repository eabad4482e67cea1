"""The `raftsql` command line.

Adding a command: decorate a function with ``@main.command()`` (or ``@main.group()`` for a
family like `certs`) and ``@human_errors``; import server/driver modules *inside* the function so
``raftsql --help`` stays fast and never loads cryptography, apsw or sockets.

`human_errors` turns expected failures (OSError, including ssl.SSLError, and the exception types
named in USER_ERRORS) into a one-line ``Error: ...`` with exit status 1 instead of a traceback.
Set RAFTSQL_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import faulthandler
import functools
import os
import sys
from pathlib import Path

import click

# A node whose stop takes longer than this prints every thread's stack (to its log).
STOP_STACKS_AFTER_S = 10.0
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# "module:Class" names of exceptions whose message is written for humans. Looked up in
# sys.modules only: if the module was never imported, nothing can have raised its exceptions.
USER_ERRORS = [
    "raftsql.server.tls:TLSConfigError",
    "raftsql.server.certs:TLSConfigError",
    "raftsql.driver._exceptions:Error",  # every driver error (a shell's DSN, its certificates)
    "raftsql.server.config:ConfigError",
    "raftsql.server.logstore:LogCorruptError",
    "raftsql.server.logstore:LogLockedError",
    "raftsql.server.membership:JoinError",
    "raftsql.server.membership:MembershipMismatch",
    "raftsql.server.reseed:ReseedError",
    "raftsql.server.statemachine:DatabaseDamagedError",
    "raftsql.driver._admin:AdminError",
    "raftsql.driver._client:ClientError",
]


def _is_user_error(exc: BaseException) -> bool:
    for spec in USER_ERRORS:
        module_name, _, class_name = spec.partition(":")
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def _describe_os_error(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        filename = os.fsdecode(exc.filename)
        return exc.strerror if filename in exc.strerror else f"{exc.strerror}: {filename}"
    return str(exc)


def human_errors(fn):
    """Decorator: report expected errors as a click error (exit 1), not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if os.environ.get("RAFTSQL_DEBUG"):
                raise
            if isinstance(exc, OSError):
                raise click.ClickException(_describe_os_error(exc)) from exc
            if _is_user_error(exc):
                raise click.ClickException(str(exc)) from exc
            raise

    return wrapper


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="raftsql", prog_name="raftsql")
def main() -> None:
    """raftsql: a replicated SQLite database (Raft over mutual TLS)."""


# --------------------------------------------------------------------------- certs

CertsDir = click.Path(file_okay=False, dir_okay=True, path_type=Path)


@main.group()
def certs() -> None:
    """Create the cluster CA and node/client certificates.

    \b
    A typical local cluster:
      raftsql certs init ./certs            CA in ./certs/ca (stays there), ./certs/client
                                            (role write) and ./certs/admin (role admin)
      raftsql certs node ./certs --name n1 --host 127.0.0.1      ./certs/n1
      raftsql certs node ./certs --name n2 --host 127.0.0.1      ./certs/n2
      raftsql certs client ./certs --name reports --role read    ./certs/reports
    Give each node only its own directory (--certs ./certs/n1) and clients only theirs
    (?certs=./certs/client). ./certs/ca holds the CA's private key: keep it where you run
    `raftsql certs`. A leaked client key is shut out with `raftsql certs revoke`.
    """


def _warn_flat(tree) -> None:
    warning = tree.legacy_warning()
    if warning:
        click.echo(f"Warning: {warning}", err=True)


@certs.command("init")
@click.argument("certs_dir", type=CertsDir)
@click.option(
    "--force", is_flag=True, help="Replace an existing CA (invalidates all its certificates)."
)
@click.option(
    "--split", is_flag=True,
    help="Move an old flat CERTS_DIR (ca.key beside every key) into the per-node layout.",
)
@human_errors
def certs_init(certs_dir: Path, force: bool, split: bool) -> None:
    """Create CERTS_DIR (mode 0700) with a cluster CA and two client certificates.

    \b
    CERTS_DIR/ca      ca.crt, ca.key: the CA; only `raftsql certs` needs it
    CERTS_DIR/client  ca.crt, client.crt, client.key (role write): ?certs= for applications
    CERTS_DIR/admin   the same files, role admin: ?certs= for membership changes, backup,
                      restore and revocation

    Safe to repeat: if CERTS_DIR already has a CA, it is kept and nothing is changed (a missing
    client certificate is issued from it). Keys are EC P-256, mode 0600; the CA is valid for 10
    years, leaf certificates for 5. An old flat CERTS_DIR (ca.key next to the other keys) still
    works; --split moves each key into its own directory, keeping the CA and certificates
    (nodes started with --certs CERTS_DIR keep working; clients then use CERTS_DIR/client).
    """
    from raftsql.server import certs as pki
    from raftsql.server import tls

    tree = pki.CertsTree(certs_dir)
    if split:
        moved = tree.split()
        for line in moved:
            click.echo(line)
        if not moved:
            click.echo(f"{certs_dir} is not a flat directory; nothing to split")
    ca, client = tree.init(force=force, exist_ok=not force)
    if ca.created:
        click.echo(
            f"Created CA {ca.cert_path} (valid until {tls.describe_cert(ca.cert_path)['not after']})"
        )
    else:
        click.echo(f"CA already exists at {ca.cert_path}")
    if client.created:
        click.echo(f"Created client certificate {client.cert_path} and key {client.key_path}")
    if force and ca.created:
        others = sorted(
            str(p.relative_to(certs_dir)) for p in tree.leaf_certs() if p != client.cert_path
        )
        if others:
            click.echo(
                f"Warning: {', '.join(others)} were signed by the old CA and are no longer "
                "trusted; reissue them with --force.",
                err=True,
            )
    if not ca.created and not client.created and not split:
        click.echo("Nothing changed.")
    _warn_flat(tree)
    if not tree.legacy:
        click.echo(f"Clients: ?certs={client.cert_path.parent}   (the CA key stays in {ca.cert_path.parent})")
        click.echo(f"Admins:  ?certs={tree.admin_dir}")


@certs.command("node")
@click.argument("certs_dir", type=CertsDir)
@click.option("--name", required=True, help="Node name (certificate CN and file name).")
@click.option(
    "--host",
    "hosts",
    multiple=True,
    required=True,
    help="IP address or DNS name peers and clients dial; repeat for each.",
)
@click.option("--force", is_flag=True, help="Reissue even if a certificate exists.")
@human_errors
def certs_node(certs_dir: Path, name: str, hosts: tuple[str, ...], force: bool) -> None:
    """Issue a node certificate into CERTS_DIR/NAME (ca.crt, NAME.crt, NAME.key).

    Signed by the CA in CERTS_DIR/ca. Give the node that directory only: --certs CERTS_DIR/NAME.
    The certificate names every --host (IPs as IP addresses) and the node name, and carries the
    node role. If a certificate from this CA already covers these hosts, it is kept.
    """

    from raftsql.server import certs as pki

    tree = pki.CertsTree(certs_dir)
    _warn_flat(tree)
    issued = tree.node(name, hosts, force=force, exist_ok=not force)
    if issued.created:
        click.echo(f"Created node certificate {issued.cert_path} and key {issued.key_path}")
    else:
        click.echo(f"Node certificate {issued.cert_path} already exists and covers these hosts")
    if not tree.legacy:
        click.echo(f"Start the node with: --certs {issued.cert_path.parent}")


@certs.command("client")
@click.argument("certs_dir", type=CertsDir)
@click.option("--name", default="client", show_default=True, help="Client name (CN and directory).")
@click.option("--role", type=click.Choice(["read", "write", "admin"]), default="write",
              show_default=True,
              help="read: reads only. write: reads and writes. admin: also membership changes, "
                   "backup, restore, hash and revocation.")
@click.option("--force", is_flag=True, help="Reissue even if a certificate exists.")
@human_errors
def certs_client(certs_dir: Path, name: str, role: str, force: bool) -> None:
    """Issue a client certificate into CERTS_DIR/NAME (ca.crt, client.crt, client.key).

    Signed by the CA in CERTS_DIR/ca; the role is in the certificate, and every node enforces
    it. The client connects with ?certs=CERTS_DIR/NAME.
    """

    from raftsql.server import certs as pki
    from raftsql.server import tls

    tree = pki.CertsTree(certs_dir)
    _warn_flat(tree)
    issued = tree.client(name, role=role, force=force, exist_ok=not force)
    serial = tls.describe_cert(issued.cert_path)["serial"]
    if issued.created:
        click.echo(f"Created client certificate {issued.cert_path} (role {role}, serial {serial}) "
                   f"and key {issued.key_path}")
    else:
        click.echo(f"Client certificate {issued.cert_path} (role {role}) already exists")
    if not tree.legacy:
        click.echo(f"Clients: ?certs={issued.cert_path.parent}")


@certs.command("revoke")
@click.argument("dsn")
@click.argument("name_or_serial", metavar="NAME-or-SERIAL")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to keep trying.")
@human_errors
def certs_revoke(dsn: str, name_or_serial: str, timeout: float) -> None:
    """Revoke a certificate on a running cluster (needs an admin certificate in the DSN).

    \b
    NAME revokes every certificate with that name (CN); SERIAL (hex, as `raftsql certs show`
    prints it; at least 16 digits) only that one. Prefix with name: or serial: to decide.
    The deny list is replicated through the log: every node, and every node that joins later,
    refuses the certificate at its hello and closes its open connections. It cannot be
    undone: issue a certificate with a new name instead.
    """
    from raftsql.driver._admin import revoke

    r = revoke(dsn, name_or_serial, timeout=timeout)
    if r.get("already"):
        click.echo(f"{r['target']} was already revoked; nothing changed")
    elif r.get("own"):
        click.echo(f"revoked {r['target']}: it is the certificate of the DSN you used, which no "
                   "longer works; use another admin certificate (`raftsql certs client NAME "
                   "--role admin`)")
    else:
        click.echo(f"revoked {r['target']} (log index {r['index']})")


@certs.command("show")
@click.argument("cert_file", type=click.Path(dir_okay=False, path_type=Path))
@human_errors
def certs_show(cert_file: Path) -> None:
    """Print a certificate's name, role, addresses and validity."""

    from raftsql.server import tls

    for key, value in tls.describe_cert(cert_file).items():
        click.echo(f"{key + ':':<12} {value}")



# --------------------------------------------------------------------------- node


@main.command()
@click.option("--id", "node_id", help="This node's id (e.g. n1). [$RAFTSQL_ID]")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where the log and database live.")
@click.option("--listen", help="HOST:PORT for peers and clients.")
@click.option("--advertise", help="HOST:PORT clients are redirected to (default: --listen).")
@click.option("--peer", "peers", multiple=True, help="ID=HOST:PORT of another voter (repeat).")
@click.option("--certs", type=click.Path(file_okay=False), help="Directory made by `raftsql certs`.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file with the same settings.")
@click.option("--tick-ms", type=int, help="Length of one Raft tick (default 25).")
@click.option("--heartbeat-ticks", type=int, help="Ticks between heartbeats (default 2).")
@click.option("--election-ticks", type=int, help="Minimum election timeout in ticks (default 8).")
@click.option("--snapshot-entries", type=int, help="Snapshot after this many entries (default 10000).")
@click.option("--snapshot-bytes", type=int, help="... or this many bytes of entries (default 64 MiB).")
@click.option("--snapshot-trailing", type=int,
              help="Entries kept in the log after a snapshot for slow followers (default 5000).")
@click.option("--max-client-connections", type=int,
              help="Client connections this node accepts at once; more get an error (default 1024). "
                   "Peers are never counted.")
@click.option("--frame-timeout-s", type=float,
              help="Close a client connection whose frame stops arriving midway (default 30).")
@click.option("--client-idle-timeout-s", type=float,
              help="Close a client connection silent this long between requests (default: never).")
@click.option("--join", "join_dsn", metavar="DSN",
              help="Join the running cluster at DSN as a learner (first start; uses the node certificate).")
@click.option("--metrics-listen", metavar="HOST:PORT",
              help="Serve Prometheus metrics over HTTPS at https://HOST:PORT/metrics (off unless set).")
@click.option("--max-unreplicated-writes", type=click.IntRange(0),
              help="durability='leader' writes answered before their quorum and not yet committed, "
                   "at most: what a leader crash can lose (default 64; 0: off).")
@click.option("--reseed", is_flag=True,
              help="This node's database is damaged: move it (and the node's log and snapshots) "
                   "aside, then catch up from the leader (README, Recovery).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False))
@human_errors
def node(node_id, data_dir, listen, advertise, peers, certs, config_file, tick_ms, heartbeat_ticks,
         election_ticks, snapshot_entries, snapshot_bytes, snapshot_trailing, max_client_connections,
         frame_timeout_s, client_idle_timeout_s, join_dsn, metrics_listen, max_unreplicated_writes,
         reseed, log_level) -> None:
    """Run one node in the foreground (SIGTERM: hand over leadership, then exit).

    Settings come from flags, then $RAFTSQL_* variables, then the --config TOML file.

    \b
    A new node joins a running cluster with --join (no --peer needed):
      raftsql certs node ./certs --name n4 --host 127.0.0.1
      raftsql node --id n4 --data-dir d4 --listen 127.0.0.1:4004 --certs ./certs/n4 \\
          --join 'raftsql://127.0.0.1:4001/'
      raftsql cluster promote 'raftsql://127.0.0.1:4001/?certs=./certs/admin' n4
    It is added as a learner, learns the cluster's members, and remembers them in its data
    directory (later starts do not ask again).
    """
    import logging
    import signal
    import threading

    from raftsql.server import config as nodeconfig
    from raftsql.server.node import Node

    flags = {
        "id": node_id, "data_dir": data_dir, "listen": listen, "advertise": advertise,
        "peers": nodeconfig.parse_peers(list(peers), "--peer") if peers else None,
        "certs": certs, "tick_ms": tick_ms, "heartbeat_ticks": heartbeat_ticks,
        "election_ticks": election_ticks, "join": join_dsn,
        "snapshot_entries": snapshot_entries, "snapshot_bytes": snapshot_bytes,
        "snapshot_trailing": snapshot_trailing,
        "max_client_connections": max_client_connections, "frame_timeout_s": frame_timeout_s,
        "client_idle_timeout_s": client_idle_timeout_s, "metrics_listen": metrics_listen,
        "max_unreplicated_writes": max_unreplicated_writes,
    }
    cfg = nodeconfig.load(flags, config_file)
    if cfg.metrics_listen is not None:
        from raftsql.server import metrics_http

        metrics_http.check_available()  # prometheus-client, before the node starts
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if reseed:
        from raftsql.server.reseed import reseed as reseed_data_dir

        done = reseed_data_dir(cfg.data_dir)
        click.echo(f"Re-seeding {cfg.data_dir}: moved {', '.join(done['moved'])} to "
                   f"{done['moved_to']}; catching up from the leader.", err=True)
    if cfg.extra.get("join"):
        from raftsql.server.membership import join_cluster

        join_cluster(cfg, cfg.extra["join"])
    from raftsql.server.threadnames import name_os_threads

    name_os_threads(cfg.id)  # so /proc, top -H and perf show which thread is which
    n = Node(cfg)
    scrapes = None
    if cfg.metrics_listen is not None:
        # Bound before the node starts: a port in use stops it with a one-line error.
        scrapes = metrics_http.MetricsServer(
            n, cfg.metrics_listen, cfg.certs_dir, cfg.id,
            lambda name, serial: n.sm.records.is_revoked(name, serial))
        scrapes.start()
    n.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(0.5):
        pass
    # A stop that takes longer than it should leaves every thread's stack in the log.
    faulthandler.dump_traceback_later(STOP_STACKS_AFTER_S, exit=False)
    if scrapes is not None:
        scrapes.stop()
    n.stop(graceful=True)
    faulthandler.cancel_dump_traceback_later()


# --------------------------------------------------------------------------- cluster


@main.group()
def cluster() -> None:
    """Run a local cluster; change a cluster's membership.

    \b
    Grow by one node (started with `raftsql node ... --join DSN`, or with --peer flags naming
    the cluster's first voters and then added with `cluster add`):
      raftsql cluster promote DSN n4      (waits until n4 has caught up)
    Shrink:
      raftsql cluster remove DSN n2       (then stop n2's process)
    """


@cluster.command("up")
@click.option("--nodes", type=click.IntRange(1, 9), default=3, show_default=True)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("cluster-data"), show_default=True)
@click.option("--base-port", type=click.IntRange(1, 65000), help="First port (default: 4001, or the next free).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address every node listens on (a new cluster; a reused one keeps its addresses).")
@click.option("--shell", "open_shell", is_flag=True, help="Open a SQL shell on the cluster.")
@human_errors
def cluster_up(nodes: int, data_dir: Path, base_port: int | None, host: str, open_shell: bool) -> None:
    """Start NODES node processes on loopback, making certificates if missing.

    Writes DATA_DIR/cluster.json with the DSN. Certificates go to DATA_DIR/certs: the CA (and
    its key) in DATA_DIR/certs/ca, the client's in DATA_DIR/certs/client (the DSN's ?certs=,
    role write), an admin's in DATA_DIR/certs/admin (the admin DSN's), each node's in
    DATA_DIR/certs/ID. If a node exits, the others keep running and the command
    that restarts it is printed. Ctrl-C or SIGTERM stops every node this command started;
    starting again with the same --data-dir reuses the data.
    """
    import signal
    import threading

    from raftsql.server import launcher

    fresh = not data_dir.exists()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        plan = launcher.plan(data_dir, nodes, base_port, host)
    except ValueError as e:
        if fresh:
            data_dir.rmdir()  # made just now, still empty: leave nothing behind
        raise click.ClickException(str(e)) from None
    client_certs, node_certs, moved = launcher.make_certs(data_dir / "certs", plan)
    for line in moved:
        click.echo(f"certificates: {line}")
    dsn = launcher.dsn_for(plan, client_certs)
    admin = launcher.admin_dir(data_dir / "certs")
    admin_dsn = launcher.dsn_for(plan, admin) if admin is not None else None
    # The handlers come before the first node starts: a SIGTERM while they start (it used to
    # leave them running, with no cluster.json naming them) stops them all below.
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    if not open_shell:
        # With the shell, Ctrl-C cancels the line being typed (as in sqlite3); .quit or Ctrl-D
        # leaves the shell and stops the cluster.
        signal.signal(signal.SIGINT, lambda *_: done.set())
    procs = launcher.start(data_dir, plan, node_certs, interrupted=done)
    if done.is_set():
        click.echo("stopped while starting; cluster stopped", err=True)
        raise click.exceptions.Exit(1)
    launcher.write_cluster_json(data_dir, plan, procs, dsn, admin_dsn)
    reported: set[str] = set()

    def report_exits() -> bool:
        """Report each node that has exited, once; True while any node is still running."""
        for n, p in zip(plan, procs, strict=True):
            if n["id"] not in reported and p.poll() is not None:
                reported.add(n["id"])
                running = any(q.poll() is None for q in procs)
                click.echo(launcher.exit_report(n, p, plan, node_certs[n["id"]], others_running=running),
                           err=True)
        return any(p.poll() is None for p in procs)

    try:
        click.echo(f"started {nodes} nodes: " + ", ".join(f"{n['id']}={n['address']}" for n in plan))
        click.echo(f"logs: {data_dir}/<id>/node.log   cluster file: {data_dir / 'cluster.json'}")
        click.echo(f"DSN: {dsn}")
        if admin_dsn is not None:
            click.echo(f"admin DSN (membership, backup, restore, revoke): {admin_dsn}")
        click.echo(f"status: raftsql status '{dsn}'")
        if open_shell:
            from raftsql.shell import run_shell

            def watch() -> None:
                while not done.wait(0.5):
                    report_exits()

            threading.Thread(target=watch, name="watch-nodes", daemon=True).start()
            click.echo("the cluster stops when you leave the shell (.quit or Ctrl-D)")
            run_shell(dsn, stop_event=done)
        else:
            click.echo("press Ctrl-C to stop the cluster")
            while not done.wait(0.5):
                if not report_exits():
                    click.echo("every node this command started has exited", err=True)
                    raise click.exceptions.Exit(1)
    finally:
        done.set()
        launcher.stop(procs)
        click.echo("cluster stopped")


def _print_change(result: dict, what: str) -> None:
    if result.get("already"):
        click.echo(f"{result['node_id']} is already a {result['role']}; nothing changed")
    else:
        click.echo(f"{what} (log index {result['index']})")
    members = result.get("members") or {}
    click.echo("members: " + ", ".join(f"{k}={v}" for k, v in members.items()))


@cluster.command("add")
@click.argument("dsn")
@click.argument("node_id")
@click.argument("address", metavar="HOST:PORT")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to keep trying.")
@human_errors
def cluster_add(dsn: str, node_id: str, address: str, timeout: float) -> None:
    """Add NODE_ID, reachable at HOST:PORT, as a learner (it gets the log but does not vote).

    For a node started without --join. Its --peer flags must name the cluster's first voters
    (it replays the log from them), and it needs a node certificate named NODE_ID.
    """
    from raftsql.driver._admin import cluster_add as add

    _print_change(add(dsn, node_id, address, timeout=timeout), f"added {node_id} ({address}) as a learner")


@cluster.command("promote")
@click.argument("dsn")
@click.argument("node_id")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for it to catch up.")
@click.option("--max-lag", type=click.IntRange(0), help="Entries it may lag behind the leader (default 100).")
@human_errors
def cluster_promote(dsn: str, node_id: str, timeout: float, max_lag: int | None) -> None:
    """Make learner NODE_ID a voter, once its log has caught up with the leader's."""
    from raftsql.driver._admin import cluster_promote as promote

    _print_change(promote(dsn, node_id, timeout=timeout, max_lag=max_lag), f"promoted {node_id} to voter")


@cluster.command("remove")
@click.argument("dsn")
@click.argument("node_id")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds to keep trying.")
@human_errors
def cluster_remove(dsn: str, node_id: str, timeout: float) -> None:
    """Remove NODE_ID (voter or learner); stop its process afterwards.

    Removing the leader first hands leadership to the most up-to-date voter.
    """
    from raftsql.driver._admin import cluster_remove as remove

    _print_change(remove(dsn, node_id, timeout=timeout), f"removed {node_id}")


# --------------------------------------------------------------------------- backup / restore


@main.command()
@click.argument("dsn")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--stale", is_flag=True, help="Copy a node's state as is (skip the ReadIndex round).")
@click.option("--timeout", type=float, default=300.0, show_default=True)
@human_errors
def backup(dsn: str, out: Path, stale: bool, timeout: float) -> None:
    """Copy the live database to OUT, a plain SQLite file (open it with sqlite3).

    The copy is consistent, holds every write acknowledged before the command started, and
    is taken at one log index, which is printed (and kept in its sqlite_raftsql_meta table).
    OUT is replaced atomically.
    """
    from raftsql.driver._admin import backup as do_backup

    r = do_backup(dsn, str(out), timeout=timeout, linearizable=not stale,
                  waiting=lambda message: click.echo(message, err=True))
    click.echo(f"backup of {r['node']} at index {r['index']}: {r['path']} ({r['size']} bytes, sha256 {r['sha256']})")


@main.command()
@click.argument("in_file", metavar="IN.db", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dsn")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds per batch.")
@human_errors
def restore(in_file: Path, dsn: str, timeout: float) -> None:
    """Seed a new, empty cluster at DSN with the tables of the SQLite file IN.db.

    \b
    Start the new cluster first (e.g. `raftsql cluster up --data-dir new`), then:
      raftsql restore backup.db 'raftsql://127.0.0.1:4001/?certs=new/certs/admin'
    The data goes through the log, so every node, and every node that joins later, gets the
    same database. Refused if the cluster already has tables.
    """
    from raftsql.driver._admin import restore as do_restore

    r = do_restore(dsn, str(in_file), timeout=timeout)
    click.echo(f"restored {r['tables']} tables, {r['rows']} rows from {in_file}; cluster at index {r['index']}")


# --------------------------------------------------------------------------- status


@main.command()
@click.argument("dsn")
@click.option("--json", "as_json", is_flag=True, help="Print raw JSON.")
@human_errors
def status(dsn: str, as_json: bool) -> None:
    """Show every node's role, term, leader, commit/applied index and peers, its core metrics
    (the figures /metrics serves) and the revoked certificates."""
    import json

    from raftsql.driver._admin import cluster_status

    rows = cluster_status(dsn)
    try:
        if as_json:
            click.echo(json.dumps(rows, indent=2, default=str, allow_nan=False))
        else:
            _print_status(rows)
        sys.stdout.flush()
    except BrokenPipeError:  # `raftsql status ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    # As `etcdctl endpoint health`: a cluster that cannot take writes is a failure (exit 1).
    views = [r for r in rows if "error" not in r]
    if not views:
        raise click.ClickException("no node answered")
    if not any(r.get("role") == "leader" or r.get("leader") for r in views):
        raise click.ClickException(
            f"none of the {len(views)} node(s) that answered knows a leader: the cluster takes "
            "no writes")


def _print_status(rows: list[dict]) -> None:
    click.echo(f"{'node':6} {'address':22} {'role':10} {'term':>5} {'leader':7} {'commit':>8} {'applied':>8}")
    for r in rows:
        if "error" in r:
            click.echo(f"{'?':6} {r['address']:22} unreachable: {r['error']}")
            continue
        role = "learner" if r["id"] in r.get("learners", ()) else r["role"]
        click.echo(f"{r['id']:6} {r['address']:22} {role:10} {r['term']:>5} {str(r['leader']):7} "
                   f"{r['commit_index']:>8} {r['applied_index']:>8}")
    views = [r for r in rows if "error" not in r]
    if not views:
        return
    best = max(views, key=lambda r: (r["term"], r["role"] == "leader"))
    click.echo(f"voters: {', '.join(best['voters'])}   learners: {', '.join(best['learners']) or '-'}"
               f"   (as {best['id']} sees them)")
    ids = {r["id"]: r.get("cluster_id") for r in views}
    named = {v for v in ids.values() if v}
    if len(named) > 1:
        click.echo("cluster id: the nodes hold the data of different clusters: "
                   + ", ".join(f"{n}={v or '-'}" for n, v in sorted(ids.items()))
                   + " (they refuse each other; see the ERROR lines in their logs)")
    else:
        click.echo(f"cluster id: {next(iter(named), None) or '- (not named yet)'}")
    with_metrics = [r for r in views if isinstance(r.get("metrics"), dict)]
    if with_metrics:
        click.echo("")
        click.echo(_metrics_table(with_metrics))
    revoked = best.get("revoked")
    if isinstance(revoked, list):
        click.echo("")
        if not revoked:
            click.echo("revoked certificates: none")
        else:
            click.echo(f"revoked certificates ({len(revoked)}, as {best['id']} has them):")
            for rv in revoked:
                click.echo(f"  {rv['target']:48} at index {rv['index']:<8} by {rv.get('by') or '?'} "
                           f"(serial {rv.get('by_serial') or '?'})")


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def _p99(h: dict) -> str:
    """A histogram's p99 bound in ms, or ">TOP" when it is past the top bucket."""
    if h.get("p99_le_s") is None and h.get("p99_above_s") is not None:
        return f">{h['p99_above_s'] * 1000:.0f}"
    return _ms(h.get("p99_le_s"))


def _metrics_table(rows: list[dict]) -> str:
    """The core figures of each node (README, "Monitoring"): what /metrics serves, in a table."""
    lines = [
        "metrics      leader    propo-   writes  write ms     fsync ms      apply ms    log   "
        "clients refused  snapshots   peer lag",
        "node         changes    sals            mean  p99<=  mean  p99<=  mean  p99<=    MiB   "
        "        (p/r/c)  taken/inst  (entries)",
    ]
    for r in rows:
        m = r["metrics"]
        w, f, a = m["raftsql_write_seconds"], m["raftsql_fsync_seconds"], m["raftsql_apply_seconds"]
        ref = m.get("raftsql_client_refusals_total") or {}
        snap = r.get("snapshot") or {}
        lag = ", ".join(f"{k}={v}" for k, v in sorted((m.get("peer_lag_entries") or {}).items())) or "-"
        lines.append(
            f"{r['id']:10} {m['raftsql_leader_changes_seen_total']:>9} {m['raftsql_proposals_total']:>8} "
            f"{w['count']:>8} {_ms(w['mean_s']):>5} {_p99(w):>6} "
            f"{_ms(f['mean_s']):>5} {_p99(f):>6} {_ms(a['mean_s']):>5} {_p99(a):>6} "
            f"{m['log_bytes'] / (1 << 20):>6.1f} {m['client_connections']:>7} "
            f"{ref.get('permission', 0)}/{ref.get('revoked', 0)}/{ref.get('connection_limit', 0):<5} "
            f"{snap.get('taken', 0):>5}/{snap.get('installed', 0):<5} {lag}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- shell


@main.command()
@click.argument("dsn")
@human_errors
def shell(dsn: str) -> None:
    """An interactive SQL shell (dot commands: .help)."""
    from raftsql.shell import run_shell

    run_shell(dsn)


if __name__ == "__main__":
    main()
