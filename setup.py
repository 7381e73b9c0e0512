"""Package layout and dependencies of cloudhub; the rest of the metadata is in pyproject.toml.

The version has one source, ``__version__`` in cloudhub/__init__.py, which pyproject.toml reads
without importing cloudhub (``[tool.setuptools.dynamic]``).
"""

from setuptools import find_packages, setup

setup(
    # A flat layout with package_dir keeps the checkout on sys.path for editable installs, so
    # twistd finds twisted/plugins/cloudhub_plugin.py (design.md, packaging notes).
    package_dir={"": "."},
    # twisted.plugins is listed on its own, without twisted/__init__.py or
    # twisted/plugins/__init__.py (there are none): the wheel then adds only
    # twisted/plugins/cloudhub_plugin.py to Twisted's own plugin package, never replaces it.
    packages=find_packages(include=["cloudhub", "cloudhub.*"]) + ["twisted.plugins"],
    package_data={"cloudhub": ["py.typed"], "cloudhub.wire": ["*.proto"]},
    # Only the files named above: nothing else that MANIFEST.in puts in the sdist (tests, etc/,
    # deploy/, ...) and no twisted/plugins/dropin.cache ends up in the wheel.
    include_package_data=False,
    install_requires=[
        "twisted[tls]>=24.3.0",
        "autobahn>=24.4.2",
        "aioquic>=1.7.0,<1.8",
        "pyOpenSSL>=24.0.0",
        "service-identity>=24.1.0",
        "cryptography>=43.0.0",
        "PyJWT>=2.8.0",
        "PyYAML>=6.0",
        "protobuf>=7.35.1,<8",
        "prometheus_client>=0.20.0",
        "zope.interface>=6.0",
    ],
    extras_require={
        "test": ["hypothesis>=6.100.0"],
        "dev": ["hypothesis>=6.100.0", "ruff>=0.6.0", "mypy>=1.11.0", "mypy-zope>=1.0.5"],
    },
)
