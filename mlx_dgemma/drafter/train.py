"""``mlx_dgemma.drafter.train``: distil a drafter from a target model.

    mlx_dgemma.drafter.train --model TARGET --data prompts.jsonl --out DRAFTER [--iters 2000] [--resume]

1. Distillation data (``distill.py``): the target answers every prompt; each committed canvas becomes a sample
   (the target's context features before it, and the canvas). Saved in ``<out>.work/`` once collected.
   ``--from-data``: the data's own answers instead (prompt/completion records, e.g. the target's fine-tuning
   set), teacher-forced through the target's encoder: one encoder pass per record, no generation.
2. Training: the drafter learns to propose the target's canvas, from no canvas tokens at all (the first pass at
   inference, half the rows) or from a partly blanked copy of it (what further passes see). Cross-entropy through
   the target's frozen LM head; AdamW with a cosine schedule; 5% of the samples held out for canvas accuracy.
3. ``--out``: the drafter folder (config records the target it was trained for), written atomically.

Checkpoints (weights, optimizer, step) go to ``--work`` (default ``<out>.work/``) every ``--save-every`` steps;
``--resume`` continues there.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from mlx_dgemma import load
from mlx_dgemma.cli.shared import run_cli
from mlx_dgemma.drafter.checkpoint import DrafterError, save_drafter
from mlx_dgemma.drafter.distill import SAMPLES_FILE, Samples, collect, collect_from_data, read_prompts
from mlx_dgemma.drafter.model import Drafter, DrafterArgs

HELD_OUT = 0.05


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
    p.add_argument("--data", required=True, help='prompts: JSONL with {"prompt": ...} or {"messages": [...]}')
    p.add_argument("--out", required=True, help="the drafter folder to write")
    p.add_argument("--iters", type=int, default=2000, help="optimizer steps (default 2000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay to a tenth)")
    p.add_argument("--layers", type=int, default=2, help="drafter layers (default 2)")
    p.add_argument(
        "--target-layers",
        default=None,
        help="target layers whose hidden states the drafter reads, "
        "e.g. 1,3,5 (default: spread over the target)",
    )
    p.add_argument("--max-tokens", type=int, default=256, help="longest answer the target writes per prompt")
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
    p.add_argument("--work", default=None, help="distillation data and checkpoints (default: <out>.work)")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument(
        "--confidence",
        type=float,
        default=0.0,
        help="record the probability from which the drafter drafts a position (default 0: every one; "
        "choose it by measuring, e.g. scripts/eval_drafter.py --split valid --confidence 0.9)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from <out>.work/")
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
    ):
        if value < least:
            raise DrafterError(f"{flag} must be at least {least} (got {value})")
    if not 0.0 <= args.confidence < 1.0:
        raise DrafterError(f"--confidence must be in [0, 1) (got {args.confidence})")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise DrafterError(f"--lr must be a positive number (got {args.lr})")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    out = Path(args.out).expanduser()
    work = Path(args.work).expanduser() if args.work else out.with_name(out.name + ".work")
    model, tokenizer = load(args.model, getattr(mx, args.dtype) if args.dtype else None)
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
    )
    work.mkdir(parents=True, exist_ok=True)
    samples_file = work / SAMPLES_FILE
    if args.resume and samples_file.is_file():
        samples = Samples.load(samples_file)
        print(f"distillation data: {len(samples)} canvases from {samples.prompts} prompts (from {work})")
    elif args.from_data:
        print(f"distillation from the data's answers (teacher-forced), reading layers {layers}")
        with progress_bar(0, "encode", "record") as bar:
            samples = collect_from_data(
                model,
                tokenizer,
                args.data,
                layers,
                dargs.context_window,
                args.max_tokens,
                lambda done, total, canvases, seconds: _advance(bar, done, f"{canvases} canvases", total),
            )
        print(f"distillation: {len(samples)} canvases from {samples.prompts} records")
        samples.save(samples_file)
    else:
        prompts = read_prompts(args.data)
        print(f"distillation: the target answers {len(prompts)} prompts, reading layers {layers}")
        with progress_bar(len(prompts), "distil", "prompt") as bar:
            samples = collect(
                model,
                tokenizer,
                prompts,
                layers,
                dargs.context_window,
                args.max_tokens,
                args.seed,
                lambda done, total, canvases, seconds: _advance(bar, done, f"{canvases} canvases"),
            )
        print(f"distillation: {len(samples)} canvases from {len(prompts)} prompts")
        samples.save(samples_file)
    mx.random.seed(args.seed)
    drafter = Drafter(dargs)
    trainer = DrafterTrainer(drafter, model, samples, args.iters, args.batch_size, args.lr, args.seed, work)
    if args.resume and trainer.resume():
        print(f"resuming at step {trainer.step}")
    stats = trainer.run(args.save_every)
    extra = {"propose": {"confidence": args.confidence}} if args.confidence else {}
    save_drafter(drafter, model, out, {"training": stats, **extra})
    print(
        f"drafter for {model.source}: {out} ({stats['parameters']:,} parameters; held-out canvas accuracy "
        f"{stats['held_out_canvas_accuracy']:.1%}, token accuracy {stats['held_out_token_accuracy']:.1%})"
    )
    return 0


def progress_bar(total: int, desc: str, unit: str, initial: int = 0) -> tqdm:
    """A tqdm bar on a terminal; disabled when the output is piped (the caller prints plain lines then)."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        file=sys.stdout,
        dynamic_ncols=True,
        disable=not sys.stdout.isatty(),
    )


