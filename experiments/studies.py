"""Section 3's trigger studies (Figs. 4 and 5) through the service, for one or more models.

Serves the models with one live `bdserve serve --lab` and runs `bdserve study location` and
`bdserve study appearance` against it (defense none), writing
experiments/results/studies/<model>/{location,appearance}.{json,png}. Section 3 trains its
BadNets model with the 0/128 trigger (`bdserve train --trigger badnets128`); the tables'
models use 0/255.

    python experiments/studies.py --store /work/models --models badnets128 [--limit 300] [--stride 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from bdserve.testing import served
from bdserve.settings import REPO_ROOT, model_store

OUT = REPO_ROOT / "experiments" / "results" / "studies"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=model_store())
    p.add_argument("--models", default="badnets128")
    p.add_argument("--limit", type=int, default=300, help="class-balanced test images before dropping the target's")
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--step", type=int, default=15)
    p.add_argument("--studies", default="location,appearance")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    names = args.models.split(",")
    with served(args.store, names, "--lab") as addr:
        for name in names:
            for study in args.studies.split(","):
                extra = ["--stride", str(args.stride)] if study == "location" else ["--step", str(args.step)]
                cmd = [sys.executable, "-m", "bdserve.cli", "study", study, "--endpoint", addr["grpc"], "--model", name,
                       "--card", str(args.store / name / "card.json"), "--limit", str(args.limit), *extra,
                       "--out", str(args.out / name)]
                print(" ".join(cmd[2:]), flush=True)
                subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
