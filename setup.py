from setuptools import find_packages, setup

setup(
    name="cloudhub",
    version="0.1.0",
    description="The cloud side of KubeEdge (CloudHub), on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # A flat layout with package_dir keeps the checkout on sys.path for editable installs, so
    # twistd finds twisted/plugins/cloudhub_plugin.py (design.md, packaging notes).
    package_dir={"": "."},
    packages=find_packages(include=["cloudhub", "cloudhub.*"]) + ["twisted.plugins"],
    package_data={"cloudhub.wire": ["*.proto"]},
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
    entry_points={"console_scripts": ["cloudhub = cloudhub.cli:main"]},
    zip_safe=False,
)