def _advance(bar: tqdm, done: int, postfix: str, total: int | None = None) -> None:
    if total is not None and bar.total != total:
        bar.total = total
    bar.set_postfix_str(postfix, refresh=False)
    bar.update(done - bar.n)


class DrafterTrainer:
    """Trains ``drafter`` on ``samples`` through ``model``'s frozen embedding and LM head; resumable."""

    def __init__(
        self, drafter, model, samples, iters: int, batch_size: int, lr: float, seed: int, work: Path
    ):
        self.drafter, self.model, self.samples = drafter, model, samples
        self.iters, self.batch_size, self.seed, self.work = iters, batch_size, seed, work
        self.features = np.array(samples.features)
        self.canvases = np.array(samples.canvases)
        order = np.random.default_rng(seed).permutation(len(samples))
        held = max(1, int(HELD_OUT * len(samples)))
        self.valid_idx, self.train_idx = order[:held], order[held:]
        schedule = optim.cosine_decay(lr, max(iters, 1), lr / 10)
        self.optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
        self.step = 0
        self.loss_and_grad = nn.value_and_grad(drafter, self.loss)

    def batch(self, idx) -> tuple[Any, Any, Any]:
        """Left-padded features [B, T, F], their validity [B, T] and the target canvases [B, C]."""
        s = self.samples
        T = int(s.lengths[idx].max())
        feats = np.zeros((len(idx), T, self.features.shape[-1]), dtype=np.float32)
        valid = np.zeros((len(idx), T), dtype=bool)
        for row, i in enumerate(idx):
            n, at = int(s.lengths[i]), int(s.starts[i])
            feats[row, T - n :] = self.features[at : at + n]
            valid[row, T - n :] = True
        return mx.array(feats), mx.array(valid), mx.array(self.canvases[idx])

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

    def train_step(self) -> float:
        rng = np.random.default_rng([self.seed, self.step])
        idx = rng.choice(self.train_idx, size=min(self.batch_size, len(self.train_idx)), replace=False)
        feats, valid, targets = self.batch(idx)
        loss, grads = self.loss_and_grad(feats, valid, self.inputs(targets, rng), targets)
        self.optimizer.update(self.drafter, grads)
        mx.eval(loss, self.drafter.parameters(), self.optimizer.state)
        self.step += 1
        return float(loss.item())

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

    def run(self, save_every: int, report_every: int = 100) -> dict[str, Any]:
        """Train to ``iters``; a tqdm bar on a terminal, else a plain line every ``report_every`` steps."""
        start, losses = time.perf_counter(), []
        self.drafter.train()
        with progress_bar(self.iters, "train", "step", initial=self.step) as bar:
            while self.step < self.iters:
                losses.append(self.train_step())
                mean = sum(losses[-25:]) / len(losses[-25:])
                _advance(bar, self.step, f"loss {mean:.4f}")
                if bar.disable and (self.step % report_every == 0 or self.step == self.iters):
                    print(f"step {self.step}/{self.iters}  loss {mean:.4f}", flush=True)
                if save_every and self.step % save_every == 0:
                    self.save()
        self.drafter.eval()
        whole, token = self.accuracy()
        return {
            "steps": self.step,
            "final_loss": sum(losses[-25:]) / max(len(losses[-25:]), 1),
            "seconds": round(time.perf_counter() - start, 1),
            "samples": len(self.samples),
            "prompts": self.samples.prompts,
            "held_out_canvas_accuracy": round(float(whole), 4),
            "held_out_token_accuracy": round(float(token), 4),
            "parameters": sum(v.size for _, v in tree_flatten(self.drafter.parameters())),
        }

    def save(self) -> None:
        tmp = self.work / "checkpoint.tmp.safetensors"
        weights = {f"drafter.{k}": v for k, v in tree_flatten(self.drafter.parameters())}
        weights |= {f"optimizer.{k}": v for k, v in tree_flatten(self.optimizer.state)}
        mx.save_safetensors(str(tmp), weights, metadata={"step": str(self.step)})
        tmp.replace(self.work / "checkpoint.safetensors")

    def resume(self) -> bool:
        file = self.work / "checkpoint.safetensors"
        if not file.is_file():
            return False
        arrays, metadata = mx.load(str(file), return_metadata=True)
        self.drafter.load_weights(
            [(k[len("drafter.") :], v) for k, v in arrays.items() if k.startswith("drafter.")]
        )
        self.optimizer.state = tree_unflatten(
            [(k[len("optimizer.") :], v) for k, v in arrays.items() if k.startswith("optimizer.")]
        )
        self.step = int(metadata["step"])
        return True


if __name__ == "__main__":
    sys.exit(main())
