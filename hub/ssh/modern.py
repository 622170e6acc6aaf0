"""
What OpenSSH users expect from an SSH transport, as a mixin for Conch.

L{ModernTransportMixin} goes before C{SSHServerTransport} or
C{SSHClientTransport} in a class's bases and fills these gaps of Twisted
Conch 26.10 (written so that it can be proposed upstream piece by piece):

 - B{AEAD ciphers} (twisted#6967, with a draft openssh.com GCM in PR
   #12187): C{chacha20-poly1305@openssh.com} and
   C{aes128-gcm@openssh.com}/C{aes256-gcm@openssh.com}, OpenSSH's defaults.
   Conch's C{SSHCiphers} and its C{sendPacket}/C{getPacket} assume
   encrypt-and-MAC with the length inside the encrypted stream, and its
   negotiation fails when MAC lists do not meet even though AEAD ciphers
   negotiate no MAC.  The packet layer is redone in
   L{hub.ssh.packet} (one object per direction, no I/O).
 - B{Encrypt-then-MAC} (C{hmac-sha2-256-etm@openssh.com},
   C{hmac-sha2-512-etm@openssh.com}): the MAC covers the ciphertext and is
   checked before anything is decrypted.
 - B{Strict key exchange} (Terrapin, CVE-2023-48795):
   C{kex-strict-s-v00@openssh.com}/C{kex-strict-c-v00@openssh.com} are
   offered on the first exchange; when both sides offer them, sequence
   numbers restart at zero after every NEWKEYS and the initial exchange
   admits nothing but its own messages.  Conch lets an attacker-injected
   IGNORE shift sequence numbers and delete EXT_INFO.
 - B{Rekeying} (RFC 4253 section 9): Conch never starts a
   key exchange itself, and its client re-ran C{connectionSecure} (so
   restarted its services) and could switch incoming keys before the
   server's NEWKEYS when rekeyed.  The mixin rekeys after
   L{rekeyDataLimit} bytes (capped by the cipher's own limit, as OpenSSH's
   RekeyLimit does) or L{rekeyTimeLimit} seconds, on an injected C{clock};
   packets sent meanwhile wait in Conch's C{_blockedByKeyExchange} queue.
 - B{Modern defaults}: no CBC, 3DES, MD5 or SHA-1 MACs, no SHA-1 key
   exchange, no C{ssh-rsa}/C{ssh-dss} host key signatures, no pre-auth
   zlib; the constants are re-exported here.
 - B{server-sig-algs}: Conch's server advertises its host key algorithms,
   so OpenSSH clients will not offer RSA user keys unless the host has an
   RSA key; the mixin advertises the user-key algorithms it verifies.
 - B{RSA user keys with SHA-2} for the client (RFC 8332): see
   L{hub.ssh.userauth.ModernUserAuthClientMixin}.

Smaller Conch fixes on the way: UNIMPLEMENTED names the offending packet's
sequence number (Conch sends the next one), and input after NEWKEYS waits
for the new keys instead of being decrypted with the old ones.

Twisted's tracker has these gaps as twisted#12184 and #12057 too.

Compose::

    class HubServerTransport(ModernTransportMixin, SSHServerTransport):
        pass

Class attributes (C{supportedCiphers}, C{rekeyDataLimit}, C{clock}, ...)
may be overridden on the subclass or set on an instance before
C{connectionMade}.
"""

from __future__ import annotations

from hub.ssh.algorithms import (
    CIPHERS,
    CLIENT_KEX_ALGORITHMS,
    COMPRESSIONS,
    HOST_KEY_ALGORITHMS,
    KEX_ALGORITHMS,
    MACS,
    REKEY_DATA_LIMIT,
    REKEY_TIME_LIMIT,
    USERAUTH_SIGNATURE_ALGORITHMS,
)
from hub.ssh.ciphers import (
    AES128_GCM,
    AES256_GCM,
    CHACHA20_POLY1305,
    HMAC_SHA2_256_ETM,
    HMAC_SHA2_512_ETM,
    ModernSSHCiphers,
)
from hub.ssh.kex import STRICT_KEX_CLIENT, STRICT_KEX_SERVER
from hub.ssh.transport import ModernTransportMixin
from hub.ssh.userauth import ModernUserAuthClientMixin, chooseSignatureAlgorithm

__all__ = [
    "AES128_GCM",
    "AES256_GCM",
    "CHACHA20_POLY1305",
    "CIPHERS",
    "CLIENT_KEX_ALGORITHMS",
    "COMPRESSIONS",
    "HMAC_SHA2_256_ETM",
    "HMAC_SHA2_512_ETM",
    "HOST_KEY_ALGORITHMS",
    "KEX_ALGORITHMS",
    "MACS",
    "REKEY_DATA_LIMIT",
    "REKEY_TIME_LIMIT",
    "STRICT_KEX_CLIENT",
    "STRICT_KEX_SERVER",
    "USERAUTH_SIGNATURE_ALGORITHMS",
    "ModernSSHCiphers",
    "ModernTransportMixin",
    "ModernUserAuthClientMixin",
    "chooseSignatureAlgorithm",
]
