"""Runs et-local-cluster from a checkout.

  python scripts/local_cluster.py --workers=1 --ps=1 -- --flagfile=flags/cluster_job.flags
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from estimator_transfer.cli import local_cluster  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  local_cluster.run()
