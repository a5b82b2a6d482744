"""Ingest tooling, not imported by the running ingest service.

`make_dicom` turns an image into a DICOM Part 10 file (test data, demos, benchmarks) and `send` is a
small C-STORE sender (`pneumotriage send`); they play the modality's part. The service itself is
`services.ingest.app` and what it imports (`tests/unit/test_import_graph.py` keeps it that way).
"""
