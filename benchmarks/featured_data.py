"""The bundled Wikipedia file with N features per event, for measuring what features cost.

The bundled file carries no features; the original JODIE Wikipedia and Reddit logs carry 172
per event (LIWC vectors of the edit or post text). This writes the same rows with N features
each, uniform in [0, 1) from a fixed seed, four decimals as in those logs, so that message
sizes, changelog rows and model inputs have the shape real logs give them. With --rows only
the first rows (e.g. a model's training prefix: `jodie train --data` on it).

    python benchmarks/featured_data.py --features 172 --out wiki172.csv
    python benchmarks/featured_data.py --features 256 --out wiki256.csv
    python benchmarks/featured_data.py --features 256 --rows 62989 --out half256.csv
    jodie train --data half256.csv --epochs 1 --out MF256
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from operators.dataset import bundled_wikipedia, open_text
from streams.cli.common import script_main

HEADER = "user_id,item_id,timestamp,state_label,comma_separated_list_of_features"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, required=True, help="features per event")
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write")
    parser.add_argument("--rows", type=int, default=None, help="only the first rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.features < 1:
        parser.error("--features must be at least 1")
    rng = np.random.default_rng(args.seed)
    written = 0
    with open_text(bundled_wikipedia()) as src, args.out.open("w") as out:
        next(src)  # the header
        out.write(HEADER + "\n")
        for line in src:
            if args.rows is not None and written >= args.rows:
                break
            # user, item, timestamp and label; the bundled file has no features after them
            head = ",".join(line.rstrip("\n").split(",")[:4])
            values = rng.random(args.features)
            out.write(head + "," + ",".join(f"{v:.4f}" for v in values) + "\n")
            written += 1
    print(f"{args.out}: {written} rows with {args.features} features each")


if __name__ == "__main__":
    script_main(main)
