"""The fault run with replicas as a command (the slow test tests/fault/test_system_replicas_faults.py
does the same and asserts): N real X-rays over 4 associations into two processes of every service
on a 3-node RabbitMQ cluster (quorum queues) + PostgreSQL; kill -9 one replica of each service,
stop and start one RabbitMQ node, restart PostgreSQL; then reconcile and print the counts.

    python bench/replica_faults.py --n 1000 [--replicas 2] [--json-out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.system_cluster import ScaleOut, replica_faults  # noqa: E402
from harness.system_scenario import make_batch  # noqa: E402

SHARED = Path(os.environ.get("PT_SHARED_DATA", REPO.parent / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--associations", type=int, default=4)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pt-replica-faults-") as tmp:
        batch = make_batch(SHARED, Path(tmp) / "dicom", args.n, seed=args.n)
        started = time.monotonic()
        with ScaleOut(Path(tmp) / "run", replicas=args.replicas) as run:
            rec, _sent, events = replica_faults(run, batch, associations=args.associations)
        problems = rec.problems()
        result = {
            "images": args.n,
            "replicas": args.replicas,
            "associations": args.associations,
            "faults": events,
            "acknowledged": len(rec.acked),
            "stored_instances": len(rec.ingest_instances),
            "ingest_rows": rec.ingest_rows,
            "predictions": len(rec.predictions),
            "duplicate_predictions": sum(1 for v in rec.predictions.values() if v > 1),
            "labeling_tasks": len(rec.labeling_tasks),
            "studies": len(rec.study_rows),
            "studies_flagged": sum(1 for f in rec.study_flags.values() if f not in (None, "", "PENDING")),
            "duplicate_study_rows": sum(1 for v in rec.study_rows.values() if v > 1),
            "lost": len(rec.acked - set(rec.ingest_instances)),
            "dead_lettered": sum(len(v) for v in rec.dead_letters.values()),
            "problems": problems,
            "seconds": round(time.monotonic() - started, 1),
        }
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
