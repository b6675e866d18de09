"""Maps the import packages onto the repository's top-level folders.

`fleetserve.runtime` lives in runtime/, `fleetserve.kernels` in kernels/ and
`fleetserve.operator` in operator/. operator/ deliberately has no __init__.py at
its top: a folder named `operator` that is a regular package would shadow the
standard library module of that name whenever the repo root is on sys.path.
"""

from setuptools import find_packages, setup

ROOTS = {"fleetserve.runtime": "runtime", "fleetserve.kernels": "kernels", "fleetserve.operator": "operator"}

packages, package_dir = [], {}
for name, folder in ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(where=folder)]

setup(packages=packages, package_dir=package_dir, package_data={"fleetserve.runtime": ["py.typed"]})
