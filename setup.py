"""Package discovery: each folder with an ``__init__.py`` under the top-level folders is ``coldstart.*``.

pyproject.toml holds the metadata; it cannot map several top-level folders under one package prefix with
discovery, so this file does only that. A new subfolder is installed without editing a list.
"""

from setuptools import find_packages, setup

TOP = ["launcher", "engine_adapters", "snapshot_hooks", "imagefs", "pool", "recipes"]
found = find_packages(where=".", include=[f"{t}*" for t in TOP] + TOP)
setup(
    packages=[f"coldstart.{p}" for p in found],
    package_dir={f"coldstart.{t}": t for t in TOP},
)
