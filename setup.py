"""The C part of the build: the NSCA decoder's packet unpacking (hub/intake/_nsca.c).

Everything else is in pyproject.toml. `optional=True`: where no C compiler or
Python headers are found, the install goes on without it and the hub uses the
pure-Python twin (hub.intake.nsca.unpack_py), slower but the same.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("hub.intake._nsca", ["hub/intake/_nsca.c"], optional=True)])
