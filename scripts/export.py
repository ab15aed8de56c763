"""Runs et-export from a checkout: python scripts/export.py --flagfile=flags/demo.flags."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from estimator_transfer.cli import export  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  export.run()
