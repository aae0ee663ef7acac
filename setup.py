"""Only carries the cffi build; everything else lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["csrc/build_kvm.py:ffibuilder"])
