"""``mlx_dgemma.drafter.train``: distil a drafter from a target model.

    mlx_dgemma.drafter.train --model TARGET --data DATA --out DRAFTER [--from-data] [--iters 2000] [--resume]

1. Data (``data.py``): ``--data`` is a JSONL / JSON / parquet file, a folder of them, or a Hugging Face dataset id
   (``--split``, default train); records in any common shape (chat messages, prompt/completion, ShareGPT, Alpaca,
   question/answer). ``--max-records`` takes the first N.
2. Features (``distill.py``, ``features.py``): the target answers every prompt (its own sampler) or, with
   ``--from-data``, encodes each record's prompt and answer once, teacher-forced (no generation); each answer
   canvas becomes a sample (the target's context features before it, and the canvas). The features stream to disk
   in shards (``--features``, default ``<work>/features``) as records are encoded; a run continues the shards an
   earlier one completed with the same data and flags. The plan (records, canvases, disk) is printed first.
3. Training: the drafter learns to propose the target's canvas, from no canvas tokens at all (the first pass at
   inference, half the rows) or from a partly blanked copy of it (what further passes see). Cross-entropy through
   the target's frozen LM head; AdamW with a cosine schedule; 5% of the samples held out for canvas accuracy. The
   features are read memory-mapped: memory does not grow with the data.
4. ``--out``: the drafter folder (config records the target it was trained for), written atomically.

Checkpoints (weights, optimizer, step) go to ``--work`` (default ``<out>.work/``) every ``--save-every`` steps,
in training's layout (``mlx_dgemma.train.checkpoint``: a step folder named by ``checkpoint.json``); ``--resume``
continues there. docs/drafter-training.md has the command for the 26B model and its cost.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from tqdm import tqdm

from mlx_dgemma import load
from mlx_dgemma.cli.shared import run_cli
from mlx_dgemma.drafter.checkpoint import WEIGHTS_FILE, DrafterError, save_drafter
from mlx_dgemma.drafter.data import resolve
from mlx_dgemma.drafter.distill import collect_features
from mlx_dgemma.drafter.head import build_for_folder
from mlx_dgemma.drafter.model import Drafter, DrafterArgs
from mlx_dgemma.model.arrays import flatten, load_safetensors
from mlx_dgemma.train import TrainConfig
from mlx_dgemma.train.checkpoint import current, write_checkpoint
from mlx_dgemma.train.trainer import OPTIMIZER_FILE, STATE_FILE, Progress, StepLog, make_optimizer

HELD_OUT = 0.05
LOSS_WINDOW = 25  # steps the reported loss averages
REPORT_EVERY = 100  # steps between plain progress lines when the output is piped
WEIGHT_DECAY = 0.01
LEGACY_CHECKPOINT = "checkpoint.safetensors"  # the work folder's checkpoint before training's layout


def default_target_layers(num_layers: int) -> list[int]:
    """Evenly spread target layers to read: 3 of a small target, 6 of a deep one (z-lab's choice for the
    autoregressive 26B, 1 6 11 17 22 27 of 30 layers, is what this gives for 30)."""

    count, last = (6, num_layers - 3) if num_layers >= 12 else (3, num_layers - 1)
    return sorted({round(float(x)) for x in np.linspace(1, last, count)})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx_dgemma.drafter.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--model", default=None, help="the target: model folder or hub id (default: the embedded demo)"
    )
    p.add_argument(
        "--data",
        required=True,
        help="records: a .jsonl/.json/.parquet file, a folder of them, or a Hugging Face dataset id (org/name)",
    )
    p.add_argument(
        "--split", default="train", help="the split of a folder or dataset to read (default train)"
    )
    p.add_argument("--max-records", type=int, default=None, help="use the first N records (default: all)")
    p.add_argument("--out", required=True, help="the drafter folder to write")
    p.add_argument("--iters", type=int, default=2000, help="optimizer steps (default 2000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay to a tenth)")
    p.add_argument("--layers", type=int, default=2, help="drafter layers (default 2)")
    p.add_argument("--heads", type=int, default=4, help="drafter attention heads (default 4)")
    p.add_argument("--head-dim", type=int, default=32, help="drafter attention head size (default 32)")
    p.add_argument("--intermediate-size", type=int, default=256, help="drafter MLP width (default 256)")
    p.add_argument(
        "--context-window",
        type=int,
        default=256,
        help="latest context positions the drafter reads (default 256); the features' disk size grows with it",
    )
    p.add_argument(
        "--target-layers",
        default=None,
        help="target layers whose hidden states the drafter reads, "
        "e.g. 1,3,5 (default: spread over the target)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        help="answer tokens per record: the longest answer the target writes, or the part of a record's answer "
        "used with --from-data (default 256)",
    )
    p.add_argument(
        "--from-data",
        action="store_true",
        help="learn the data's answers (records with a completion), teacher-forced: no generation",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="target weights' dtype (default: as stored; float32 is fastest on a CPU)",
    )
    p.add_argument("--work", default=None, help="features and checkpoints (default: <out>.work)")
    p.add_argument(
        "--features",
        default=None,
        help="the feature store (default: <work>/features); another run with the same data and flags reuses it",
    )
    p.add_argument(
        "--shard-mb",
        type=float,
        default=1024,
        help="feature shard size in MB (default 1024): the resume unit",
    )
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument(
        "--confidence",
        type=float,
        default=0.0,
        help="record the probability from which the drafter drafts a position (default 0: every one; "
        "choose it by measuring, e.g. python -m demo.eval_drafter --split valid --confidence 0.9)",
    )
    p.add_argument(
        "--shortlist",
        type=int,
        default=0,
        help="also write a draft vocabulary of this many of the data's most frequent answer tokens "
        "(mlx_dgemma.drafter.head; e.g. 32768 for the 26B model; default 0: the full head)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue training from the checkpoint in --work (collection always continues its shards)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), interrupted="interrupted: resume with --resume")


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for numbers out of range, before the target loads."""
    for flag, value, least in (
        ("--iters", args.iters, 0),
        ("--batch-size", args.batch_size, 1),
        ("--layers", args.layers, 1),
        ("--max-tokens", args.max_tokens, 1),
        ("--save-every", args.save_every, 0),
        ("--heads", args.heads, 1),
        ("--head-dim", args.head_dim, 2),
        ("--intermediate-size", args.intermediate_size, 1),
        ("--context-window", args.context_window, 1),
        ("--max-records", 1 if args.max_records is None else args.max_records, 1),
        ("--shortlist", args.shortlist, 0),
    ):
        if value < least:
            raise DrafterError(f"{flag} must be at least {least} (got {value})")
    if not 0.0 <= args.confidence < 1.0:
        raise DrafterError(f"--confidence must be in [0, 1) (got {args.confidence})")
    if args.head_dim % 2:
        raise DrafterError(f"--head-dim must be even (rotary embeddings; got {args.head_dim})")
    if not (math.isfinite(args.shard_mb) and args.shard_mb > 0):
        raise DrafterError(f"--shard-mb must be a positive number (got {args.shard_mb})")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise DrafterError(f"--lr must be a positive number (got {args.lr})")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    out = Path(args.out).expanduser()
    work = Path(args.work).expanduser() if args.work else out.with_name(out.name + ".work")
    source = resolve(args.data, args.split)  # a bad --data fails before the target loads
    model, tokenizer = load(args.model, getattr(mx, args.dtype) if args.dtype else None)
    if args.shortlist > model.args.vocab_size:
        raise DrafterError(
            f"--shortlist {args.shortlist} is larger than the target's vocabulary ({model.args.vocab_size}): "
            "give a smaller one, or 0 for the full head"
        )
    a = model.args
    layers = (
        [int(x) for x in args.target_layers.split(",")]
        if args.target_layers
        else default_target_layers(a.num_hidden_layers)
    )
    if not all(0 <= i < a.num_hidden_layers for i in layers):
        raise DrafterError(
            f"--target-layers {layers} out of range: the target has layers 0..{a.num_hidden_layers - 1}"
        )
    dargs = DrafterArgs(
        hidden_size=a.hidden_size,
        vocab_size=a.vocab_size,
        canvas_length=a.canvas_length,
        target_layers=layers,
        num_layers=args.layers,
        num_heads=args.heads,
        head_dim=args.head_dim,
        intermediate_size=args.intermediate_size,
        context_window=args.context_window,
    )
    work.mkdir(parents=True, exist_ok=True)
    features = Path(args.features).expanduser() if args.features else work / "features"
    how = "the data's answers (teacher-forced)" if args.from_data else "the target's own answers"
    files = f"{len(source.files)} file{'s' * (len(source.files) != 1)}"
    print(f"distillation from {how}, reading layers {layers}; data {source.name} ({files})")
    with StageProgress(sys.stdout) as progress:
        samples = collect_features(
            model,
            tokenizer,
            source,
            features,
            capture=layers,
            window=args.context_window,
            max_tokens=args.max_tokens,
            from_data=args.from_data,
            max_records=args.max_records,
            seed=args.seed,
            dtype=args.dtype or "as stored",
            shard_bytes=int(args.shard_mb * 2**20),
            progress=progress,
        )
    print(f"distillation: {len(samples)} canvases from {samples.records} records")
    if len(samples) < 2:
        raise DrafterError(
            f"{len(samples)} canvas to train on: a drafter needs at least 2 (one is held out): give more records"
        )
    mx.random.seed(args.seed)
    drafter = Drafter(dargs)
    trainer = DrafterTrainer(drafter, model, samples, train_config(args), work)
    if args.resume and trainer.resume():
        print(f"resuming at step {trainer.step}")
    stats = trainer.run(Progress(args.iters, sys.stdout, every=REPORT_EVERY, mean_of=LOSS_WINDOW))
    extra = {"propose": {"confidence": args.confidence}} if args.confidence else {}
    save_drafter(drafter, model, out, {"training": stats, **extra})
    if args.shortlist:  # after the drafter's folder is written: saving it replaces the folder
        _, share, _ = build_for_folder(
            out, model, tokenizer, args.data, args.shortlist, prompt=True, limit=args.max_records
        )
        print(f"shortlist: {args.shortlist:,} tokens, {share:.1%} of the data's answer tokens")
    print(
        f"drafter for {model.source}: {out} ({stats['parameters']:,} parameters; held-out canvas accuracy "
        f"{stats['held_out_canvas_accuracy']:.1%}, token accuracy {stats['held_out_token_accuracy']:.1%})"
    )
    return 0


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The loop's settings in training's terms: AdamW, cosine decay to a tenth of ``--lr``, no clipping."""
    return TrainConfig(
        iters=args.iters,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        optimizer="adamw",
        weight_decay=WEIGHT_DECAY,
        lr_schedule="cosine",
        grad_clip=None,
        save_every=args.save_every,
        seed=args.seed,
    )


class StageProgress:
    """Collection's progress: a tqdm bar per stage (scan, encode, distil) on a terminal; plain lines when piped,
    one per twentieth of a stage (per ``UNKNOWN_EVERY`` records while its total is unknown) and one at its end."""

    UNKNOWN_EVERY = 1000

    def __init__(self, out: Any):
        self.out, self.live = out, out.isatty()
        self.bar: tqdm | None = None
        self.stage, self.shown, self.done, self.last = "", 0, 0, ""

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, stage: str, done: int, total: int, note: str = "") -> None:
        if stage != self.stage:
            self.close()
            self.stage, self.shown = stage, 0
            if self.live:
                self.bar = tqdm(
                    total=total or None, desc=stage, unit="record", file=self.out, dynamic_ncols=True
                )
        text = f"{stage} {done:,}{f'/{total:,}' if total else ''} records" + (f", {note}" if note else "")
        self.last, self.done = text, done
        if self.bar is not None:
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(done - self.bar.n)
            return
        every = max(1, total // 20) if total else self.UNKNOWN_EVERY
        if done - self.shown >= every or done == total:
            self.line(text)
            self.shown = done

    def line(self, text: str) -> None:
        """A line of its own, above the bar on a terminal."""
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def close(self) -> None:
        """End the stage: close its bar, or print its last count if no line showed it."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.last and self.done != self.shown:
            self.line(self.last)
        self.last = ""


