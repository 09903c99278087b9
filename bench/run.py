"""`make bench`: every benchmark, each measuring its naive alternative in the same run.

B1 SISA subject unlearning vs a monolithic retrain; B2 certified removal vs retraining a
logistic model; B3 approximate strategies vs retraining an MLP; B4 1,000 subject requests
through the whole service, batched into jobs vs one job each; B5 text and audio models
(ingest rate, training, one-subject SISA unlearning vs a monolithic retrain); B6 the
forgetting check's false alarms on exact erasures and detection of a no-op /
under-trained method; B7 one-subject SISA unlearning vs monolithic retraining of a gbdt
model; B8 how the service's costs grow with 100k, 300k and 1M records, and B9 intake of
deletion requests under concurrent load, both on PostgreSQL + Redis (skipped when they
do not answer); E1 one subject erased end to end through the API from a SISA model vs
training the same network monolithically.
Each prints its table and writes JSON under bench/results/. Pass --quick for a small
smoke run.
"""

from __future__ import annotations

import argparse
import time

from bench import (
    b1_sisa,
    b2_certified,
    b3_strategies,
    b4_batching,
    b5_media,
    b6_verification,
    b7_trees,
    b8_scale,
    b9_intake,
    e1_erasure,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--only",
        choices=["b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "b9", "e1"],
        action="append",
    )
    args = parser.parse_args()
    runs = {
        "b1": b1_sisa.main,
        "b2": b2_certified.main,
        "b3": b3_strategies.main,
        "b4": b4_batching.main,
        "b5": b5_media.main,
        "b6": b6_verification.main,
        "b7": b7_trees.main,
        "b8": b8_scale.main,
        "b9": b9_intake.main,
        "e1": e1_erasure.main,
    }
    for name, fn in runs.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        fn(quick=args.quick)
        print(f"[{name} took {time.perf_counter() - t0:.0f} s]\n")


if __name__ == "__main__":
    main()
