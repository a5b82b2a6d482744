"""Development and benchmark harnesses, not part of the installed package (the wheel ships `services`
only): running the whole system on one machine (`./pt up`, `./pt demo`: cli.py over a local RabbitMQ
node or cluster, PostgreSQL, the four services and their supervisor), the system-test harness
(system_*.py: start the services, send studies, reconcile, inject faults), real DICOM peers (Orthanc,
dcmtk, a silent PACS), child processes, the one `eventually()` wait, queue taps and event builders.

The tests and `bench/` import it; `services` never does (tests/unit/test_import_graph.py).
"""
