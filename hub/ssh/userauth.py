"""
RSA user keys signed with SHA-2 (RFC 8332) by Conch's user-auth client.

Conch 26.10's L{SSHUserAuthClient} names an RSA key C{ssh-rsa} and signs
with SHA-1 whatever the server says; OpenSSH 8.8 and later refuse that.
L{ModernUserAuthClientMixin} picks C{rsa-sha2-512} or C{rsa-sha2-256} from
the server's C{server-sig-algs} (RFC 8308) and signs with it.  Other key
types are unchanged.
"""

from __future__ import annotations

from typing import Any

from twisted.conch.ssh import keys
from twisted.conch.ssh.common import NS

from hub.ssh.usercerts import UserCertificate

RSA_SHA2_SIGNATURES = (b"rsa-sha2-512", b"rsa-sha2-256")

# MSG_USERAUTH_REQUEST, RFC 4252 section 6.
_MSG_USERAUTH_REQUEST = 50


def chooseSignatureAlgorithm(
    key: keys.Key,
    serverSigAlgs: bytes | None,
    preferences: tuple[bytes, ...] = RSA_SHA2_SIGNATURES,
    allowSHA1: bool = False,
) -> bytes | None:
    """
    The public key algorithm to authenticate with C{key}, or L{None} when
    there is none both sides accept.

    For RSA: the first of C{preferences} that the server lists in
    C{server-sig-algs}; when the server sent no list, the first preference
    (a server that does not send one may still accept it; OpenSSH would fall
    back to SHA-1, which we do only with C{allowSHA1}).
    """
    if key.type() != "RSA":
        return key.sshType()
    if serverSigAlgs is None:
        return preferences[0] if preferences else (b"ssh-rsa" if allowSHA1 else None)
    offered = serverSigAlgs.split(b",")
    for algorithm in preferences:
        if algorithm in offered:
            return algorithm
    if allowSHA1 and b"ssh-rsa" in offered:
        return b"ssh-rsa"
    return None


class ModernUserAuthClientMixin:
    """
    Put before L{twisted.conch.ssh.userauth.SSHUserAuthClient} in the bases
    of a user-auth client to sign RSA keys with SHA-2.

    @cvar rsaSignatureAlgorithms: RSA algorithms in preference order.
    @cvar allowSHA1RSA: whether C{ssh-rsa} (SHA-1) may be used at all.
    """

    rsaSignatureAlgorithms: tuple[bytes, ...] = RSA_SHA2_SIGNATURES
    allowSHA1RSA = False

    # Provided by SSHUserAuthClient.
    transport: Any
    lastPublicKey: Any
    triedPublicKeys: list[keys.Key]
    user: bytes
    instance: Any
    _publicKeyAlgorithm: bytes = b""

    def _signatureAlgorithmFor(self, public_key: keys.Key) -> bytes | None:
        extensions = getattr(self.transport, "peerExtensions", {}) or {}
        return chooseSignatureAlgorithm(
            public_key,
            extensions.get(b"server-sig-algs"),
            self.rsaSignatureAlgorithms,
            self.allowSHA1RSA,
        )

    def _cbGetPublicKey(self, public_key: Any) -> bool:
        if isinstance(public_key, UserCertificate):
            # Offered as its own algorithm; the plain key signs (see _cbSignData).
            self.lastPublicKey = public_key
            self._publicKeyAlgorithm = public_key.algorithm
            self._log.debug(  # type: ignore[attr-defined]
                "certificate authentication with {algorithm}, key ID {key_id}",
                algorithm=public_key.algorithm, key_id=public_key.key_id)
            self.askForAuth(  # type: ignore[attr-defined]
                b"publickey", b"\x00" + NS(public_key.algorithm) + NS(public_key.blob()))
            return True
        if not isinstance(public_key, keys.Key):
            return super()._cbGetPublicKey(public_key)  # type: ignore[misc,no-any-return]
        algorithm = self._signatureAlgorithmFor(public_key)
        if algorithm is None:
            # No algorithm both sides accept: skip this key, try the next.
            self.triedPublicKeys.append(public_key)
            return self.auth_publickey()  # type: ignore[attr-defined,no-any-return]
        self.lastPublicKey = public_key
        self._publicKeyAlgorithm = algorithm
        self._log.debug(  # type: ignore[attr-defined]
            "public key authentication with {algorithm}", algorithm=algorithm
        )
        self.triedPublicKeys.append(public_key)
        self.askForAuth(  # type: ignore[attr-defined]
            b"publickey", b"\x00" + NS(algorithm) + NS(public_key.blob())
        )
        return True

    def ssh_USERAUTH_PK_OK_publickey(self, packet: bytes) -> None:
        public_key = self.lastPublicKey
        algorithm = self._publicKeyAlgorithm or public_key.sshType()
        data = (
            NS(self.transport.sessionID)
            + bytes((_MSG_USERAUTH_REQUEST,))
            + NS(self.user)
            + NS(self.instance.name)
            + NS(b"publickey")
            + b"\x01"
            + NS(algorithm)
            + NS(public_key.blob())
        )
        d = self.signData(public_key, data)  # type: ignore[attr-defined]
        if not d:
            self.askForAuth(b"none", b"")  # type: ignore[attr-defined]
            return
        d.addCallback(self._cbSignedData)
        d.addErrback(self._ebAuth)  # type: ignore[attr-defined]

    def _cbSignedData(self, signedData: bytes) -> None:
        public_key = self.lastPublicKey
        algorithm = self._publicKeyAlgorithm or public_key.sshType()
        self.askForAuth(  # type: ignore[attr-defined]
            b"publickey",
            b"\x01" + NS(algorithm) + NS(public_key.blob()) + NS(signedData),
        )

    def _cbSignData(self, privateKey: keys.Key, signData: bytes) -> bytes:
        algorithm = self._publicKeyAlgorithm or None
        if isinstance(self.lastPublicKey, UserCertificate):
            algorithm = self.lastPublicKey.signature_type()
        return privateKey.sign(signData, signatureType=algorithm)
