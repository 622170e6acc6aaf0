"""The C part of the build: the NSCA decoder's packet unpacking (hub/intake/_nsca.c) and
chacha20-poly1305@openssh.com SSH packets in one call each (hub/ssh/_packets.c).

Everything else is in pyproject.toml. It takes a C compiler, the Python headers,
zlib's and OpenSSL's (Debian: gcc, python3-dev, which brings zlib1g-dev, and
libssl-dev). `optional=True`: where they are missing the install goes on without
them and the hub uses the pure-Python twin (hub.intake.nsca.unpack_py), slower but
the same, and the SSH packet layer seals and opens every chacha20-poly1305 packet
with cryptography.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("hub.intake._nsca", ["hub/intake/_nsca.c"], libraries=["z"],
                             optional=True),
                   Extension("hub.ssh._packets", ["hub/ssh/_packets.c"],
                             libraries=["crypto"], optional=True)])
