"""The `raftsql` command line.

Adding a command: decorate a function with ``@main.command()`` (or ``@main.group()`` for a
family like `certs`) and ``@human_errors``; import server/driver modules *inside* the function so
``raftsql --help`` stays fast and never loads cryptography, apsw or sockets.

`human_errors` turns expected failures (OSError, including ssl.SSLError, and the exception types
named in USER_ERRORS) into a one-line ``Error: ...`` with exit status 1 instead of a traceback.
Set RAFTSQL_DEBUG=1 to see the traceback anyway.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# "module:Class" names of exceptions whose message is written for humans. Looked up in
# sys.modules only: if the module was never imported, nothing can have raised its exceptions.
USER_ERRORS = ["raftsql.server.tls:TLSConfigError"]


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
      raftsql certs init ./certs
      raftsql certs node ./certs --name n1 --host 127.0.0.1
      raftsql certs node ./certs --name n2 --host 127.0.0.1
    """


@certs.command("init")
@click.argument("certs_dir", type=CertsDir)
@click.option(
    "--force", is_flag=True, help="Replace an existing CA (invalidates all its certificates)."
)
@human_errors
def certs_init(certs_dir: Path, force: bool) -> None:
    """Create CERTS_DIR (mode 0700) with a cluster CA and a client certificate.

    Safe to repeat: if CERTS_DIR already has a CA, it is kept and nothing is changed (a missing
    client certificate is issued from it). Keys are EC P-256, mode 0600; the CA is valid for 10
    years, leaf certificates for 5.
    """
    from raftsql.server import tls

    ca = tls.make_ca(certs_dir, force=force, exist_ok=not force)
    if ca.created:
        click.echo(
            f"Created CA {ca.cert_path} (valid until {tls.describe_cert(ca.cert_path)['not after']})"
        )
    else:
        click.echo(f"CA already exists at {ca.cert_path}")
    client = tls.make_client_cert(certs_dir, "client", force=force, exist_ok=not force)
    if client.created:
        click.echo(f"Created client certificate {client.cert_path} and key {client.key_path}")
    if force and ca.created:
        others = sorted(
            p.name
            for p in certs_dir.glob("*.crt")
            if p.name not in {ca.cert_path.name, client.cert_path.name}
        )
        if others:
            click.echo(
                f"Warning: {', '.join(others)} were signed by the old CA and are no longer "
                "trusted; reissue them with --force.",
                err=True,
            )
    if not ca.created and not client.created:
        click.echo("Nothing changed.")


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
    """Issue NAME.crt/NAME.key for a node, signed by the CA in CERTS_DIR.

    The certificate names every --host (IPs as IP addresses) and the node name, and carries the
    node role. If a certificate from this CA already covers these hosts, it is kept.
    """
    from raftsql.server import tls

    issued = tls.make_node_cert(certs_dir, name, hosts, force=force, exist_ok=not force)
    if issued.created:
        click.echo(f"Created node certificate {issued.cert_path} and key {issued.key_path}")
    else:
        click.echo(f"Node certificate {issued.cert_path} already exists and covers these hosts")


@certs.command("client")
@click.argument("certs_dir", type=CertsDir)
@click.option("--name", default="client", show_default=True, help="Client name (CN and file name).")
@click.option("--force", is_flag=True, help="Reissue even if a certificate exists.")
@human_errors
def certs_client(certs_dir: Path, name: str, force: bool) -> None:
    """Issue NAME.crt/NAME.key for a driver client, signed by the CA in CERTS_DIR."""
    from raftsql.server import tls

    issued = tls.make_client_cert(certs_dir, name, force=force, exist_ok=not force)
    if issued.created:
        click.echo(f"Created client certificate {issued.cert_path} and key {issued.key_path}")
    else:
        click.echo(f"Client certificate {issued.cert_path} already exists")


@certs.command("show")
@click.argument("cert_file", type=click.Path(dir_okay=False, path_type=Path))
@human_errors
def certs_show(cert_file: Path) -> None:
    """Print a certificate's name, role, addresses and validity."""
    from raftsql.server import tls

    for key, value in tls.describe_cert(cert_file).items():
        click.echo(f"{key + ':':<12} {value}")


if __name__ == "__main__":  # pragma: no cover
    main()
