"""Training and evaluation speed of JODIE on the bundled Wikipedia file (157,474 events).

Measures: seconds per training epoch (t-batch pass over the 80% training split), training
events/s, peak resident memory of the process, and events/s of the frozen sequential
evaluation (the stream's semantics) over the validation split.

    python benchmarks/train_speed.py [--epochs 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from operators.dataset import bundled_wikipedia, load_interactions
from operators.evaluation.protocols import frozen_replay
from operators.evaluation.scorer import PlainScorer
from operators.model.config import TrainConfig
from operators.training.trainer import train

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--threads", type=int, default=1)
args = parser.parse_args()
torch.set_num_threads(args.threads)

log = load_interactions(bundled_wikipedia())
result = train(log, TrainConfig(epochs=args.epochs, threads=args.threads, progress=False))
n_train = result.split.train_end
seconds = result.curves["epoch_seconds"]
per_epoch = sum(seconds) / len(seconds)

valid = log.slice(result.split.train_end, result.split.valid_end)
started = time.perf_counter()
frozen_replay(result.model, result.states.copy(), valid, PlainScorer())
eval_seconds = time.perf_counter() - started

peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
print(f"threads                 {args.threads}")
print(f"training events         {n_train}")
print(f"seconds per epoch       {per_epoch:.1f}  (each: {', '.join(f'{s:.1f}' for s in seconds)})")
print(f"training events/s       {n_train / per_epoch:,.0f}")
print(f"peak RSS                {peak_rss_mib:,.0f} MiB")
print(f"frozen evaluation       {len(valid) / eval_seconds:,.0f} events/s ({len(valid)} events)")
