#!/usr/bin/env python3
"""Run dvara: python dvara.py -c conf/dvara.conf"""

import sys

from dvara_lib.process.app import main

if __name__ == "__main__":
    sys.exit(main())