class DrafterTrainer:
    """Trains ``drafter`` on ``samples`` through ``model``'s frozen embedding and LM head; resumable.

    Training's pieces do the rest: ``make_optimizer`` (AdamW, cosine decay to a tenth), ``Progress`` (the bar
    or plain lines) and ``write_checkpoint`` (one atomic step folder in ``work``, named by ``checkpoint.json``).
    """

    def __init__(self, drafter, model, samples, cfg: TrainConfig, work: Path):
        # samples: a FeatureStore (memory-mapped shards) or in-memory Samples; both read as window / targets.
        self.drafter, self.model, self.samples, self.cfg, self.work = drafter, model, samples, cfg, work
        order = np.random.default_rng(cfg.seed).permutation(len(samples))
        held = max(1, int(HELD_OUT * len(samples)))
        self.valid_idx, self.train_idx = order[:held], order[held:]
        self.optimizer = make_optimizer(cfg)
        self.step = 0
        self.loss_and_grad = nn.value_and_grad(drafter, self.loss)

    def batch(self, idx) -> tuple[Any, Any, Any]:
        """Left-padded features [B, T, F], their validity [B, T] and the target canvases [B, C]."""
        s = self.samples
        T = int(s.lengths[idx].max())
        feats = np.zeros((len(idx), T, s.feature_size), dtype=np.float32)
        valid = np.zeros((len(idx), T), dtype=bool)
        for row, i in enumerate(idx):
            window = s.window(int(i))
            feats[row, T - len(window) :] = window
            valid[row, T - len(window) :] = True
        return mx.array(feats), mx.array(valid), mx.array(s.targets(idx))

    def inputs(self, targets, rng) -> Any:
        """Half the rows see no canvas token (the first pass); the others a copy blanked at a random rate."""
        B, C = targets.shape
        rate = np.where(rng.random(B) < 0.5, 1.0, rng.random(B))
        blank = rng.random((B, C)) < rate[:, None]
        return mx.where(mx.array(blank), self.model.args.pad_token_id, targets)

    def logits(self, feats, valid, tokens):
        ctx = self.drafter.fuse(feats)
        return self.model.logits(self.drafter(self.model.model.decoder.embed(tokens), ctx, valid))

    def loss(self, feats, valid, tokens, targets):
        return nn.losses.cross_entropy(self.logits(feats, valid, tokens), targets).mean()

    def train_step(self) -> StepLog:
        start, rng = time.perf_counter(), np.random.default_rng([self.cfg.seed, self.step])
        idx = rng.choice(self.train_idx, size=min(self.cfg.batch_size, len(self.train_idx)), replace=False)
        feats, valid, targets = self.batch(idx)
        loss, grads = self.loss_and_grad(feats, valid, self.inputs(targets, rng), targets)
        self.optimizer.update(self.drafter, grads)
        mx.eval(loss, self.drafter.parameters(), self.optimizer.state)
        self.step += 1
        return StepLog(self.step, float(loss.item()), None, None, targets.size, time.perf_counter() - start)

    def accuracy(self) -> tuple[float, float]:
        """(whole-canvas, token) accuracy of first-pass drafts on the held-out samples."""
        hits = tokens = whole = 0
        for at in range(0, len(self.valid_idx), 64):
            idx = self.valid_idx[at : at + 64]
            feats, valid, targets = self.batch(idx)
            blank = mx.full(targets.shape, self.model.args.pad_token_id, dtype=mx.int32)
            same = np.array(mx.argmax(self.logits(feats, valid, blank), axis=-1) == targets)
            hits, tokens, whole = hits + same.sum(), tokens + same.size, whole + same.all(axis=1).sum()
        return whole / len(self.valid_idx), hits / tokens

    def run(self, progress: Progress) -> dict[str, Any]:
        """Train to ``cfg.iters``, saving every ``cfg.save_every`` steps; returns the run's statistics."""
        start, losses = time.perf_counter(), []
        self.drafter.train()
        progress.start(self.step)
        try:
            while self.step < self.cfg.iters:
                losses.append(self.train_step())
                progress.update(losses[-1])
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self.save()
        finally:
            progress.close()
        self.drafter.eval()
        whole, token = self.accuracy()
        return {
            "steps": self.step,
            "final_loss": sum(s.loss for s in losses[-LOSS_WINDOW:]) / max(len(losses[-LOSS_WINDOW:]), 1),
            "seconds": round(time.perf_counter() - start, 1),
            "samples": len(self.samples),
            "prompts": self.samples.prompts,
            "held_out_canvas_accuracy": round(float(whole), 4),
            "held_out_token_accuracy": round(float(token), 4),
            "parameters": sum(v.size for _, v in flatten(self.drafter.parameters())),
        }

    def save(self) -> None:
        """The drafter's weights, the optimizer's state and the step, as one checkpoint of training's layout."""
        weights = dict(flatten(self.drafter.parameters()))
        state = dict(flatten(self.optimizer.state))
        write_checkpoint(
            self.work,
            self.step,
            {
                WEIGHTS_FILE: lambda p: mx.save_safetensors(str(p), weights),
                OPTIMIZER_FILE: lambda p: mx.save_safetensors(str(p), state),
                STATE_FILE: lambda p: p.write_text(json.dumps({"step": self.step}) + "\n"),
            },
        )
        (self.work / LEGACY_CHECKPOINT).unlink(missing_ok=True)  # superseded

    def resume(self) -> bool:
        """Load the checkpoint in ``work`` (or one written before step folders); False when there is none."""
        folder = current(self.work)
        if folder is not None:
            weights = load_safetensors(folder / WEIGHTS_FILE)
            state = load_safetensors(folder / OPTIMIZER_FILE)
            step = json.loads((folder / STATE_FILE).read_text())["step"]
        elif (self.work / LEGACY_CHECKPOINT).is_file():
            loaded = mx.load(str(self.work / LEGACY_CHECKPOINT), return_metadata=True)
            arrays, metadata = cast("tuple[dict[str, mx.array], dict[str, str]]", loaded)  # safetensors
            weights = {k.removeprefix("drafter."): v for k, v in arrays.items() if k.startswith("drafter.")}
            state = {k.removeprefix("optimizer."): v for k, v in arrays.items() if k.startswith("optimizer.")}
            step = metadata["step"]
        else:
            return False
        self.drafter.load_weights(list(weights.items()))
        self.optimizer.state = tree_unflatten(list(state.items()))
        self.step = int(step)
        return True


if __name__ == "__main__":
    sys.exit(main())
