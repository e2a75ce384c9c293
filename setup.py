"""The C part of the hot path (proxy/_speedups.c); everything else is in pyproject.toml.

`optional=True`: where it cannot be compiled, the package installs without it and
the proxy runs its pure-Python path (same behaviour, more CPU per request)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("proxy._speedups", ["proxy/_speedups.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                                 "-Wno-missing-field-initializers"])])
