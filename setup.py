"""Shim for ``scrapyd-deploy``, which builds eggs with ``setup.py bdist_egg``.

All metadata lives in pyproject.toml; keep this file empty of it.
"""

from setuptools import setup

setup()
