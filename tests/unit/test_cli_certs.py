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
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# --------------------------------------------------------------------------- init


def test_init_creates_ca_and_client(tmp_path):
    d = tmp_path / "certs"
    result = ok("certs", "init", d)
    assert "Created CA" in result.output
    assert "Created client certificate" in result.output
    assert sorted(p.name for p in d.iterdir()) == ["ca.crt", "ca.key", "client.crt", "client.key"]
    assert mode(d) == 0o700
    assert mode(d / "ca.key") == 0o600
    assert mode(d / "client.key") == 0o600


def test_init_twice_is_harmless(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    before = snapshot(d)
    result = ok("certs", "init", d)
    assert f"CA already exists at {d / 'ca.crt'}" in result.output
    assert "Nothing changed" in result.output
    assert snapshot(d) == before


def test_init_completes_a_missing_client_cert(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    ca = (d / "ca.crt").read_bytes()
    (d / "client.crt").unlink()
    (d / "client.key").unlink()
    result = ok("certs", "init", d)
    assert "CA already exists" in result.output
    assert "Created client certificate" in result.output
    assert (d / "ca.crt").read_bytes() == ca
    assert (d / "client.crt").exists()


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
    ca = (d / "ca.crt").read_bytes()
    result = ok("certs", "init", d, "--force")
    assert (d / "ca.crt").read_bytes() != ca
    assert "n1.crt" in result.output and "no longer" in result.output


def test_init_refuses_an_orphan_ca_key(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    (d / "ca.crt").unlink()
    result = fails("certs", "init", d)
    assert "ca.key" in result.output and "--force" in result.output


def test_init_on_a_file_is_a_usage_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    result = fails("certs", "init", f, code=2)
    assert "file" in result.output


# --------------------------------------------------------------------------- node


def _node_cert(d: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((d / f"{name}.crt").read_bytes())


def test_node_cert_has_sans_and_secure_key(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    result = ok("certs", "node", d, "--name", "n1", "--host", "127.0.0.1", "--host", "db.example")
    assert "Created node certificate" in result.output
    san = _node_cert(d, "n1").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert ipaddress.ip_address("127.0.0.1") in san.value.get_values_for_type(x509.IPAddress)
    assert {"n1", "db.example"} <= set(san.value.get_values_for_type(x509.DNSName))
    assert "urn:raftsql:role:node" in san.value.get_values_for_type(x509.UniformResourceIdentifier)
    assert mode(d / "n1.key") == 0o600


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
    os.chmod(d / "ca.key", 0o644)
    result = fails("certs", "node", d, "--name", "n1", "--host", "127.0.0.1")
    assert result.output.strip() == (
        f"Error: private key has mode 0644, which lets group or others access it; "
        f"run: chmod 600 {d / 'ca.key'}"
    )
    assert not (d / "n1.crt").exists()


def test_unreadable_ca_key_is_a_clear_error(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    (d / "ca.key").unlink()
    (d / "ca.key").mkdir()  # readable by nobody as a key, even root
    result = fails("certs", "node", d, "--name", "n1", "--host", "127.0.0.1")
    assert "ca.key" in result.output


def test_corrupt_ca_cert_is_a_clear_error(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    (d / "ca.crt").write_text("garbage")
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


def test_node_requires_name_and_host(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    assert "--host" in fails("certs", "node", d, "--name", "n1", code=2).output
    assert "--name" in fails("certs", "node", d, "--host", "127.0.0.1", code=2).output


# --------------------------------------------------------------------------- client, show, help


def test_client_command(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    assert "Created client certificate" in ok("certs", "client", d, "--name", "alice").output
    assert mode(d / "alice.key") == 0o600
    assert "already exists" in ok("certs", "client", d, "--name", "alice").output
    shown = ok("certs", "show", d / "alice.crt").output
    assert "role:" in shown and "client" in shown and "CN=alice" in shown


def test_show_node_and_ca(tmp_path):
    d = tmp_path / "certs"
    ok("certs", "init", d)
    ok("certs", "node", d, "--name", "n1", "--host", "127.0.0.1")
    shown = ok("certs", "show", d / "n1.crt").output
    assert "IP:127.0.0.1" in shown and "URI:urn:raftsql:role:node" in shown
    assert "ca" in ok("certs", "show", d / "ca.crt").output
    assert "not found" in fails("certs", "show", d / "nope.crt").output


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
