"""Package discovery (the rest of the metadata is in pyproject.toml).

Every package under ``segfast/`` is found automatically, so a new subpackage cannot be left out of the
wheel; the Triton kernels live in ``kernels/`` at the top of the repository and install as
``segfast.kernels``.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["segfast", "segfast.*"])
kernels = ["segfast." + p for p in find_packages(include=["kernels", "kernels.*"])]
setup(packages=packages + kernels,
      package_dir={k: k[len("segfast."):].replace(".", "/") for k in kernels})
