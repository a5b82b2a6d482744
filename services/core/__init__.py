"""The small shared kernel: settings, contracts, broker, database, imaging, telemetry.

Services import from here and never from each other; they meet only through these contracts and
the broker.
"""
