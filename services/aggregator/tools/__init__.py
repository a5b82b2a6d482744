"""Aggregator tooling, not imported by the running aggregator service.

The offline work behind `pneumotriage triage ...`: `calibrate` learns the fusion weights and
thresholds of the policy file from labeled images (`triage calibrate`, `triage evaluate`),
`recalibrate` fits a site's calibration from its confirmed labels (`triage recalibrate`; the versions
it writes are read by the running service through `services.aggregator.site_calibration`),
`rescore` plans and sends the re-scoring of a withdrawn model version's studies, `label_export`
writes the clinicians' labels as a folder for `model adapt`. The service itself is
`services.aggregator.app` and what it imports (`tests/unit/test_import_graph.py` keeps it that way).
"""
