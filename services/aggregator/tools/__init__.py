"""Aggregator tooling, not imported by the running aggregator service.

The offline work behind `pneumotriage triage ...`: `rescore` plans and sends the re-scoring of a
withdrawn model version's studies, `label_export` writes the clinicians' labels as a folder for
`model adapt`. The service itself is `services.aggregator.app` and what it imports
(`tests/unit/test_import_graph.py` keeps it that way).
"""
