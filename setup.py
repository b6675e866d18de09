"""Maps the import packages onto the repository's top-level folders.

`fleetserve.runtime` lives in runtime/, `fleetserve.kernels` in kernels/ and
`fleetserve.operator` in operator/. operator/ deliberately has no __init__.py at
its top: a folder named `operator` that is a regular package would shadow the
standard library module of that name whenever the repo root is on sys.path.
"""

from setuptools import Extension, find_packages, setup

ROOTS = {"fleetserve.runtime": "runtime", "fleetserve.kernels": "kernels", "fleetserve.operator": "operator"}

packages, package_dir = [], {}
for name, folder in ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(where=folder)]

# The CPU kernels (kernels/cpu_int4.c, cpu_attention.c, cpu_norm.c): one plain C shared library loaded with
# ctypes (kernels/_native.py; no Python or torch headers at build time). optional: where no C compiler is
# at hand (a slim image) the install goes on and the CPU runs torch's int4 kernel and SDPA.
cpu_native = Extension(
    "fleetserve.kernels._cpu_native",
    sources=["kernels/cpu_int4.c", "kernels/cpu_attention.c", "kernels/cpu_norm.c"],
    extra_compile_args=["-O3", "-std=gnu11", "-fopenmp"],
    extra_link_args=["-fopenmp"],  # libgomp.so.1: at run time the one torch loaded (kernels/cpu_int4.c)
    optional=True,
)

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"fleetserve.runtime": ["py.typed"]},
    ext_modules=[cpu_native],
)
