"""Packaging for dvara."""

import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', Path("dvara_lib/__init__.py").read_text()).group(1)

#: The compressors pymongo speaks besides zlib, with the libraries pymongo itself uses.
COMPRESSION = ["python-snappy>=0.6", "zstandard>=0.18"]

setup(
    name="dvara",
    version=VERSION,
    description="A connection-pooling proxy for MongoDB replica sets",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["dvara_lib", "dvara_lib.*"]),
    py_modules=["dvara"],
    install_requires=[
        "pymongo>=4.6",
        "configargparse>=1.7",
        "prometheus-client>=0.17",
        "crc32c>=2.3",
        "scramp>=1.5,<2",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-xdist>=3",
            "pytest-timeout>=2",
            "mockupdb>=1.8",
            "SecantusDB>=0.7.0b3",
            "hypothesis>=6",
            "trustme>=1.0",
            "Pillow>=10",  # the dashboards test decodes Ganglia-web's graphs
            *COMPRESSION,
            # pymongo's own zstd (the tests' clients): the backport of 3.14's compression.zstd
            "backports.zstd>=1.0; python_version < '3.14'",
        ],
        "demo": ["SecantusDB>=0.7.0b3", *COMPRESSION],
        "compression": COMPRESSION,
    },
    entry_points={"console_scripts": ["dvara = dvara_lib.process.app:main"]},
)
