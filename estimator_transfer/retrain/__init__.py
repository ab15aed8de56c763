"""Continuous retraining (et-retrain): rounds over a growing data folder.

Layers, bottom-up: shards (which units of the folder are complete, their
records), store (the per-round journal, the ledger, what was consumed and who
is champion), validation (the fixed validation data, per class set), rounds
(one round: plan, train, evaluate, decide, publish, ledger), service (the
watch loop, signals, exit conditions). faults holds the test-only kill points.
"""
