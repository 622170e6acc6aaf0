"""The console's TLS certificate: `DATA/keys/web.key` and `web.crt`, self-signed on first start.

An operator with a real certificate passes `--web ssl:443:privateKey=…:certKey=…`;
otherwise the hub makes its own once (EC P-256, ten years, the host name and the
listening addresses as subject alternative names) and logs its SHA-256
fingerprint at every start, so a browser's warning can be checked against it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hub.errors import ConfigError

VALID_DAYS = 3650


@frozen
class Certificate:
    key_path: str
    cert_path: str
    fingerprint: str  # SHA256 AA:BB:…, as browsers show it
    created: bool


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_certificate(names: list[str], now: datetime.datetime) -> tuple[bytes, bytes]:
    """A new key and self-signed certificate for `names` (PEM key, PEM certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "callhomehub")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert_pem: bytes) -> str:
    digest = x509.load_pem_x509_certificate(cert_pem).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


def local_names() -> list[str]:
    """The host name and its addresses, and loopback: what a browser may be pointed at."""
    host = socket.gethostname()
    names = [host, "localhost"]
    try:
        names += sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None)})
    except OSError:
        pass
    return [*names, "127.0.0.1", "::1"]


def ensure_certificate(keys_dir: str, names: list[str] | None = None,
                       now: datetime.datetime | None = None) -> Certificate:
    """The hub's certificate in `keys_dir`, made there (key 0600) if it is not yet."""
    key_path = os.path.join(keys_dir, "web.key")
    cert_path = os.path.join(keys_dir, "web.crt")
    created = False
    try:
        if not (os.path.exists(key_path) and os.path.exists(cert_path)):
            os.makedirs(keys_dir, exist_ok=True)
            key_pem, cert_pem = make_certificate(
                names or local_names(), now or datetime.datetime.now(datetime.UTC))
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key_pem)
            with open(cert_path, "wb") as f:
                f.write(cert_pem)
            created = True
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        return Certificate(key_path, cert_path, fingerprint(cert_pem), created)
    except OSError as e:
        raise ConfigError(f"--web: cannot create the certificate in {keys_dir}: "
                          f"{e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"--web: {cert_path} is not a PEM certificate ({e})") from None


def _quote(path: str) -> str:
    # Endpoint strings separate fields with ':' and escape it with '\'.
    return path.replace("\\", "\\\\").replace(":", "\\:")


def endpoint_with_certificate(description: str, cert: Certificate) -> str:
    """`ssl:PORT[:…]` with the hub's own key and certificate added."""
    return f"{description}:privateKey={_quote(cert.key_path)}:certKey={_quote(cert.cert_path)}"


def uses_own_certificate(description: str) -> bool:
    return description.startswith("ssl:") and "privateKey=" not in description
