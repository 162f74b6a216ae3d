#!/usr/bin/env python3
"""Run a hexscrape cluster: ``python run_cluster.py --help``.

A thin entry point: everything lives in :mod:`hexscrape.cluster` (which never
imports Scrapy or Twisted). ``python run_cluster.py seed ...`` seeds the shared
frontier without crawling (:func:`hexscrape.seed.main`).
"""

import sys

from hexscrape.cluster import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
