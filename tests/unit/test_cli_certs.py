"""`raftsql certs ...` through click's CliRunner."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from raftsql.cli import main
from raftsql.server import certs as pki


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: str):
    result = run(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def fails(*args: str, code: int = 1):
    """Assert a clean failure: the exit code and no traceback (SystemExit, not an exception)."""
    result = run(*args)
    assert result.exit_code == code, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under d by relative path."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- init


def test_init_keeps_the_ca_key_apart_from_the_client_directory(tmp_path):
    d = tmp_path / "certs"
    result = ok("certs", "init", d)
    assert "Created CA" in result.output
    assert "Created client certificate" in result.output
    assert f"?certs={d / 'client'}" in result.output
    assert f"Admins:  ?certs={d / 'admin'}" in result.output
    assert tree(d) == ["admin/ca.crt", "admin/client.crt", "admin/client.key", "ca/ca.crt",
                       "ca/ca.key", "client/ca.crt", "client/client.crt", "client/client.key"]
    assert (d / "client" / "ca.crt").read_bytes() == (d / "ca" / "ca.crt").read_bytes()
    for sub in (d, d / "ca", d / "client", d / "admin"):
        assert mode(sub) == 0o700
    assert mode(d / "ca" / "ca.key") == 0o600
    assert mode(d / "client" / "client.key") == 0o600
    assert mode(d / "admin" / "client.key") == 0o600
    # The application's certificate may write; the operator's is an admin.
    from raftsql.server.tls import describe_cert

    assert describe_cert(d / "client" / "client.crt")["role"] == "client (write)"
    assert describe_cert(d / "admin" / "client.crt")["role"] == "client (admin)"


def test_init_twice_is_harmless(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    before = snapshot(d)
    result = ok("certs", "init", d)
    assert f"CA already exists at {d / 'ca' / 'ca.crt'}" in result.output
    assert "Nothing changed" in result.output
    assert snapshot(d) == before


def test_init_completes_a_missing_client_cert(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    ca = (d / "ca" / "ca.crt").read_bytes()
    (d / "client" / "client.crt").unlink()
    (d / "client" / "client.key").unlink()
    (d / "client" / "ca.crt").unlink()
    result = ok("certs", "init", d)
    assert "CA already exists" in result.output
    assert "Created client certificate" in result.output
    assert (d / "ca" / "ca.crt").read_bytes() == ca
    assert (d / "client" / "ca.crt").read_bytes() == ca
    assert (d / "client" / "client.crt").exists()


def test_init_tightens_an_existing_empty_dir(tmp_path):
    d = tmp_path / "certs"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    ok("certs", "init", d)
    assert mode(d) == 0o700


def test_init_force_replaces_the_ca_and_warns(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    ok("certs", "node", d, "--name", "n1", "--host", "127.0.0.1")
    ca = (d / "ca" / "ca.crt").read_bytes()
    result = ok("certs", "init", d, "--force")
    assert (d / "ca" / "ca.crt").read_bytes() != ca
    assert (d / "client" / "ca.crt").read_bytes() == (d / "ca" / "ca.crt").read_bytes()
    assert "n1/n1.crt" in result.output and "no longer" in result.output
    ok("certs", "node", d, "--name", "n1", "--host", "127.0.0.1", "--force")
    assert (d / "n1" / "ca.crt").read_bytes() == (d / "ca" / "ca.crt").read_bytes()


def test_init_refuses_an_orphan_ca_key(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    (d / "ca" / "ca.crt").unlink()
    result = fails("certs", "init", d)
    assert "ca.key" in result.output and "--force" in result.output


def test_init_on_a_file_is_a_usage_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    result = fails("certs", "init", f, code=2)
    assert "file" in result.output


# --------------------------------------------------------------------------- node


def _node_cert(d: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((d / name / f"{name}.crt").read_bytes())


def test_node_cert_goes_to_the_nodes_own_directory(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    result = ok("certs", "node", d, "--name", "n1", "--host", "127.0.0.1", "--host", "db.example")
    assert "Created node certificate" in result.output
    assert f"--certs {d / 'n1'}" in result.output
    assert tree(d / "n1") == ["ca.crt", "n1.crt", "n1.key"]  # no CA key, no other node's key
    san = _node_cert(d, "n1").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert ipaddress.ip_address("127.0.0.1") in san.value.get_values_for_type(x509.IPAddress)
    assert {"n1", "db.example"} <= set(san.value.get_values_for_type(x509.DNSName))
    assert "urn:raftsql:role:node" in san.value.get_values_for_type(x509.UniformResourceIdentifier)
    assert mode(d / "n1") == 0o700
    assert mode(d / "n1" / "n1.key") == 0o600
    assert tree(d / "client") == ["ca.crt", "client.crt", "client.key"]  # clients get no node key


def test_node_directory_serves_tls(tmp_path):
    from raftsql.server import tls

    d = tmp_path / "certs"
    ok("certs", "init", d)
    ok("certs", "node", d, "--name", "n1", "--host", "127.0.0.1")
    tls.server_context(d / "n1", "n1")  # the node's own directory
    tls.node_client_context(d, "n1")  # the root still works: its n1/ is found


def test_node_rerun_keeps_a_fitting_cert_and_refuses_a_changed_one(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    ok("certs", "node", d, "--name", "n1", "--host", "127.0.0.1")
    before = snapshot(d)
    assert "already exists" in ok("certs", "node", d, "--name", "n1", "--host", "127.0.0.1").output
    assert snapshot(d) == before
    result = fails("certs", "node", d, "--name", "n1", "--host", "10.0.0.7")
    assert "10.0.0.7" in result.output and "--force" in result.output
    assert snapshot(d) == before
    ok("certs", "node", d, "--name", "n1", "--host", "10.0.0.7", "--force")
    san = _node_cert(d, "n1").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]


def test_node_without_ca_says_how_to_fix_it(tmp_path):
    result = fails("certs", "node", tmp_path / "missing", "--name", "n1", "--host", "127.0.0.1")
    assert "does not exist" in result.output
    assert "raftsql certs init" in result.output
    result = fails("certs", "node", tmp_path, "--name", "n1", "--host", "127.0.0.1")
    assert "no CA" in result.output


def test_node_refuses_insecure_ca_key(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    os.chmod(d / "ca" / "ca.key", 0o644)
    result = fails("certs", "node", d, "--name", "n1", "--host", "127.0.0.1")
    assert result.output.strip() == (
        f"Error: private key has mode 0644, which lets group or others access it; "
        f"run: chmod 600 {d / 'ca' / 'ca.key'}"
    )
    assert not (d / "n1").exists()


def test_unreadable_ca_key_is_a_clear_error(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    (d / "ca" / "ca.key").unlink()
    (d / "ca" / "ca.key").mkdir()  # readable by nobody as a key, even root
    result = fails("certs", "node", d, "--name", "n1", "--host", "127.0.0.1")
    assert "ca.key" in result.output


def test_corrupt_ca_cert_is_a_clear_error(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    (d / "ca" / "ca.crt").write_text("garbage")
    result = fails("certs", "node", d, "--name", "n1", "--host", "127.0.0.1")
    assert "not a PEM certificate" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "n/1", "--host", "127.0.0.1"], "invalid name"),
        (["--name", "ca", "--host", "127.0.0.1"], "reserved"),
        (["--name", "n1", "--host", "not a host"], "invalid host"),
        (["--name", "client", "--host", "127.0.0.1"], "client certificate"),
    ],
)
def test_node_bad_arguments(tmp_path, args, message):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    assert message in fails("certs", "node", d, *args).output


def test_node_and_client_names_do_not_share_a_directory(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    ok("certs", "node", d, "--name", "n1", "--host", "127.0.0.1")
    assert "n1.crt" in fails("certs", "client", d, "--name", "n1").output
    ok("certs", "client", d, "--name", "alice")
    assert "client.crt" in fails("certs", "node", d, "--name", "alice", "--host", "127.0.0.1").output


def test_node_requires_name_and_host(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    assert "--host" in fails("certs", "node", d, "--name", "n1", code=2).output
    assert "--name" in fails("certs", "node", d, "--host", "127.0.0.1", code=2).output


# --------------------------------------------------------------------------- client, show


def test_client_command(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    result = ok("certs", "client", d, "--name", "alice")
    assert "Created client certificate" in result.output
    assert f"?certs={d / 'alice'}" in result.output
    # The files the driver reads (?certs=DIR/alice), whatever the client's name.
    assert tree(d / "alice") == ["ca.crt", "client.crt", "client.key"]
    assert mode(d / "alice" / "client.key") == 0o600
    assert "already exists" in ok("certs", "client", d, "--name", "alice").output
    shown = ok("certs", "show", d / "alice" / "client.crt").output
    assert "role:" in shown and "client" in shown and "CN=alice" in shown


def test_show_node_and_ca(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    ok("certs", "node", d, "--name", "n1", "--host", "127.0.0.1")
    shown = ok("certs", "show", d / "n1" / "n1.crt").output
    assert "IP:127.0.0.1" in shown and "URI:urn:raftsql:role:node" in shown
    assert "ca" in ok("certs", "show", d / "ca" / "ca.crt").output
    assert "not found" in fails("certs", "show", d / "nope.crt").output


# --------------------------------------------------------------------------- the old flat layout


def _flat(d: Path) -> Path:
    """A certs directory as `raftsql certs` made it before the CA key was kept apart."""

    pki.make_ca(d)
    pki.make_client_cert(d, "client")
    pki.make_client_cert(d, "alice")
    pki.make_node_cert(d, "n1", ["127.0.0.1"])
    return d


def test_a_flat_directory_still_works_and_warns(tmp_path):
    from raftsql.driver import _tls as driver_tls
    from raftsql.server import tls

    d = _flat(tmp_path / "certs")
    result = ok("certs", "node", d, "--name", "n2", "--host", "127.0.0.1")
    assert "old flat layout" in result.output and f"raftsql certs init {d} --split" in result.output
    assert (d / "n2.crt").exists() and not (d / "n2").exists()  # written where it always was
    result = ok("certs", "init", d)
    assert "CA already exists" in result.output and "old flat layout" in result.output
    tls.server_context(d, "n2")
    driver_tls.client_context(*driver_tls.default_paths(d))


def test_split_moves_every_key_into_its_own_directory(tmp_path):
    from raftsql.driver import _tls as driver_tls
    from raftsql.server import tls

    d = _flat(tmp_path / "certs")
    ca = (d / "ca.crt").read_bytes()
    key_n1 = (d / "n1.key").read_bytes()
    result = ok("certs", "init", d, "--split")
    assert "moved" in result.output and "old flat layout" not in result.output
    assert tree(d) == [
        "admin/ca.crt", "admin/client.crt", "admin/client.key",
        "alice/ca.crt", "alice/client.crt", "alice/client.key",
        "ca/ca.crt", "ca/ca.key",
        "client/ca.crt", "client/client.crt", "client/client.key",
        "n1/ca.crt", "n1/n1.crt", "n1/n1.key",
    ]
    assert (d / "ca" / "ca.crt").read_bytes() == ca  # the same CA: nothing to reissue
    assert (d / "n1" / "n1.key").read_bytes() == key_n1
    assert all(mode(p) == 0o700 for p in d.iterdir())
    tls.server_context(d / "n1", "n1")
    tls.server_context(d, "n1")  # a node still started with --certs DIR keeps working
    driver_tls.client_context(*driver_tls.default_paths(d / "alice"))
    assert "nothing to split" in ok("certs", "init", d, "--split").output
    assert not pki.CertsTree(d).legacy


def test_a_node_warns_about_a_ca_key_in_its_certs_dir(tmp_path, caplog):
    from raftsql.server import tls

    d = _flat(tmp_path / "certs")
    with caplog.at_level("WARNING", logger="raftsql.tls"):
        tls.server_context(d, "n1")
    assert "CA private key" in caplog.text


def test_help_lists_certs_commands():
    out = ok("--help").output
    assert "certs" in out
    out = ok("certs", "--help").output
    for command in ("init", "node", "client", "show"):
        assert command in out


def test_cli_import_is_light():
    # `raftsql --help` must not pay for cryptography, apsw or the server.
    code = (
        "import sys, raftsql.cli; "
        "heavy = [m for m in ('cryptography', 'apsw', 'raftsql.server', 'ssl') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
