"""The secure broker's material, without a broker: certificates, users, properties."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from deploy.exceptions import BrokerStartError
from deploy.kafka import security


def test_material_is_made_once_and_owner_only(tmp_path: Path) -> None:
    files = security.ensure_material(tmp_path)
    assert set(security.passwords(files)) == set(security.ROLES)
    assert len(set(security.passwords(files).values())) == len(security.ROLES)
    for private in (files.ca_key, files.broker_pem, files.users, files.root):
        assert stat.S_IMODE(private.stat().st_mode) & 0o077 == 0, private
    before = (files.broker_pem.read_text(), files.users.read_text())
    security.ensure_material(tmp_path)  # a restart keeps the users formatted into the log
    assert (files.broker_pem.read_text(), files.users.read_text()) == before


def test_the_broker_certificate_is_for_the_local_address_and_signed_by_the_ca(
    tmp_path: Path,
) -> None:
    files = security.ensure_material(tmp_path)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    chain = x509.load_pem_x509_certificates(files.broker_pem.read_bytes())
    cert = chain[0]
    assert chain[1] == ca and cert.issuer == ca.subject
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    # clientAuth too: the broker logs in to the controller listener with it (mutual TLS).
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    assert f"User:{cert.subject.rfc4514_string()}" == security.BROKER_PRINCIPAL
    assert files.broker_pem.read_text().startswith("-----BEGIN PRIVATE KEY-----")


def test_every_role_is_a_scram_user_at_format_time(tmp_path: Path) -> None:
    files = security.ensure_material(tmp_path)
    args = security.format_args(files)
    assert args[0::2] == ["--add-scram"] * len(security.ROLES)
    password = security.passwords(files)["client"]
    assert f"SCRAM-SHA-512=[name=client,password={password}]" in args[1::2]


def test_properties_are_overridden_in_place_and_never_twice() -> None:
    text = "# listeners below\nlisteners=PLAINTEXT://x:1\nnum.io.threads=4\n"
    out = security.override_properties(text, {"listeners": "SASL_SSL://x:1", "super.users": "U"})
    assert out.splitlines()[:3] == [
        "# listeners below",
        "listeners=SASL_SSL://x:1",
        "num.io.threads=4",
    ]
    assert out.count("listeners=") == 1 and out.endswith("super.users=U\n")


def test_secure_properties_lock_every_listener(tmp_path: Path) -> None:
    files = security.ensure_material(tmp_path)
    props = security.broker_properties(files, 49292, 49293)
    assert props["listener.security.protocol.map"] == "CONTROLLER:SSL,SASL_SSL:SASL_SSL"
    assert props["listener.name.controller.ssl.client.auth"] == "required"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == f"User:admin;{security.BROKER_PRINCIPAL}"
    assert "PLAINTEXT" not in props["listeners"]


def test_env_files_point_a_shell_at_the_broker(tmp_path: Path) -> None:
    files = security.ensure_material(tmp_path)
    security.write_env_files(files, 49292, 49293)
    text = files.env_file("router").read_text()
    assert "export JODIE_SECURITY_PROTOCOL=SASL_SSL\n" in text
    assert "export JODIE_SASL_USERNAME=router\n" in text
    assert f"export JODIE_SSL_CA_LOCATION={files.ca_cert}\n" in text
    assert stat.S_IMODE(files.env_file("router").stat().st_mode) == 0o600


def test_a_broker_formatted_for_the_other_mode_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.properties").write_text("formatted")
    with pytest.raises(BrokerStartError, match="without security"):
        security.check_formatted_alike(tmp_path, data, secure=True)
    security.ensure_material(tmp_path)
    with pytest.raises(BrokerStartError, match="--secure"):
        security.check_formatted_alike(tmp_path, data, secure=False)
