"""TLS policy and client contexts shared by the driver and the node: stdlib ``ssl`` only.

The driver must stay importable without cryptography or apsw, so this module only *reads*
certificates made by ``raftsql certs init``; it never creates them. The server's
``raftsql.server.tls`` uses the policy below (`harden`, `check_key_file`) so both ends of a
connection agree on versions, ciphers and key-file rules.

Policy:
- TLS 1.2 minimum; TLS 1.3 is negotiated whenever both ends support it (the maximum is left at
  the library's highest version).
- Verification is never disabled: CERT_REQUIRED and hostname checking are always on.
- A private key readable or writable by group or others is refused (like ssh and libpq), because a
  cluster key that leaked is a cluster compromised.

Note for callers: with TLS 1.3 the server verifies the client's certificate *after* the client's
handshake has returned, so a rejected client certificate shows up as an ``ssl.SSLError`` (or EOF /
connection reset) on the first read, not in ``do_handshake()``.
"""

from __future__ import annotations

import errno
import os
import ssl
import stat

__all__ = [
    "MIN_TLS_VERSION",
    "InsecureKeyFileError",
    "check_key_file",
    "client_context",
    "default_paths",
    "harden",
]

MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2

# TLS 1.2 only (TLS 1.3 suites are configured separately and are all AEAD + forward secret):
# ECDHE key exchange, AEAD ciphers. Our certificates carry EC P-256 keys, so ECDSA suites apply.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"

CA_CERT = "ca.crt"
DEFAULT_CLIENT = "client"


class InsecureKeyFileError(PermissionError):
    """Raised when a private key file is accessible by group or others (chmod 600 it)."""


def check_key_file(path: str | os.PathLike[str]) -> None:
    """Refuse a private key that is missing, not a regular file, or group/world accessible."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "private key not found", path) from None
    if not stat.S_ISREG(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "private key is not a regular file", path)
    # POSIX permission bits mean nothing on Windows; rely on the ACLs there.
    if os.name == "posix" and st.st_mode & 0o077:
        raise InsecureKeyFileError(
            errno.EACCES,
            f"private key has mode {stat.S_IMODE(st.st_mode):04o}, which lets group or others "
            f"access it; run: chmod 600 {path}",
            path,
        )


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, f"{what} not found", path)


def harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Apply the shared raftsql policy to a fresh context (both client and server)."""
    ctx.minimum_version = MIN_TLS_VERSION
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # RFC 5280 strictness (the default in Python >= 3.13); our certificates are built to pass it.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    cafile: str | os.PathLike[str],
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A client SSLContext: trust only `cafile`, present `certfile`/`keyfile`, check hostnames.

    Connect with ``ctx.wrap_socket(sock, server_hostname=HOST)`` where HOST is the address you
    dialled (an IP or a name in the node certificate's subjectAltName).
    Raises FileNotFoundError, InsecureKeyFileError or ssl.SSLError with the offending path.
    """
    cafile = os.fspath(cafile)
    certfile = os.fspath(certfile)
    keyfile = os.fspath(keyfile) if keyfile is not None else None
    _require_file(cafile, "CA certificate")
    _require_file(certfile, "client certificate")
    # With keyfile=None the key must be inside certfile; then certfile is the secret to guard.
    check_key_file(keyfile if keyfile is not None else certfile)

    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = True
    ctx.load_verify_locations(cafile=cafile)
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


def default_paths(
    certs_dir: str | os.PathLike[str], name: str = DEFAULT_CLIENT
) -> tuple[str, str, str]:
    """(cafile, certfile, keyfile) for client `name` in a directory made by `raftsql certs init`."""
    d = os.fspath(certs_dir)
    return (
        os.path.join(d, CA_CERT),
        os.path.join(d, f"{name}.crt"),
        os.path.join(d, f"{name}.key"),
    )
