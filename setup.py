from setuptools import setup

# Metadata lives in pyproject.toml; setup.py only wires the cffi extension in,
# because cffi_modules is a setup() keyword.
setup(cffi_modules=["csrc/build_relay.py:ffibuilder"])
