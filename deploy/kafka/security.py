"""The secure local broker's material: a local CA and broker certificate, SCRAM users per role,
the broker's TLS/SASL/authorizer settings, and an env file per role for the clients.

Everything lives in ``<broker home>/security`` (owner-only), next to the broker's data, and is
made once: the SCRAM users are written into the metadata log when the storage is formatted,
so the passwords must outlive restarts (`jodie broker down --purge` deletes both together).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import SecretStr

from deploy.exceptions import BrokerStartError
from streams.runtime.clients import Connection

Role = Literal["admin", "router", "worker", "trainer", "client"]
#: Every principal of the secure broker. ``admin`` is the super user (topics, ACLs, the
#: broker's own inter-broker connections); the ACLs of the others are in streams/acls.py.
ROLES: tuple[Role, ...] = ("admin", "router", "worker", "trainer", "client")
MECHANISM = "SCRAM-SHA-512"
#: The broker certificate's subject, and so its principal on the mutual-TLS controller
#: listener (SCRAM cannot authenticate controllers: its users live in the metadata they serve).
BROKER_PRINCIPAL = "User:CN=jodie-broker"
_CERT_DAYS = 825


@dataclass(frozen=True)
class SecurityFiles:
    """Where a secure broker's material lives."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def broker_pem(self) -> Path:
        """The broker's private key and certificate chain in one PEM (Kafka's PEM keystore)."""
        return self.root / "broker.pem"

    @property
    def users(self) -> Path:
        return self.root / "users.json"

    def env_file(self, role: Role) -> Path:
        return self.root / f"{role}.env"


def files_of(home: Path) -> SecurityFiles:
    return SecurityFiles(home / "security")


def is_secure(home: Path) -> bool:
    """Whether the broker at ``home`` was set up with security (its users exist)."""
    return files_of(home).users.exists()


def passwords(files: SecurityFiles) -> dict[str, str]:
    return dict(json.loads(files.users.read_text()))


def ensure_material(home: Path) -> SecurityFiles:
    """Create what is missing: the CA, the broker certificate, one password per role."""
    files = files_of(home)
    files.root.mkdir(parents=True, exist_ok=True)
    files.root.chmod(0o700)
    if not files.ca_cert.exists() or not files.broker_pem.exists():
        _write_certificates(files)
    if not files.users.exists():
        write_private(files.users, json.dumps({r: secrets.token_urlsafe(24) for r in ROLES}))
    return files


def write_private(path: Path, text: str) -> None:
    # Created owner-only, never world-readable even for an instant (a file left from before
    # could carry looser permissions, hence the unlink).
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _write_certificates(files: SecurityFiles) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    until = now + dt.timedelta(days=_CERT_DAYS)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jodie-stream local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # small clock differences
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jodie-broker")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(until)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        # serverAuth for the listeners; clientAuth because the broker also logs in to the
        # controller listener with this certificate.
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    unencrypted = serialization.NoEncryption()
    pkcs8 = serialization.PrivateFormat.PKCS8
    write_private(files.ca_key, ca_key.private_bytes(pem, pkcs8, unencrypted).decode())
    # Kafka's PEM keystore: an unencrypted PKCS#8 key (no ssl.key.password), then the chain.
    write_private(
        files.broker_pem,
        key.private_bytes(pem, pkcs8, unencrypted).decode()
        + cert.public_bytes(pem).decode()
        + ca_cert.public_bytes(pem).decode(),
    )
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))


def format_args(files: SecurityFiles) -> list[str]:
    """`kafka-storage format` arguments that create every role's SCRAM user."""
    args: list[str] = []
    for name, password in passwords(files).items():
        args += ["--add-scram", f"{MECHANISM}=[name={name},password={password}]"]
    return args


