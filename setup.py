"""Only the C log encoder (adapters/_logbatch.c); everything else is in pyproject.toml.

Optional, so that a machine without a C compiler still installs: sshspec then
encodes its log in Python, at a higher CPU cost (bench/). `make test` installs
the compiler, and tests/test_logs.py checks that the encoder was built.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("sshspec.adapters._logbatch", ["adapters/_logbatch.c"], optional=True)])
