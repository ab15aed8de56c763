"""Runs et-prepare-data from a checkout: python scripts/prepare_data.py --image_dir=... --output_dir=..."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from estimator_transfer.cli import prepare_data  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  prepare_data.run()
