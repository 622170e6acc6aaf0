"""The console's own certificate and the --web endpoint it is filled into."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from hub.web.certificate import endpoint_with_certificate, ensure_certificate


def test_made_once_self_signed_ten_years_with_the_names(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = ensure_certificate(str(keys), ["hub.example", "192.0.2.1"], now)
    assert cert.created and os.stat(cert.key_path).st_mode & 0o777 == 0o600
    parsed = x509.load_pem_x509_certificate(Path(cert.cert_path).read_bytes())
    assert parsed.issuer == parsed.subject
    assert isinstance(parsed.public_key(), ec.EllipticCurvePublicKey)
    assert parsed.not_valid_after_utc - now >= datetime.timedelta(days=3649)
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hub.example"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.1"]
    assert len(cert.fingerprint.split(":")) == 32
    again = ensure_certificate(str(keys), ["other"], now)
    assert not again.created and again.fingerprint == cert.fingerprint


def test_endpoint_quotes_colons_in_paths(tmp_path: Path) -> None:
    keys = tmp_path / "a:b"
    cert = ensure_certificate(str(keys), ["localhost"])
    endpoint = endpoint_with_certificate("ssl:0:interface=127.0.0.1", cert)
    assert "a\\:b/web.key" in endpoint
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    serverFromString(MemoryReactor(), endpoint)  # parses, loads the key and certificate
