"""Labeling tooling, not imported by the running labeling service.

The simulated crowd: `crowd_model` (a difficulty-aware model of non-expert annotators, pure
functions) and `crowd` (simulated annotators that sign in and answer through the HTTP API, behind
`pneumotriage labeling simulate-crowd`, the crowd tests and bench/labeling.py). The service itself
is `services.labeling.app` and what it imports (`tests/unit/test_import_graph.py` keeps it that way).
"""
