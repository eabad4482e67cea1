"""Cluster certificates (cryptography): making them and the tree that keeps them (`raftsql certs`).

One private CA per cluster signs every certificate. `raftsql certs` keeps them in a tree
(`CertsTree`) that keeps the CA's private key apart from what nodes and clients are given:

    ROOT/ca/        ca.crt ca.key              the cluster CA (EC P-256, valid 10 years); stays here
    ROOT/client/    ca.crt client.crt client.key   a client's directory: ``?certs=ROOT/client``
    ROOT/n1/        ca.crt n1.crt n1.key       node n1's directory: ``--certs ROOT/n1``

Every directory is 0700 and every key 0600. A leaf is EC P-256, valid 5 years (capped at the CA).
A client's directory always names its pair client.crt/client.key (the files the driver reads),
whatever the certificate's name; a node's names it after the node id (the files the node reads).
Handing a node or a client its own directory gives it no other key: a node key would let its
holder pose as that node, the CA key would let it issue any certificate.

The old flat layout (ca.key next to every NAME.crt/NAME.key in one directory) still works, with
a warning; `CertsTree.split` (``raftsql certs init DIR --split``) moves it into the tree. The
functions below (`make_ca`, `make_node_cert`, `make_client_cert`) write one directory at a
time: into the CA's directory (flat) unless given an `out_dir`.

The role of a leaf is encoded *in the certificate*, in two places:
- a URI subjectAltName ``urn:raftsql:role:node`` or ``urn:raftsql:role:client``. This is what
  `peer_role` reads, from ``getpeercert()``, after the handshake has verified the chain; it is the
  single source of truth for privileges. A certificate with no role URI, or with more than one
  distinct role, has no role (None) and gets no privileges.
- ExtendedKeyUsage: nodes serverAuth + clientAuth, clients clientAuth only. OpenSSL enforces this
  during verification, so a client certificate cannot serve as a node's server certificate.

A client certificate also carries what its holder may do: a URI ``urn:raftsql:client-role:read``,
``...:write`` or ``...:admin`` (`client_role_of`). A client certificate without one was made
before client roles existed and counts as ``write``; one with two different client roles has
none and is refused.

Key files are 0600 from the moment they exist (mkstemp) and appear under their final name
atomically (link or rename), so a crash never leaves a truncated key or a world-readable one. A
certificate is written after its key: a ``.crt`` present means the pair is complete.

Node-to-node connections dial IP addresses, so a node certificate carries an IPAddress SAN for
each IP it listens on (plus a DNSName for its node name and any host names), and
`node_client_context` verifies the server's certificate hostname against the dialled address.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import ipaddress
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from raftsql.tlsconfig import InsecureKeyFileError, check_key_file

ROLE_NODE = "node"
ROLE_CLIENT = "client"
ROLES = frozenset({ROLE_NODE, ROLE_CLIENT})
ROLE_URI_PREFIX = "urn:raftsql:role:"
# What a client certificate allows: read < write < admin (server/access.py enforces it).
CLIENT_ROLE_URI_PREFIX = "urn:raftsql:client-role:"
CLIENT_ROLES = ("read", "write", "admin")
DEFAULT_CLIENT_ROLE = "write"  # `raftsql certs client`, and client certificates without the URI
ADMIN_STEM = "admin"  # `raftsql certs init` makes ROOT/admin, an admin client, next to ROOT/client

CA_VALIDITY = _dt.timedelta(days=3650)  # 10 years
LEAF_VALIDITY = _dt.timedelta(days=1826)  # 5 years, never beyond the CA's own expiry
# Backdate notBefore so a peer whose clock is a little behind still accepts a fresh certificate.
CLOCK_SKEW = _dt.timedelta(minutes=5)

CA_CERT, CA_KEY = "ca.crt", "ca.key"
CA_SUBDIR = "ca"  # CertsTree: ROOT/ca holds the CA
CLIENT_STEM = "client"  # a client's own directory holds client.crt/client.key
ORGANIZATION = "raftsql"

log = logging.getLogger("raftsql.tls")

# A leaf name is a file stem and a DNS label: letters, digits, inner hyphens, at most 63.
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_RESERVED_NAMES = frozenset({"ca"})
_DNS_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


class TLSConfigError(Exception):
    """Raised when certificate material is missing, invalid, or inconsistent; the message says what to do."""


class CertificateExistsError(TLSConfigError, FileExistsError):
    """Raised when a certificate or key would be overwritten without force=True."""


@dataclasses.dataclass(frozen=True)
class Issued:
    """Paths of a certificate and its key; created is False if an existing valid pair was kept."""

    cert_path: Path
    key_path: Path
    created: bool = True


# --------------------------------------------------------------------------- paths


def ca_paths(certs_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    d = Path(certs_dir)
    return d / CA_CERT, d / CA_KEY


def leaf_paths(certs_dir: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    d = Path(certs_dir)
    return d / f"{name}.crt", d / f"{name}.key"


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise TLSConfigError(
            f"invalid name {name!r}: use letters, digits and inner hyphens (at most 63 characters)"
        )
    if name.lower() in _RESERVED_NAMES:
        raise TLSConfigError(f"the name {name!r} is reserved for the cluster CA")


def _parse_hosts(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if host.startswith("[") and host.endswith("]"):  # [::1]
            host = host[1:-1]
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        # An all-numeric last label is a mistyped IP address (300.1.1.1), never a host name.
        if not _DNS_RE.match(host) or host.rsplit(".", 1)[-1].isdigit():
            raise TLSConfigError(f"invalid host {host!r}: expected an IP address or a DNS name")
        names.append(x509.DNSName(host.lower()))
    return names


# --------------------------------------------------------------------------- files


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported (e.g. Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write `data` to `path` atomically with `mode`; never exposes wider permissions.

    mkstemp creates the temporary file 0600 with O_EXCL, so key bytes are never readable by
    others, even while being written. Without `overwrite`, link() refuses an existing target.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise CertificateExistsError(f"{path} already exists") from None
            except OSError:  # filesystem without hard links: check, then rename
                if path.exists():
                    raise CertificateExistsError(f"{path} already exists") from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_pair(
    cert_path: Path,
    key_path: Path,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    *,
    overwrite: bool,
) -> None:
    # Key first: the certificate's presence marks a complete pair.
    _write_file(key_path, _key_pem(key), 0o600, overwrite=overwrite)
    _write_file(
        cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, overwrite=overwrite
    )


def _read_cert(path: Path, what: str) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{what} not found: {path}") from None
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise TLSConfigError(f"{what} {path} is not a PEM certificate: {e}") from None


def _read_key(path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        check_key_file(path)
        data = path.read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{what} not found: {path}") from None
    except InsecureKeyFileError:
        raise
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError(f"{what} {path} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TLSConfigError(f"{what} {path} is not an EC private key")
    return key


def _load_ca(certs_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not certs_dir.is_dir():
        raise TLSConfigError(
            f"certificate directory {certs_dir} does not exist; "
            f"create it with: raftsql certs init {certs_dir}"
        )
    cert_path, key_path = ca_paths(certs_dir)
    if not cert_path.exists():
        raise TLSConfigError(
            f"no CA in {certs_dir} ({CA_CERT} not found); "
            f"create one with: raftsql certs init {certs_dir}"
        )
    cert = _read_cert(cert_path, "CA certificate")
    key = _read_key(key_path, "CA private key")
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise TLSConfigError(f"{key_path} does not belong to {cert_path}")
    return cert, key


# --------------------------------------------------------------------------- issuing


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _build_ca(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = _now()
    # A random suffix keeps the CAs of different clusters apart in error messages and chains.
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, f"raftsql cluster CA {secrets.token_hex(4)}"),
        ]
    )
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _build_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    name: str,
    role: str | None,
    sans: Sequence[x509.GeneralName],
    client_role: str | None = None,
) -> x509.Certificate:
    """Issue a leaf for `name`. role=None builds a role-less certificate (tests only);
    client_role (role client only) adds the client-role URI."""
    now = _now()
    not_after = min(now + LEAF_VALIDITY, ca_cert.not_valid_after_utc)
    eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == ROLE_NODE:
        eku.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    general_names: list[x509.GeneralName] = list(sans)
    if role is not None:
        general_names.append(x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role))
    if client_role is not None:
        general_names.append(x509.UniformResourceIdentifier(CLIENT_ROLE_URI_PREFIX + client_role))
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if general_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _cert_role(cert: x509.Certificate) -> str | None:
    roles = {u[len(ROLE_URI_PREFIX):] for u in _cert_uris(cert) if u.startswith(ROLE_URI_PREFIX)}
    return roles.pop() if len(roles) == 1 and roles <= ROLES else None


def client_role_of(uris: Iterable[str]) -> str | None:
    """A client certificate's client role from its URI subjectAltNames: the one client-role URI,
    DEFAULT_CLIENT_ROLE when there is none (made before client roles existed), None when there
    are several different ones or an unknown one (no privileges)."""
    roles = {u[len(CLIENT_ROLE_URI_PREFIX):] for u in uris if u.startswith(CLIENT_ROLE_URI_PREFIX)}
    if not roles:
        return DEFAULT_CLIENT_ROLE
    return roles.pop() if len(roles) == 1 and roles <= set(CLIENT_ROLES) else None


def _cert_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def check_client_role(client_role: str) -> str:
    if client_role not in CLIENT_ROLES:
        raise TLSConfigError(
            f"unknown client role {client_role!r}: use one of {', '.join(CLIENT_ROLES)}"
        )
    return client_role


def _existing_leaf_problem(
    cert_path: Path,
    key_path: Path,
    name: str,
    role: str,
    sans: Sequence[x509.GeneralName],
    ca_cert: x509.Certificate,
    ca_dir: Path,
    client_role: str | None = None,
) -> str | None:
    """Why the existing certificate/key pair does not fit the request, or None if it does."""
    if not cert_path.exists():
        return f"{key_path} exists without {cert_path.name} (interrupted run?)"
    cert = _read_cert(cert_path, "certificate")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return f"{cert_path} was not issued by the CA in {ca_dir}"
    actual_role = _cert_role(cert)
    if actual_role != role:
        return (
            f"{cert_path} is a {actual_role or 'role-less'} certificate, not a {role} certificate"
        )
    if client_role is not None:
        actual_client_role = client_role_of(_cert_uris(cert))
        if actual_client_role != client_role:
            return (
                f"{cert_path} has the client role {actual_client_role or '(conflicting)'}, "
                f"not {client_role}"
            )
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [name]:
        return f"{cert_path} is the certificate of {', '.join(map(str, names)) or 'nobody'}, not {name}"
    if cert.not_valid_after_utc <= _now():
        return f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    try:
        have = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        have = set()
    missing = [san.value for san in sans if san not in have]
    if missing:
        return f"{cert_path} lacks subjectAltName entries for {', '.join(map(str, missing))}"
    key = _read_key(key_path, "private key")
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        return f"{key_path} does not belong to {cert_path}"
    return None


def _private_dir(d: Path) -> None:
    if d.exists() and not d.is_dir():
        raise TLSConfigError(f"{d} exists and is not a directory")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)  # the directory holds keys; mkdir's mode is subject to the umask


def _write_ca_copy(out_dir: Path, ca_cert: x509.Certificate) -> None:
    """ca.crt in a node's or client's own directory: the CA certificate (public), never its key."""
    data = ca_cert.public_bytes(serialization.Encoding.PEM)
    path = out_dir / CA_CERT
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    _write_file(path, data, 0o644, overwrite=True)


def _check_own_dir(out_dir: Path, cert_path: Path) -> None:
    """A node's or client's directory holds one leaf: refuse to add a second one (or a CA key)."""
    if not out_dir.is_dir():
        return
    if (out_dir / CA_KEY).exists():
        raise TLSConfigError(f"{out_dir} holds a CA key ({CA_KEY}); it cannot be a node's or client's directory")
    others = sorted(
        p.name for p in out_dir.glob("*.crt") if p.name not in (CA_CERT, cert_path.name)
    )
    if others:
        raise TLSConfigError(
            f"{out_dir} already holds {', '.join(others)} (another certificate); choose another name"
        )


def make_ca(
    certs_dir: str | os.PathLike[str], *, force: bool = False, exist_ok: bool = False
) -> Issued:
    """Create `certs_dir` (0700) and a new cluster CA in it: ca.crt, ca.key (0600).

    An existing CA is kept: with exist_ok it is returned with created=False (after checking that
    key and certificate match), otherwise CertificateExistsError. force replaces it, which
    invalidates every certificate it signed.
    """
    d = Path(certs_dir)
    cert_path, key_path = ca_paths(d)
    if not force:
        if cert_path.exists() and exist_ok:
            _load_ca(d)  # raises if the pair is unusable
            return Issued(cert_path, key_path, created=False)
        for p in (cert_path, key_path):
            if p.exists():
                raise CertificateExistsError(
                    f"{p} already exists; use --force to replace the CA "
                    "(this invalidates every certificate it signed)"
                )
    _private_dir(d)
    key = _new_key()
    _write_pair(cert_path, key_path, _build_ca(key), key, overwrite=force)
    return Issued(cert_path, key_path)


def _make_leaf(
    certs_dir: str | os.PathLike[str],
    name: str,
    role: str,
    sans: list[x509.GeneralName],
    *,
    out_dir: str | os.PathLike[str] | None,
    stem: str,
    force: bool,
    exist_ok: bool,
    client_role: str | None = None,
) -> Issued:
    _check_name(name)
    d = Path(certs_dir)
    ca_cert, ca_key = _load_ca(d)
    out = d if out_dir is None else Path(out_dir)
    own_dir = out_dir is not None and out.resolve() != d.resolve()
    cert_path, key_path = out / f"{stem}.crt", out / f"{stem}.key"
    if own_dir:
        _check_own_dir(out, cert_path)
    if not force and (cert_path.exists() or key_path.exists()):
        problem = _existing_leaf_problem(
            cert_path, key_path, name, role, sans, ca_cert, d, client_role
        )
        if exist_ok and problem is None:
            if own_dir:
                _write_ca_copy(out, ca_cert)  # an interrupted run may have missed it
            return Issued(cert_path, key_path, created=False)
        raise CertificateExistsError(
            f"{problem or f'{cert_path} already exists'}; use --force to reissue it"
        )
    key = _new_key()
    cert = _build_leaf(ca_cert, ca_key, key, name, role, sans, client_role)
    if own_dir:
        _private_dir(out)
        _write_ca_copy(out, ca_cert)  # first: the leaf's .crt marks a complete directory
    _write_pair(cert_path, key_path, cert, key, overwrite=force)
    return Issued(cert_path, key_path)


def make_node_cert(
    certs_dir: str | os.PathLike[str],
    name: str,
    hosts: Iterable[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    exist_ok: bool = False,
) -> Issued:
    """Issue NAME.crt/NAME.key for node `name`, signed by the CA in `certs_dir`.

    They go into `certs_dir` (the old flat layout), or into `out_dir` (0700) with a copy of
    ca.crt: the node's own directory, its ``--certs``.
    SANs: an IPAddress for each IP in `hosts`, a DNSName for each other host and for `name`,
    and the role URI ``urn:raftsql:role:node``. EKU serverAuth + clientAuth.
    With exist_ok, an existing pair from this CA that already covers every host is kept
    (created=False); an existing pair that does not fit raises CertificateExistsError.
    """
    _check_name(name)
    hosts = list(hosts)
    if not hosts:
        raise TLSConfigError(f"node {name!r} needs at least one host (the address peers dial)")
    sans = _parse_hosts(hosts)
    name_san = x509.DNSName(name.lower())
    if name_san not in sans:
        sans.append(name_san)
    sans = list(dict.fromkeys(sans))  # dedupe, keep order
    return _make_leaf(
        certs_dir, name, ROLE_NODE, sans, out_dir=out_dir, stem=name, force=force, exist_ok=exist_ok
    )


def make_client_cert(
    certs_dir: str | os.PathLike[str],
    name: str = "client",
    *,
    role: str = DEFAULT_CLIENT_ROLE,
    out_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    exist_ok: bool = False,
) -> Issued:
    """Issue a certificate for driver client `name`: role URI ``urn:raftsql:role:client`` and
    the client role ``urn:raftsql:client-role:ROLE`` (read, write or admin), EKU clientAuth only
    (it cannot act as a server). exist_ok as for `make_node_cert` (an existing certificate with
    another client role does not fit).

    Flat (no `out_dir`): NAME.crt/NAME.key in `certs_dir`. With `out_dir`, the client's own
    directory: client.crt/client.key and a copy of ca.crt, what ``?certs=OUT_DIR`` reads."""
    check_client_role(role)
    stem = name if out_dir is None else CLIENT_STEM
    return _make_leaf(
        certs_dir, name, ROLE_CLIENT, [], out_dir=out_dir, stem=stem, force=force,
        exist_ok=exist_ok, client_role=role,
    )


# --------------------------------------------------------------------------- the tree


class CertsTree:
    """The certificate directory `raftsql certs`, `raftsql cluster up` and the test harness
    keep: ROOT/ca/ for the CA, ROOT/NAME/ for each node or client (see the module docstring).

    A ROOT with ca.key (or ca.crt) directly inside is the old flat layout (`legacy`): the CA
    stays there and new leaves are written next to it, as before, until `split` moves them.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    @property
    def legacy(self) -> bool:
        r = self.root
        return (r / CA_KEY).exists() or (
            (r / CA_CERT).exists() and not (r / CA_SUBDIR / CA_CERT).exists()
        )

    @property
    def ca_dir(self) -> Path:
        return self.root if self.legacy else self.root / CA_SUBDIR

    def own_dir(self, name: str) -> Path:
        """The directory of node or client `name` (ROOT itself in the flat layout)."""
        _check_name(name)
        return self.root if self.legacy else self.root / name

    def legacy_warning(self) -> str | None:
        """What is wrong with a flat directory and how to fix it, or None."""
        if not self.legacy:
            return None
        return (
            f"{self.root} has the old flat layout: the CA private key {self.root / CA_KEY} sits "
            f"next to the client and node keys, so whoever is given {self.root} (as ?certs= or "
            "--certs) can issue certificates and pose as any node. Move every key into its own "
            f"directory with: raftsql certs init {self.root} --split"
        )

    def leaf_certs(self) -> list[Path]:
        """Every node and client certificate under ROOT (both layouts)."""
        found = [p for p in self.root.glob("*.crt") if p.name != CA_CERT]
        for d in sorted(self.root.iterdir()) if self.root.is_dir() else ():
            if d.is_dir() and d.name != CA_SUBDIR:
                found += [p for p in d.glob("*.crt") if p.name != CA_CERT]
        return sorted(found)

    def _require_ca(self) -> Path:
        if not self.root.is_dir():
            raise TLSConfigError(
                f"certificate directory {self.root} does not exist; "
                f"create it with: raftsql certs init {self.root}"
            )
        ca_dir = self.ca_dir
        if not (ca_dir / CA_CERT).exists():
            raise TLSConfigError(
                f"no CA in {self.root} ({ca_dir / CA_CERT} not found); "
                f"create one with: raftsql certs init {self.root}"
            )
        return ca_dir

    def init(self, *, force: bool = False, exist_ok: bool = False) -> tuple[Issued, Issued]:
        """ROOT (0700) with the CA in ROOT/ca, the client directory ROOT/client (client role
        write) and the operator's ROOT/admin (client role admin).

        A flat ROOT keeps its CA (with exist_ok) and gets its client pair next to it, as before
        (no admin: a flat directory cannot name it in ?certs=; split it first).
        force makes a new CA in ROOT/ca (and removes a flat CA): every certificate it signed
        is then untrusted. Returns (CA, client); `admin_dir` is the admin's directory."""
        if self.root.exists() and not self.root.is_dir():
            raise TLSConfigError(f"{self.root} exists and is not a directory")
        _private_dir(self.root)
        if force and self.legacy:
            ca = make_ca(self.root / CA_SUBDIR, force=True)
            for p in (self.root / CA_KEY, self.root / CA_CERT):
                p.unlink(missing_ok=True)
        else:
            ca = make_ca(self.ca_dir, force=force, exist_ok=exist_ok)
        client = self.client(CLIENT_STEM, force=force, exist_ok=exist_ok)
        if not self.legacy:
            self.client(ADMIN_STEM, role="admin", force=force, exist_ok=exist_ok)
        return ca, client

    @property
    def admin_dir(self) -> Path:
        """The admin client's directory (``?certs=`` for membership, backups, revocation)."""
        return self.root / ADMIN_STEM

    def node(
        self, name: str, hosts: Iterable[str], *, force: bool = False, exist_ok: bool = False
    ) -> Issued:
        """Node `name`'s certificate in its own directory ROOT/NAME (NAME.crt, NAME.key, ca.crt)."""
        ca_dir = self._require_ca()
        out = None if self.legacy else self.own_dir(name)
        return make_node_cert(ca_dir, name, hosts, out_dir=out, force=force, exist_ok=exist_ok)

    def client(self, name: str = CLIENT_STEM, *, role: str = DEFAULT_CLIENT_ROLE,
               force: bool = False, exist_ok: bool = False) -> Issued:
        """Client `name`'s certificate, with client role `role`, in its own directory ROOT/NAME
        (client.crt, client.key, ca.crt): the directory to pass as ``?certs=``."""
        ca_dir = self._require_ca()
        out = None if self.legacy else self.own_dir(name)
        return make_client_cert(ca_dir, name, role=role, out_dir=out, force=force, exist_ok=exist_ok)

    def split(self) -> list[str]:
        """Move a flat ROOT into the tree: ca.key and ca.crt into ROOT/ca, each NAME.crt/NAME.key
        into ROOT/NAME with a copy of ca.crt (a client's pair renamed client.crt/client.key).
        The CA and every certificate are kept. Idempotent: a run cut short is finished by the
        next. Returns one line per change (empty if ROOT was not flat)."""
        r = self.root
        top_cert, top_key = r / CA_CERT, r / CA_KEY
        if not (top_cert.exists() or top_key.exists()):
            return []
        done: list[str] = []
        ca_dir = r / CA_SUBDIR
        _private_dir(r)
        _private_dir(ca_dir)
        if top_key.exists():
            check_key_file(top_key)
            if (ca_dir / CA_KEY).exists():
                raise TLSConfigError(f"both {top_key} and {ca_dir / CA_KEY} exist; keep one")
            os.rename(top_key, ca_dir / CA_KEY)
            done.append(f"moved {top_key} to {ca_dir / CA_KEY}")
        if not (ca_dir / CA_CERT).exists():
            _write_file(ca_dir / CA_CERT, top_cert.read_bytes(), 0o644, overwrite=False)
            done.append(f"copied {top_cert} to {ca_dir / CA_CERT}")
        _fsync_dir(r)
        ca_cert, _ = _load_ca(ca_dir)
        for crt in sorted(p for p in r.glob("*.crt") if p.name != CA_CERT):
            name = crt.stem
            key = r / f"{name}.key"
            try:
                _check_name(name)
            except TLSConfigError:
                done.append(f"left {crt} where it is (not a certificate name)")
                continue
            role = _cert_role(_read_cert(crt, "certificate"))
            out = r / name
            stem = CLIENT_STEM if role == ROLE_CLIENT else name
            dest_crt, dest_key = out / f"{stem}.crt", out / f"{stem}.key"
            _check_own_dir(out, dest_crt)
            for dest in (dest_crt, dest_key):
                if dest.exists():
                    raise TLSConfigError(f"both {r / (name + dest.suffix)} and {dest} exist; keep one")
            _private_dir(out)
            _write_ca_copy(out, ca_cert)
            if key.exists():
                os.rename(key, dest_key)  # key first: the .crt marks a complete directory
            os.rename(crt, dest_crt)
            _fsync_dir(out)
            done.append(f"moved {crt.name}{' and ' + key.name if dest_key.exists() else ''} to {out}/"
                        + (f" (as {dest_crt.name})" if stem != name else ""))
        if top_cert.exists():
            top_cert.unlink()  # last: its absence marks a finished split
            _fsync_dir(r)
            done.append(f"removed {top_cert} (each directory has its copy)")
        return done
