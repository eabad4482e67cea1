"""The SSLContexts a node uses and what a peer's certificate says (server/certs.py makes the
certificates; raftsql/tlsconfig.py holds the policy both ends share).

The role of a leaf is in the certificate: a URI subjectAltName ``urn:raftsql:role:node`` or
``urn:raftsql:role:client``. `peer_role` reads it from ``getpeercert()`` after the handshake has
verified the chain; it is the single source of truth for privileges. A certificate with no role
URI, or with more than one distinct role, has no role (None) and gets no privileges. A node
dials IP addresses, and `node_client_context` verifies the server's certificate against the
dialled address.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from raftsql.server.certs import (
    CA_CERT,
    CA_KEY,
    ROLE_CLIENT,
    ROLE_URI_PREFIX,
    ROLES,
    TLSConfigError,
    _cert_role,
    _cert_uris,
    _check_name,
    _read_cert,
    client_role_of,
    leaf_paths,
)
from raftsql.tlsconfig import InsecureKeyFileError, check_key_file, harden

# The errors a context builder raises, importable from here too.
__all__ = [
    "InsecureKeyFileError", "PeerRejectedError", "TLSConfigError", "describe_cert", "node_client_context",
    "PeerIdentity", "peer_client_role", "peer_identity", "peer_name", "peer_role", "peer_serial",
    "require_peer",
    "role_from_cert", "server_context",
]

log = logging.getLogger("raftsql.tls")


class PeerRejectedError(Exception):
    """Raised by require_peer when the other end's certificate lacks the required role/name."""


# --------------------------------------------------------------------------- contexts


_warned_flat: set[str] = set()


def _leaf_files(certs_dir: str | os.PathLike[str], node_name: str) -> tuple[str, str, str]:
    """ca.crt, NAME.crt, NAME.key of a node: in `certs_dir` (the node's own directory, or an old
    flat one), else in `certs_dir`/NAME (`certs_dir` is a CertsTree root)."""
    _check_name(node_name)
    d = Path(certs_dir)
    if not d.is_dir():
        raise TLSConfigError(f"certificate directory {d} does not exist")
    if not (d / f"{node_name}.crt").exists() and (d / node_name / f"{node_name}.crt").exists():
        d = d / node_name
    ca_cert = d / CA_CERT
    cert_path, key_path = leaf_paths(d, node_name)
    if not ca_cert.is_file():
        raise TLSConfigError(f"CA certificate not found: {ca_cert}")
    if not cert_path.is_file():
        raise TLSConfigError(
            f"node certificate not found: {cert_path}; create it with: "
            f"raftsql certs node CERTS_DIR --name {node_name} --host ADDRESS"
        )
    try:
        check_key_file(key_path)
    except FileNotFoundError:
        raise TLSConfigError(f"node private key not found: {key_path}") from None
    if (d / CA_KEY).exists() and str(d) not in _warned_flat:
        _warned_flat.add(str(d))
        log.warning("%s holds the CA private key next to this node's key: a node needs only its "
                    "own directory (raftsql certs init %s --split makes one)", d, d)
    return str(ca_cert), str(cert_path), str(key_path)


def _load(ctx: ssl.SSLContext, ca: str, cert: str, key: str) -> ssl.SSLContext:
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as e:
        raise TLSConfigError(f"cannot load CA certificate {ca}: {e}") from None
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise TLSConfigError(f"cannot load {cert} with key {key}: {e}") from None
    return ctx


def server_context(certs_dir: str | os.PathLike[str], node_name: str) -> ssl.SSLContext:
    """The listener's context: presents NAME.crt, requires a client certificate from the CA.

    TLS 1.2 minimum (1.3 when the peer has it). Nodes and drivers share this listener; after the
    handshake, `peer_role` tells them apart.
    Raises TLSConfigError (missing/unloadable files) or InsecureKeyFileError.
    """
    ca, cert, key = _leaf_files(certs_dir, node_name)
    _check_own_cert(ca, cert)
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    # Nobody resumes sessions (each connection is long-lived), so skip sending tickets.
    ctx.num_tickets = 0
    return _load(ctx, ca, cert, key)


def _check_own_cert(ca: str, cert: str) -> None:
    """A node's own certificate must be a node certificate issued by the CA beside it: every
    peer would refuse anything else, and the node would run on, cut off, saying nothing."""
    leaf = _read_cert(Path(cert), "certificate")
    role = _cert_role(leaf)
    if role != "node":
        raise TLSConfigError(
            f"{cert} is {'a ' + role if role else 'not a raftsql'} certificate, not a node "
            "certificate: peers would refuse it (make one with `raftsql certs node`)")
    authority = _read_cert(Path(ca), "CA certificate")
    try:
        leaf.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise TLSConfigError(
            f"{cert} was not issued by the CA in {ca} ({e or type(e).__name__}): peers would "
            "refuse it; use the certificates of one `raftsql certs init`") from None


def own_cert_covers(certs_dir: str | os.PathLike[str], node_name: str, host: str) -> bool:
    """Does this node's certificate hold `host` (an IP address or a DNS name) among its subject
    alternative names? Peers dial it by that host and check the name."""
    import ipaddress

    _, cert, _ = _leaf_files(certs_dir, node_name)
    leaf = _read_cert(Path(cert), "certificate")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower().rstrip(".") in {n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)}
    return ip in san.get_values_for_type(x509.IPAddress)