def broker_properties(files: SecurityFiles, port: int, controller_port: int) -> dict[str, str]:
    """What the secure broker sets on top of (or instead of) server.properties.

    Clients (and the broker itself, as ``admin``) use SASL_SSL with SCRAM; the controller
    listener uses mutual TLS with the broker certificate. The StandardAuthorizer denies
    whatever no ACL allows.
    """
    admin = passwords(files)["admin"]
    jaas = (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="admin" password="{admin}";'
    )
    return {
        "listeners": f"SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"SASL_SSL://127.0.0.1:{port}",
        "inter.broker.listener.name": "SASL_SSL",
        "listener.security.protocol.map": "CONTROLLER:SSL,SASL_SSL:SASL_SSL",
        "sasl.enabled.mechanisms": MECHANISM,
        "sasl.mechanism.inter.broker.protocol": MECHANISM,
        f"listener.name.sasl_ssl.{MECHANISM.lower()}.sasl.jaas.config": jaas,
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(files.broker_pem),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(files.ca_cert),
        "listener.name.controller.ssl.client.auth": "required",
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": f"User:admin;{BROKER_PRINCIPAL}",
        "allow.everyone.if.no.acl.found": "false",
    }


def override_properties(text: str, values: dict[str, str]) -> str:
    """``text`` (a .properties file) with the keys of ``values`` replaced in place and the
    others appended, so a key is never set twice."""
    lines, seen = [], set()
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.lstrip().startswith("#") and "=" in line and key in values:
            lines.append(f"{key}={values[key]}")
            seen.add(key)
        else:
            lines.append(line)
    extra = [f"{k}={v}" for k, v in values.items() if k not in seen]
    if extra:
        lines += ["", "# Security (`jodie broker up --secure`): TLS, SCRAM, ACLs.", *extra]
    return "\n".join(lines) + "\n"


def connection(files: SecurityFiles, port: int, role: Role = "admin") -> Connection:
    """How ``role`` reaches the secure broker on ``port``."""
    return Connection(
        f"127.0.0.1:{port}",
        security_protocol="SASL_SSL",
        sasl_mechanism=MECHANISM,
        sasl_username=role,
        sasl_password=SecretStr(passwords(files)[role]),
        ssl_ca_location=files.ca_cert,
    )


def role_env(files: SecurityFiles, port: int, controller_port: int, role: Role) -> dict[str, str]:
    """The JODIE_* variables that make every jodie command connect as ``role``."""
    return {
        "JODIE_BOOTSTRAP": f"127.0.0.1:{port}",
        "JODIE_BROKER_PORT": str(port),
        "JODIE_CONTROLLER_PORT": str(controller_port),
        "JODIE_SECURITY_PROTOCOL": "SASL_SSL",
        "JODIE_SASL_MECHANISM": MECHANISM,
        "JODIE_SASL_USERNAME": role,
        "JODIE_SASL_PASSWORD": passwords(files)[role],
        "JODIE_SSL_CA_LOCATION": str(files.ca_cert),
    }


def write_env_files(files: SecurityFiles, port: int, controller_port: int) -> None:
    """``<role>.env`` per role, to ``source`` in a shell (owner-only: they hold passwords)."""
    for role in ROLES:
        env = role_env(files, port, controller_port, role)
        text = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        write_private(files.env_file(role), f"# jodie-stream: connect as {role}\n{text}")


def check_formatted_alike(home: Path, data_dir: Path, secure: bool) -> None:
    """Refuse to start a broker whose storage was formatted for the other mode: its users
    (or their absence) are fixed in the metadata log."""
    if not (data_dir / "meta.properties").exists():
        return
    if secure and not is_secure(home):
        raise BrokerStartError(
            f"the broker in {home} was formatted without security; `jodie broker down --purge` "
            "it first, or start it without --secure"
        )
    if not secure and is_secure(home):
        raise BrokerStartError(
            f"the broker in {home} was formatted with security; start it with `jodie broker up "
            "--secure`, or `jodie broker down --purge` it first"
        )
