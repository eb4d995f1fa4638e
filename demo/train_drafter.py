"""Distil the bundled drafter for the embedded demo model (``mlx_dgemma/default_model/drafter/``).

    python -m demo.train_drafter [--model DIR] [--prompts 10000] [--iters 3000] [--batch-size 16] [--layers 4]
                                 [--confidence 0.9] [--from-data] [--resume]

The shipped drafter is ``--from-data`` with these defaults (47 minutes on 2 x86 cores, OpenBLAS, fp32).

The prompts come from the training split of the demo model's task (``demo.task``): the held-out test set stays
unseen by the drafter too. The work is ``mlx_dgemma.drafter.train``'s: the demo model answers every prompt, then the
drafter learns to propose its canvases from its context features. With ``--from-data`` the model encodes each
training record's prompt and answer instead (teacher-forced, no generation: what 256-token canvases need to stay
within minutes here).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from demo import task
from mlx_dgemma import DEFAULT_MODEL
from mlx_dgemma.drafter import train

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help="the demo model to distil for; the drafter goes to its drafter/ (default: the embedded one)",
    )
    parser.add_argument("--prompts", type=int, default=10000, help="training prompts the target answers")
    parser.add_argument("--iters", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16, help="canvases per step")
    parser.add_argument("--from-data", action="store_true", help="learn the records' answers, teacher-forced")
    parser.add_argument("--layers", type=int, default=4, help="drafter layers")
    parser.add_argument(
        "--confidence",
        type=float,
        default=0.9,
        help="the drafter drafts positions it gives this probability (chosen on the valid split)",
    )
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "demo_drafter")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    prompts = args.work / "prompts.jsonl"
    canvas = json.loads((args.model / "config.json").read_text())["canvas_length"]
    long = task.is_long(canvas)
    prompts.write_text("".join(item.to_jsonl() + "\n" for item in task.split("train", args.prompts, long)))
    argv = [
        "--model",
        str(args.model),
        "--data",
        str(prompts),
        "--out",
        str(args.model / "drafter"),
        "--work",
        str(args.work),
        "--iters",
        str(args.iters),
        "--batch-size",
        str(args.batch_size),
        "--layers",
        str(args.layers),
        "--dtype",
        "float32",
        "--max-tokens",
        str(task.max_tokens(canvas)),
        "--confidence",
        str(args.confidence),
    ]
    return train.main(argv + ["--from-data"] * args.from_data + ["--resume"] * args.resume)


if __name__ == "__main__":
    sys.exit(main())