def node_client_context(certs_dir: str | os.PathLike[str], node_name: str) -> ssl.SSLContext:
    """Context for dialling a peer node: presents NAME.crt, trusts only the cluster CA and checks
    the hostname, so wrap with ``server_hostname=<the IP or name dialled>``.

    The caller should still `require_peer(sock, "node")`: the chain proves membership of the
    cluster, the role proves the peer is a node.
    """
    ca, cert, key = _leaf_files(certs_dir, node_name)
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = True
    return _load(ctx, ca, cert, key)


# --------------------------------------------------------------------------- peers


def role_from_cert(cert: dict | None) -> str | None:
    """The role in a ``getpeercert()`` dict: "node", "client", or None (no privileges)."""
    if not cert:
        return None
    roles = {
        value[len(ROLE_URI_PREFIX) :]
        for kind, value in cert.get("subjectAltName", ())
        if kind == "URI" and value.startswith(ROLE_URI_PREFIX)
    }
    return roles.pop() if len(roles) == 1 and roles <= ROLES else None


def _peercert(sock: ssl.SSLSocket) -> dict | None:
    try:
        # Empty unless the chain was verified (CERT_REQUIRED), so a role here is CA-attested.
        return sock.getpeercert()
    except (ValueError, OSError):  # handshake not done / socket closed
        return None


def peer_role(sock: ssl.SSLSocket) -> str | None:
    """The verified peer's role: "node", "client", or None (treat as no privileges)."""
    return role_from_cert(_peercert(sock))


def peer_name(sock: ssl.SSLSocket) -> str | None:
    """The verified peer certificate's subject commonName (the node or client name), or None."""
    cert = _peercert(sock)
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


@dataclasses.dataclass(frozen=True)
class PeerIdentity:
    """What a verified peer certificate says, read once: its role ("node", "client" or None),
    client role (clients only; None if conflicting), name (CN) and serial (serial_text)."""

    role: str | None
    client_role: str | None
    name: str | None
    serial: str | None


def peer_identity(sock: ssl.SSLSocket) -> PeerIdentity:
    """The verified peer's identity from one getpeercert() (each call decodes the whole
    certificate: a connection pays for it once)."""
    cert = _peercert(sock)
    if not cert:
        return PeerIdentity(None, None, None, None)
    role = role_from_cert(cert)
    uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    name = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), None)
    try:
        serial = serial_text(cert["serialNumber"]) if isinstance(cert.get("serialNumber"), str) else None
    except ValueError:
        serial = None
    return PeerIdentity(role, client_role_of(uris) if role == "client" else None, name, serial)


def peer_client_role(sock: ssl.SSLSocket) -> str | None:
    """A verified client certificate's client role ("read", "write" or "admin"; "write" for a
    certificate made before client roles existed), or None (conflicting client roles)."""
    cert = _peercert(sock)
    if not cert:
        return None
    return client_role_of(value for kind, value in cert.get("subjectAltName", ()) if kind == "URI")


def serial_text(serial: int | str) -> str:
    """A certificate serial as raftsql writes it: lower-case hex without leading zeros (what
    `raftsql certs show` prints). Accepts an int or hex text (colons allowed)."""
    if isinstance(serial, int):
        return f"{serial:x}"
    return f"{int(serial.replace(':', ''), 16):x}"


def peer_serial(sock: ssl.SSLSocket) -> str | None:
    """The verified peer certificate's serial number (serial_text), or None."""
    cert = _peercert(sock)
    value = cert.get("serialNumber") if cert else None
    try:
        return serial_text(value) if isinstance(value, str) else None
    except ValueError:
        return None


def require_peer(sock: ssl.SSLSocket, role: str, name: str | None = None) -> str:
    """Return the peer's name if it has `role` (and is called `name`); else PeerRejectedError."""
    actual_role, actual_name = peer_role(sock), peer_name(sock)
    if actual_role != role:
        raise PeerRejectedError(
            f"peer {actual_name or '?'} has role {actual_role or 'none'}, expected {role}"
        )
    if actual_name is None or (name is not None and actual_name != name):
        raise PeerRejectedError(f"peer is {actual_name or 'unnamed'}, expected {name}")
    return actual_name


# --------------------------------------------------------------------------- certificate files

_SAN_LABELS = {x509.DNSName: "DNS", x509.IPAddress: "IP", x509.UniformResourceIdentifier: "URI"}


def describe_cert(path: str | os.PathLike[str]) -> dict[str, str]:
    """Human-readable summary of a PEM certificate (for `raftsql certs show`): its role is
    "ca", "node", "client (read|write|admin)" or "none"."""
    cert = _read_cert(Path(path), "certificate")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = ", ".join(f"{_SAN_LABELS.get(type(n), type(n).__name__)}:{n.value}" for n in san)
    except x509.ExtensionNotFound:
        sans = ""
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    role = "ca" if ca else (_cert_role(cert) or "none")
    if role == ROLE_CLIENT:
        role = f"client ({client_role_of(_cert_uris(cert)) or 'conflicting client roles'})"
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "role": role,
        "san": sans,
        "serial": f"{cert.serial_number:x}",
        "not before": f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC",
        "not after": f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
    }
