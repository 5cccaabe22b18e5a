from setuptools import setup

setup(cffi_modules=["src/actdiff/kernels/_build.py:ffibuilder"])
