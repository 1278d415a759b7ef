"""vectorsync: keep vector embeddings of PostgreSQL rows, images, faces, text and graphs in sync in pgvector.

The rooms of the design (``encoders``, ``sync``, ``embedding_sql``, ``migrations``) are top-level
folders of the repository, linked into this folder, and install as subpackages of this one, so the
distribution claims no import name but ``vectorsync``. Links rather than a setuptools
``package_dir`` mapping: Python, mypy, pytest and editors then see one import path in a source
checkout, with no import hook.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vectorsync")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0+unknown"
