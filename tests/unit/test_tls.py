"""Certificates and mutual TLS: real handshakes over loopback, one thread per server."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from raftsql.driver import _tls as driver_tls
from raftsql.server import certs as pki
from raftsql.server import tls

TIMEOUT = 5.0


# --------------------------------------------------------------------------- fixtures


def _make_cluster(d: Path) -> Path:
    pki.make_ca(d)
    pki.make_node_cert(d, "n1", ["127.0.0.1", "::1", "localhost"])
    pki.make_node_cert(d, "n2", ["127.0.0.1"])
    pki.make_client_cert(d)
    return d


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    return _make_cluster(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> Path:
    """A second cluster with its own CA: same names, different trust root."""
    return _make_cluster(tmp_path_factory.mktemp("foreign"))


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# --------------------------------------------------------------------------- handshake harness


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str = "127.0.0.1"
) -> dict:
    """Run one TLS connection over 127.0.0.1; report what each side saw.

    On success the server sends b"ok" and the client records what it received. Every socket is
    closed and the server thread joined before returning.
    """
    result: dict = {}
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as e:
            result["server_error"] = e
            return
        conn.settimeout(TIMEOUT)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as s:
                result["server_saw_role"] = tls.peer_role(s)
                result["server_saw_name"] = tls.peer_name(s)
                result["server_saw_client_role"] = tls.peer_client_role(s)
                result["server_saw_serial"] = tls.peer_serial(s)
                result["server_saw_identity"] = tls.peer_identity(s)
                result["version"] = s.version()
                s.sendall(b"ok")
                try:
                    s.recv(1)  # wait for the client to close
                except OSError:
                    pass
        except OSError as e:  # ssl.SSLError is an OSError
            result["server_error"] = e
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw:
            try:
                with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as c:
                    result["client_saw_role"] = tls.peer_role(c)
                    result["client_saw_name"] = tls.peer_name(c)
                    received = b""
                    while len(received) < 2:
                        chunk = c.recv(2 - len(received))
                        if not chunk:
                            break
                        received += chunk
                    result["client_received"] = received
            except OSError as e:
                result["client_error"] = e
    finally:
        thread.join(TIMEOUT)
        listener.close()
    assert not thread.is_alive(), "server thread hung"
    return result


def assert_refused(result: dict) -> None:
    assert result.get("client_received") != b"ok", result
    assert "server_error" in result or "client_error" in result, result


# --------------------------------------------------------------------------- handshakes


def test_node_to_node_handshake_gives_node_role(certs):
    r = handshake(tls.server_context(certs, "n1"), tls.node_client_context(certs, "n2"))
    assert r.get("client_received") == b"ok", r
    assert r["server_saw_role"] == "node"
    assert r["server_saw_name"] == "n2"
    assert r["server_saw_identity"] == tls.PeerIdentity("node", None, "n2", r["server_saw_serial"])
    assert r["server_saw_serial"] is not None
    assert r["client_saw_role"] == "node"
    assert r["client_saw_name"] == "n1"
    assert r["version"] == "TLSv1.3"


def test_node_client_context_over_ipv6_and_dns_name(certs):
    r = handshake(
        tls.server_context(certs, "n1"), tls.node_client_context(certs, "n2"), "localhost"
    )
    assert r.get("client_received") == b"ok", r
    # n1 also lists ::1; hostname checking accepts an IPv6 literal SAN.
    assert ipaddress.ip_address("::1") in _sans(certs / "n1.crt").get_values_for_type(
        x509.IPAddress
    )


def test_driver_client_context_against_server_context(certs):
    ctx = driver_tls.client_context(*driver_tls.default_paths(certs))
    r = handshake(tls.server_context(certs, "n1"), ctx)
    assert r.get("client_received") == b"ok", r
    assert r["server_saw_role"] == "client"
    assert r["server_saw_name"] == "client"
    assert r["client_saw_role"] == "node"


def test_tls12_still_works(certs):
    ctx = driver_tls.client_context(*driver_tls.default_paths(certs))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    r = handshake(tls.server_context(certs, "n1"), ctx)
    assert r.get("client_received") == b"ok", r
    assert r["version"] == "TLSv1.2"
    assert r["server_saw_role"] == "client"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls11_is_refused_by_the_server(certs):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(certs / "ca.crt")
    ctx.load_cert_chain(certs / "client.crt", certs / "client.key")
    try:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot offer TLS 1.1 at all")
    assert_refused(handshake(tls.server_context(certs, "n1"), ctx))


def test_foreign_node_is_refused_by_our_server(certs, foreign):
    # The client trusts our CA (so only the server's check can fail) but presents a foreign cert.
    ctx = driver_tls.client_context(certs / "ca.crt", foreign / "n2.crt", foreign / "n2.key")
    r = handshake(tls.server_context(certs, "n1"), ctx)
    assert_refused(r)
    assert isinstance(r.get("server_error"), ssl.SSLCertVerificationError), r
    assert "server_saw_role" not in r
    # TLS 1.3: the client's handshake completes; the rejection arrives on its first read.
    assert isinstance(r.get("client_error"), ssl.SSLError), r


def test_foreign_cluster_both_ways(certs, foreign):
    r = handshake(tls.server_context(certs, "n1"), tls.node_client_context(foreign, "n2"))
    assert_refused(r)
    assert isinstance(r.get("server_error"), ssl.SSLError), r


def test_foreign_driver_client_is_refused_by_our_server(certs, foreign):
    ctx = driver_tls.client_context(
        certs / "ca.crt", foreign / "client.crt", foreign / "client.key"
    )
    r = handshake(tls.server_context(certs, "n1"), ctx)
    assert_refused(r)
    assert isinstance(r.get("server_error"), ssl.SSLCertVerificationError), r


def test_our_client_refuses_a_foreign_server(certs, foreign):
    r = handshake(tls.server_context(foreign, "n1"), tls.node_client_context(certs, "n2"))
    assert_refused(r)
    assert isinstance(r.get("client_error"), ssl.SSLCertVerificationError), r


def test_driver_refuses_a_foreign_server(certs, foreign):
    ctx = driver_tls.client_context(*driver_tls.default_paths(certs))
    r = handshake(tls.server_context(foreign, "n1"), ctx)
    assert_refused(r)
    assert isinstance(r.get("client_error"), ssl.SSLCertVerificationError), r


def test_hostname_mismatch_is_refused(certs):
    r = handshake(tls.server_context(certs, "n2"), tls.node_client_context(certs, "n1"), "10.9.9.9")
    assert_refused(r)
    assert isinstance(r.get("client_error"), ssl.SSLCertVerificationError), r


def test_client_certificate_cannot_act_as_a_server(certs):
    # A node refuses to start with one (every peer would refuse it) ...
    with pytest.raises(tls.TLSConfigError, match="a client certificate, not a node certificate"):
        tls.server_context(certs, "client")
    # ... and, built anyway, EKU clientAuth only: the verifier rejects it for serverAuth even
    # with a matching chain.
    ctx = tls._load(tls.harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)), *tls._leaf_files(certs, "client"))
    r = handshake(ctx, tls.node_client_context(certs, "n1"))
    assert_refused(r)
    assert isinstance(r.get("client_error"), ssl.SSLCertVerificationError), r


def test_a_node_certificate_from_another_ca_is_refused_at_start(certs, tmp_path):
    other = tmp_path / "other"
    pki.make_ca(other)
    pki.make_node_cert(other, "n1", ["127.0.0.1"])
    (other / "ca.crt").write_bytes((certs / "ca.crt").read_bytes())  # beside the wrong CA
    with pytest.raises(tls.TLSConfigError, match="was not issued by the CA"):
        tls.server_context(other, "n1")


def test_client_without_certificate_is_refused(certs):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(certs / "ca.crt")
    r = handshake(tls.server_context(certs, "n1"), ctx)
    assert_refused(r)
    assert isinstance(r.get("server_error"), ssl.SSLError), r


def test_roleless_certificate_gets_no_role(certs, tmp_path):
    d = tmp_path / "c"
    pki.make_ca(d)
    pki.make_node_cert(d, "n1", ["127.0.0.1"])
    ca_cert, ca_key = pki._load_ca(d)
    key = pki._new_key()
    cert = pki._build_leaf(ca_cert, ca_key, key, "anon", None, [])
    pki._write_pair(d / "anon.crt", d / "anon.key", cert, key, overwrite=False)
    ctx = driver_tls.client_context(d / "ca.crt", d / "anon.crt", d / "anon.key")
    r = handshake(tls.server_context(d, "n1"), ctx)
    assert r.get("client_received") == b"ok", r  # a valid chain: handshake succeeds ...
    assert r["server_saw_role"] is None  # ... but it carries no privileges
    assert r["server_saw_name"] == "anon"


def test_require_peer(certs):
    seen = {}

    def check(sock):
        for role, name in [("node", None), ("node", "n2"), ("client", None), ("node", "n3")]:
            try:
                seen[(role, name)] = tls.require_peer(sock, role, name)
            except tls.PeerRejectedError as e:
                seen[(role, name)] = e

    server_ctx = tls.server_context(certs, "n1")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)

    def serve():
        conn, _ = listener.accept()
        conn.settimeout(TIMEOUT)
        with server_ctx.wrap_socket(conn, server_side=True) as s:
            check(s)
            s.sendall(b"x")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw:
            ctx = tls.node_client_context(certs, "n2")
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as c:
                assert c.recv(1) == b"x"
    finally:
        t.join(TIMEOUT)
        listener.close()
    assert seen[("node", None)] == "n2"
    assert seen[("node", "n2")] == "n2"
    assert isinstance(seen[("client", None)], tls.PeerRejectedError)
    assert isinstance(seen[("node", "n3")], tls.PeerRejectedError)


# --------------------------------------------------------------------------- roles from dicts


@pytest.mark.parametrize(
    ("cert", "role"),
    [
        ({"subjectAltName": (("URI", "urn:raftsql:role:node"),)}, "node"),
        ({"subjectAltName": (("DNS", "x"), ("URI", "urn:raftsql:role:client"))}, "client"),
        ({"subjectAltName": (("URI", "urn:raftsql:role:admin"),)}, None),
        (
            {
                "subjectAltName": (
                    ("URI", "urn:raftsql:role:node"),
                    ("URI", "urn:raftsql:role:client"),
                )
            },
            None,
        ),
        ({"subjectAltName": (("DNS", "urn:raftsql:role:node"),)}, None),
        ({"subject": ((("commonName", "n1"),),)}, None),
        ({}, None),
        (None, None),
    ],
)
def test_role_from_cert(cert, role):
    assert tls.role_from_cert(cert) == role


def test_peer_role_of_unconnected_socket_is_none(certs):
    ctx = tls.node_client_context(certs, "n1")
    with (
        socket.socket() as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1", do_handshake_on_connect=False) as s,
    ):
        assert tls.peer_role(s) is None
        assert tls.peer_name(s) is None
        assert tls.peer_identity(s) == tls.PeerIdentity(None, None, None, None)


# --------------------------------------------------------------------------- certificate contents


def _sans(path: Path) -> x509.SubjectAlternativeName:
    return _load(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def test_node_cert_sans_contain_ip_name_and_role(certs):
    san = _sans(certs / "n1.crt")
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert {"n1", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:raftsql:role:node"]
    # 127.0.0.1 must be an IPAddress SAN, not a DNSName that merely looks like one.
    assert "127.0.0.1" not in san.get_values_for_type(x509.DNSName)


def test_extended_key_usage_per_role(certs):
    def eku(name):
        return set(
            _load(certs / f"{name}.crt")
            .extensions.get_extension_for_class(x509.ExtendedKeyUsage)
            .value
        )

    assert eku("n1") == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert eku("client") == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert _sans(certs / "client.crt").get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:raftsql:role:client", "urn:raftsql:client-role:write"
    ]


def test_ca_and_leaf_basics(certs):
    ca = _load(certs / "ca.crt")
    leaf = _load(certs / "n1.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    leaf.verify_directly_issued_by(ca)
    ca_days = (ca.not_valid_after_utc - ca.not_valid_before_utc).days
    leaf_days = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days
    assert 3640 <= ca_days <= 3660
    assert 1820 <= leaf_days <= 1830
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc
    assert leaf.serial_number != _load(certs / "n2.crt").serial_number
    assert leaf.public_key().curve.name == "secp256r1"


def test_file_modes(certs):
    assert stat.S_IMODE(certs.stat().st_mode) == 0o700
    for name in ("ca", "n1", "n2", "client"):
        assert stat.S_IMODE((certs / f"{name}.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((certs / f"{name}.crt").stat().st_mode) == 0o644
    assert not list(certs.glob(".*.tmp")), "temporary files left behind"


def test_key_modes_ignore_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        pki.make_ca(tmp_path / "d")
        pki.make_node_cert(tmp_path / "d", "n1", ["127.0.0.1"])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "d" / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "d" / "n1.key").stat().st_mode) == 0o600


# --------------------------------------------------------------------------- issuing rules


def test_make_ca_refuses_to_overwrite(tmp_path):
    first = pki.make_ca(tmp_path)
    original = first.cert_path.read_bytes()
    with pytest.raises(pki.CertificateExistsError):
        pki.make_ca(tmp_path)
    kept = pki.make_ca(tmp_path, exist_ok=True)
    assert kept.created is False
    assert first.cert_path.read_bytes() == original
    assert pki.make_ca(tmp_path, force=True).created
    assert first.cert_path.read_bytes() != original


def test_make_ca_refuses_orphan_key(tmp_path):
    pki.make_ca(tmp_path)
    (tmp_path / "ca.crt").unlink()
    with pytest.raises(pki.CertificateExistsError, match="ca.key"):
        pki.make_ca(tmp_path, exist_ok=True)


def test_node_reissue_rules(tmp_path, foreign):
    pki.make_ca(tmp_path)
    pki.make_node_cert(tmp_path, "n1", ["127.0.0.1", "10.0.0.1"])
    assert not pki.make_node_cert(tmp_path, "n1", ["10.0.0.1"], exist_ok=True).created
    with pytest.raises(pki.CertificateExistsError, match="10.0.0.2"):
        pki.make_node_cert(tmp_path, "n1", ["10.0.0.2"], exist_ok=True)
    with pytest.raises(pki.CertificateExistsError):
        pki.make_node_cert(tmp_path, "n1", ["127.0.0.1"])
    assert pki.make_node_cert(tmp_path, "n1", ["10.0.0.2"], force=True).created
    # A certificate from another CA is not "already there".
    (tmp_path / "n2.crt").write_bytes((foreign / "n2.crt").read_bytes())
    (tmp_path / "n2.key").write_bytes((foreign / "n2.key").read_bytes())
    os.chmod(tmp_path / "n2.key", 0o600)
    with pytest.raises(pki.CertificateExistsError, match="not issued by the CA"):
        pki.make_node_cert(tmp_path, "n2", ["127.0.0.1"], exist_ok=True)
    # A name already used by a client certificate cannot become a node.
    pki.make_client_cert(tmp_path, "alice")
    with pytest.raises(pki.CertificateExistsError, match="client certificate"):
        pki.make_node_cert(tmp_path, "alice", ["127.0.0.1"], exist_ok=True)


@pytest.mark.parametrize("name", ["", "a/b", "../x", "-n1", "n1-", "ca", "CA", "x" * 64, "a.b"])
def test_invalid_names_are_refused(tmp_path, name):
    pki.make_ca(tmp_path)
    with pytest.raises(pki.TLSConfigError):
        pki.make_node_cert(tmp_path, name, ["127.0.0.1"])


@pytest.mark.parametrize(
    "host", ["", "bad host", "a..b", "-x.com", "300.1.1.1", "1.2.3", "a_b.com"]
)
def test_invalid_hosts_are_refused(tmp_path, host):
    pki.make_ca(tmp_path)
    with pytest.raises(pki.TLSConfigError, match="invalid host"):
        pki.make_node_cert(tmp_path, "n1", [host])


def test_node_needs_a_host(tmp_path):
    pki.make_ca(tmp_path)
    with pytest.raises(pki.TLSConfigError, match="at least one host"):
        pki.make_node_cert(tmp_path, "n1", [])


def test_missing_ca_is_a_clear_error(tmp_path):
    with pytest.raises(pki.TLSConfigError, match="does not exist"):
        pki.make_node_cert(tmp_path / "nope", "n1", ["127.0.0.1"])
    with pytest.raises(pki.TLSConfigError, match="certs init"):
        pki.make_node_cert(tmp_path, "n1", ["127.0.0.1"])


# --------------------------------------------------------------------------- loading contexts


def test_server_context_refuses_insecure_key(tmp_path):
    d = _make_cluster(tmp_path / "c")
    os.chmod(d / "n1.key", 0o644)
    with pytest.raises(tls.InsecureKeyFileError, match="chmod 600"):
        tls.server_context(d, "n1")
    with pytest.raises(driver_tls.InsecureKeyFileError):
        os.chmod(d / "client.key", 0o640)
        driver_tls.client_context(*driver_tls.default_paths(d))


def test_contexts_report_missing_files(tmp_path):
    d = _make_cluster(tmp_path / "c")
    with pytest.raises(pki.TLSConfigError, match="certs node"):
        tls.server_context(d, "n9")
    (d / "n2.key").unlink()
    with pytest.raises(pki.TLSConfigError, match="n2.key"):
        tls.node_client_context(d, "n2")
    with pytest.raises(pki.TLSConfigError, match="does not exist"):
        tls.server_context(tmp_path / "nope", "n1")
    with pytest.raises(FileNotFoundError, match="CA certificate"):
        driver_tls.client_context(tmp_path / "nope.crt", d / "client.crt", d / "client.key")
    with pytest.raises(FileNotFoundError, match="private key"):
        driver_tls.client_context(d / "ca.crt", d / "client.crt", d / "nope.key")


def test_mismatched_key_is_a_clear_error(tmp_path):
    d = _make_cluster(tmp_path / "c")
    (d / "n1.key").write_bytes((d / "n2.key").read_bytes())
    with pytest.raises(pki.TLSConfigError, match="n1.crt"):
        tls.server_context(d, "n1")


def test_contexts_never_disable_verification(certs):
    for ctx in (
        tls.server_context(certs, "n1"),
        tls.node_client_context(certs, "n1"),
        driver_tls.client_context(*driver_tls.default_paths(certs)),
    ):
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
    assert tls.node_client_context(certs, "n1").check_hostname
    assert driver_tls.client_context(*driver_tls.default_paths(certs)).check_hostname


def test_driver_tls_is_stdlib_only():
    import ast

    import raftsql.tlsconfig

    source = Path(raftsql.tlsconfig.__file__).read_text()  # what driver._tls re-exports
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "errno", "os", "ssl", "stat"}, imported


def test_default_paths(tmp_path):
    assert driver_tls.default_paths(tmp_path) == (
        str(tmp_path / "ca.crt"),
        str(tmp_path / "client.crt"),
        str(tmp_path / "client.key"),
    )
    assert driver_tls.default_paths(tmp_path, "alice")[1] == str(tmp_path / "alice.crt")


# --------------------------------------------------------------------------- client roles


@pytest.mark.parametrize("role", ["read", "write", "admin"])
def test_the_server_reads_the_client_role_and_serial_from_the_certificate(tmp_path, certs, role):
    issued = pki.make_client_cert(certs, f"app-{role}", role=role)
    client_ctx = driver_tls.client_context(certs / "ca.crt", issued.cert_path, issued.key_path)
    r = handshake(tls.server_context(certs, "n1"), client_ctx)
    assert r["server_saw_role"] == "client" and r["server_saw_name"] == f"app-{role}"
    assert r["server_saw_client_role"] == role
    assert r["server_saw_serial"] == tls.describe_cert(issued.cert_path)["serial"]
    assert tls.describe_cert(issued.cert_path)["role"] == f"client ({role})"
    # The listener reads all of it from one getpeercert(): the same answers.
    assert r["server_saw_identity"] == tls.PeerIdentity(
        "client", role, f"app-{role}", r["server_saw_serial"]
    )


def test_a_client_certificate_without_a_client_role_counts_as_write(tmp_path):
    """Certificates made before client roles existed keep reading and writing (no admin)."""
    d = tmp_path / "old"
    pki.make_ca(d)
    ca_cert, ca_key = pki._load_ca(d)
    key = pki._new_key()
    cert = pki._build_leaf(ca_cert, ca_key, key, "old", pki.ROLE_CLIENT, [])
    pki._write_pair(d / "old.crt", d / "old.key", cert, key, overwrite=False)
    assert pki.client_role_of(pki._cert_uris(cert)) == "write"
    assert tls.describe_cert(d / "old.crt")["role"] == "client (write)"


def test_client_role_uris():
    p = pki.CLIENT_ROLE_URI_PREFIX
    assert pki.client_role_of([]) == "write"
    assert pki.client_role_of(["urn:raftsql:role:client", p + "read"]) == "read"
    assert pki.client_role_of([p + "admin", p + "admin"]) == "admin"
    assert pki.client_role_of([p + "read", p + "admin"]) is None  # conflicting: no privileges
    assert pki.client_role_of([p + "root"]) is None  # unknown


def test_a_kept_client_certificate_must_have_the_asked_role(tmp_path):
    tree = pki.CertsTree(tmp_path / "c")
    tree.init()
    assert tree.client("app", role="read").created
    assert tree.client("app", role="read", exist_ok=True).created is False
    with pytest.raises(pki.CertificateExistsError, match="has the client role read, not admin"):
        tree.client("app", role="admin", exist_ok=True)
    with pytest.raises(pki.TLSConfigError, match="unknown client role 'root'"):
        tree.client("other", role="root")
