"""The training loop: micro-batches, gradient accumulation, an MLX optimizer, validation, checkpoints, resume.

Everything random in step ``s`` (which examples, which canvas, the noise, self-conditioning, dropout) is drawn from
generators seeded by ``(seed, s, micro-batch)``, and the optimizer state is checkpointed with the weights. A run
resumed from a checkpoint therefore continues at the same step with the same losses as an uninterrupted run.

A checkpoint (``checkpoint.py``: one atomic unit) holds ``adapters.safetensors`` + ``adapter_config.json`` (see
``lora.py``), ``optimizer.safetensors`` (the optimizer's state) and ``trainer_state.json`` (step, seed, loss
history). A loss or gradient that is not finite (a learning rate far too high) stops the run with an error before
the optimizer step, so the last checkpoint stays the last good one; weights that are not finite are never saved.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, TextIO

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map, tree_unflatten
from tqdm import tqdm

from mlx_dgemma.errors import TrainError
from mlx_dgemma.model.arrays import flatten, load_safetensors
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.train.checkpoint import current, publish, write_checkpoint
from mlx_dgemma.train.data import Example
from mlx_dgemma.train.grad_checkpoint import checkpoint_layers
from mlx_dgemma.train.lora import ADAPTER_FILE, CONFIG_FILE, trainable_weights
from mlx_dgemma.train.objective import (
    Batch,
    Noise,
    ObjectiveConfig,
    choose_canvases,
    sample_noise,
    split_batch,
    training_loss,
)

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZERS = ("adamw", "adam", "sgd")
VALID_STREAM = 1 << 31  # seeds validation noise apart from every training step


@dataclass
class TrainConfig:
    """The loop's settings (the objective's are in ``objective``)."""

    iters: int = 100
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # or "cosine": decay to a tenth after ``warmup`` linear steps
    warmup: int = 0
    grad_clip: float | None = 1.0
    val_every: int = 50
    val_batches: int = 8  # -1: the whole validation set (mlx-lm's convention)
    save_every: int = 100
    report_every: int = 10
    seed: int = 0
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    grad_checkpoint: bool = False  # recompute each layer's activations in the backward pass (less memory)
    # Batches of examples of similar length (mlx-lm's order: sorted, cut into batches, batches shuffled each
    # epoch): less padding, faster steps; the same examples share a batch every epoch.
    group_by_length: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise TrainError(f"unknown optimizer {self.optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise TrainError(
                f"unknown learning-rate schedule {self.lr_schedule!r}: choose constant or cosine"
            )
        for name, least in (
            ("iters", 0),
            ("batch_size", 1),
            ("grad_accum", 1),
            ("warmup", 0),
            ("val_every", 0),
            ("save_every", 0),
            ("report_every", 1),
        ):
            if getattr(self, name) < least:
                raise TrainError(
                    f"{name.replace('_', '-')} must be at least {least} (got {getattr(self, name)})"
                )
        if self.val_batches < 1 and self.val_batches != -1:
            raise TrainError(f"val-batches must be at least 1, or -1 for all (got {self.val_batches})")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise TrainError(f"the learning rate must be a positive number (got {self.learning_rate})")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise TrainError(f"weight-decay must be a number >= 0 (got {self.weight_decay})")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise TrainError(f"grad-clip must be a number >= 0 (got {self.grad_clip})")


@dataclass
class StepLog:
    """One optimizer step: its losses (means over the micro-batches), tokens trained on, and seconds taken.

    ``diffusion`` and ``encoder`` are the objective's parts; None for a loss without parts (the drafter's)."""

    step: int
    loss: float
    diffusion: float | None
    encoder: float | None
    tokens: int
    seconds: float


@dataclass
class TrainResult:
    steps: list[StepLog]  # the steps this call ran
    val: list[tuple[int, float]]  # (step, validation loss)
    step: int  # steps completed in all, resumed ones included

    @property
    def tokens_per_second(self) -> float:
        return sum(s.tokens for s in self.steps) / max(sum(s.seconds for s in self.steps), 1e-9)


class Progress:
    """A tqdm bar on a terminal (loss and tokens/s in its postfix); plain lines every ``every`` steps when piped.

    The loss and tokens/s shown are means over the last ``mean_of`` steps (default: ``every``).
    """

    def __init__(self, total: int, out: TextIO | None = None, every: int = 10, mean_of: int | None = None):
        self.out = out if out is not None else sys.stdout
        self.total, self.every, self.live = total, max(every, 1), self.out.isatty()
        self.mean_of = max(mean_of or self.every, 1)
        self.window: list[StepLog] = []
        self.bar: tqdm | None = None

    def start(self, step: int) -> None:
        """Show the bar at ``step`` (a resumed run's) before the first, slowest step runs."""
        if self.live and self.bar is None:
            self.bar = tqdm(
                total=self.total,
                initial=step,
                file=self.out,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                leave=True,
            )

    def update(self, log: StepLog) -> None:
        self.window = [*self.window, log][-self.mean_of :]  # the last mean_of steps
        loss = sum(s.loss for s in self.window) / len(self.window)
        tps = sum(s.tokens for s in self.window) / max(sum(s.seconds for s in self.window), 1e-9)
        if self.live:
            self.start(log.step - 1)
            assert self.bar is not None  # start() makes it when live
            self.bar.set_postfix_str(f"loss {loss:.4f}, {tps:,.0f} tok/s", refresh=False)
            self.bar.update(log.step - self.bar.n)
        elif log.step % self.every == 0 or log.step == self.total:
            parts = (
                f"  (diffusion {log.diffusion:.4f}, encoder {log.encoder:.4f})"
                if log.diffusion is not None
                else ""
            )
            self.line(f"step {log.step}/{self.total}  loss {loss:.4f}  {tps:,.0f} tok/s{parts}")

    def line(self, text: str) -> None:
        """A line of its own (validation, checkpoint), above the bar on a terminal."""
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    """The optimizer ``cfg`` names, with its learning-rate schedule."""
    lr: Any = cfg.learning_rate
    if cfg.lr_schedule == "cosine":
        decay = optim.cosine_decay(cfg.learning_rate, max(cfg.iters - cfg.warmup, 1), cfg.learning_rate / 10)
        lr = decay
        if cfg.warmup:
            ramp = optim.linear_schedule(0.0, cfg.learning_rate, cfg.warmup)
            lr = optim.join_schedules([ramp, decay], [cfg.warmup])
    elif cfg.warmup:
        lr = optim.join_schedules(
            [optim.linear_schedule(0.0, cfg.learning_rate, cfg.warmup), lambda _: cfg.learning_rate],
            [cfg.warmup],
        )
    if cfg.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    return optim.SGD(learning_rate=lr, weight_decay=cfg.weight_decay)


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def example_indices(n: int, seed: int, first: int, count: int) -> list[int]:
    """Examples ``first .. first + count - 1`` of the stream: each epoch a fresh seeded shuffle of all ``n``."""
    return [int(_epoch_order(n, seed, j // n)[j % n]) for j in range(first, first + count)]


class Trainer:
    """Runs the objective over a data set with an optimizer; saves and resumes checkpoints in ``out``."""

    def __init__(
        self,
        model: Model,
        train_set: Sequence[Example],
        valid_set: Sequence[Example] | None,
        out: str | Path,
        cfg: TrainConfig,
        adapter_config: dict[str, Any],
        fill_id: int,
        progress: Progress | None = None,
    ):
        self.model, self.train_set, self.valid_set = model, list(train_set), list(valid_set or [])
        self.out, self.cfg, self.adapter_config, self.fill_id = Path(out), cfg, adapter_config, fill_id
        self.progress = progress
        self.optimizer = make_optimizer(cfg)
        self.step = 0
        self.saved_step: int | None = None  # the step of the last checkpoint written or resumed
        self.history: list[tuple[int, float]] = []
        self.val_history: list[tuple[int, float]] = []
        self.seconds = 0.0  # spent in training steps, resumed runs' included
        if cfg.grad_checkpoint:
            checkpoint_layers(model)
        self._by_length: np.ndarray | None = (
            None  # example indices sorted by length, when batches are grouped
        )
        if cfg.group_by_length:
            if len(self.train_set) < cfg.batch_size:
                raise TrainError(
                    f"group-by-length needs at least one full batch: {len(self.train_set)} examples, "
                    f"batch size {cfg.batch_size}"
                )
            lengths = [len(e.prompt) + len(e.answer) for e in self.train_set]
            self._by_length = np.argsort(lengths, kind="stable")
        self._loss_and_grad = nn.value_and_grad(model, self._loss)

    # -- one step ----------------------------------------------------------------------------------------------

    def _loss(self, batch: list[Batch], noise: list[Noise]) -> tuple[mx.array, mx.array, mx.array]:
        objective = self.cfg.objective
        return training_loss(self.model, batch, noise, objective.encoder_loss_weight, objective.mask_prompt)

    def micro_batch(self, step: int, micro: int) -> tuple[list[Batch], list[Noise]]:
        """The examples, canvases and noise of micro-batch ``micro`` of step ``step`` (deterministic), in parts."""
        cfg = self.cfg
        number = step * cfg.grad_accum + micro
        if self._by_length is not None:
            batches = len(self._by_length) // cfg.batch_size
            b = int(_epoch_order(batches, cfg.seed, number // batches)[number % batches])
            indices = self._by_length[b * cfg.batch_size : (b + 1) * cfg.batch_size].tolist()
        else:
            indices = example_indices(len(self.train_set), cfg.seed, number * cfg.batch_size, cfg.batch_size)
        return self._prepare(
            [self.train_set[i] for i in indices], np.random.default_rng([cfg.seed, step, micro])
        )

    def _prepare(
        self, examples: Sequence[Example], rng: np.random.Generator
    ) -> tuple[list[Batch], list[Noise]]:
        args = self.model.args
        canvases = choose_canvases(examples, args.canvas_length, rng)
        parts = split_batch(examples, canvases, args.canvas_length, args.pad_token_id, self.fill_id)
        return parts, [
            sample_noise(np.array(b.targets), args.vocab_size, rng, self.cfg.objective) for b in parts
        ]

    def train_step(self, step: int) -> StepLog:
        """Accumulate the gradients of ``grad_accum`` micro-batches, clip, and take one optimizer step."""
        start, cfg = time.perf_counter(), self.cfg
        mx.random.seed((cfg.seed * 1_000_003 + step) % (1 << 32))  # dropout, if any
        self.model.train()
        grads, sums, tokens = None, np.zeros(3), 0
        for micro in range(cfg.grad_accum):
            batch, noise = self.micro_batch(step, micro)
            losses, g = self._loss_and_grad(batch, noise)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(grads, losses)
            sums += [float(x.item()) for x in losses]
            tokens += sum(b.num_tokens for b in batch)
        grads = tree_map(lambda g: g / cfg.grad_accum, grads)
        if cfg.grad_clip:
            grads, norm = optim.clip_grad_norm(grads, cfg.grad_clip)
        else:
            norm = mx.sqrt(sum((mx.square(g).sum() for _, g in flatten(grads)), mx.array(0.0)))
        self._check_finite(step + 1, float(sums[0] / cfg.grad_accum), float(norm.item()))
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        loss, diffusion, encoder = (float(x) for x in sums / cfg.grad_accum)
        return StepLog(step + 1, loss, diffusion, encoder, tokens, time.perf_counter() - start)

    def _check_finite(self, step: int, loss: float, grad_norm: float) -> None:
        """Stop before an update that would wreck the weights: the last checkpoint stays the last good one."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
        kept = (
            f"the last good checkpoint (step {self.saved_step}) is kept in {self.out}"
            if self.saved_step is not None
            else "no checkpoint was written"
        )
        raise TrainError(
            f"step {step}: {what}, not a finite number: training stopped; {kept}; lower the learning "
            f"rate (now {self.cfg.learning_rate:g}) or raise --warmup"
        )

    def validate(self) -> float | None:
        """Mean loss over the first ``val_batches`` batches of the validation set, with fixed noise."""
        if not self.valid_set:
            return None
        return self.evaluate(self.valid_set, None if self.cfg.val_batches == -1 else self.cfg.val_batches)

    def evaluate(self, examples: Sequence[Example], num_batches: int | None = None) -> float:
        """Mean loss over the first ``num_batches`` batches of ``examples`` (None: all), with fixed noise."""
        self.model.eval()
        size, losses = self.cfg.batch_size, []
        count = math.ceil(len(examples) / size)
        for i in range(count if num_batches is None else min(num_batches, count)):
            chunk = examples[i * size : (i + 1) * size]
            batch, noise = self._prepare(chunk, np.random.default_rng([self.cfg.seed, VALID_STREAM, i]))
            loss = self._loss(batch, noise)[0]
            losses.append(float(loss))
        return sum(losses) / max(len(losses), 1)

    # -- the run -----------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train from ``self.step`` to ``cfg.iters``, validating and saving as configured.

        Ctrl-C finishes the step under way, saves a checkpoint and raises ``KeyboardInterrupt`` (a second
        Ctrl-C stops at once, leaving the previous checkpoint).
        """
        cfg, logs, vals = self.cfg, [], []
        if self.progress:
            self.progress.start(self.step)
        try:
            with _DeferredInterrupt() as interrupt:
                while self.step < cfg.iters:
                    logs.append(self._one_step())
                    if self.valid_set and (
                        (cfg.val_every and self.step % cfg.val_every == 0) or self.step == cfg.iters
                    ):
                        val = self.validate()
                        assert val is not None  # there is a validation set
                        vals.append((self.step, val))
                        self.val_history.append(vals[-1])
                        self._say(f"step {self.step}: validation loss {vals[-1][1]:.4f}")
                    if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.iters:
                        self.save()
                    if interrupt.requested:
                        self.save()
                        self._say(
                            f"interrupted: checkpoint at step {self.step} in {self.out} (continue with --resume)"
                        )
                        raise KeyboardInterrupt
        finally:
            if self.progress:
                self.progress.close()
        return TrainResult(logs, vals, self.step)

    def _one_step(self) -> StepLog:
        log = self.train_step(self.step)
        self.step = log.step
        self.history.append((log.step, log.loss))
        self.seconds += log.seconds
        if self.progress:
            self.progress.update(log)
        return log

    def _say(self, text: str) -> None:
        if self.progress:
            self.progress.line(text)

    # -- checkpoints -------------------------------------------------------------------------------------------

    def _identity(self) -> dict[str, Any]:
        """What must not change between a run and its resumption for the data order to stay the same."""
        c = self.cfg
        return {
            "seed": c.seed,
            "batch_size": c.batch_size,
            "grad_accum": c.grad_accum,
            "train_examples": len(self.train_set),
            "group_by_length": c.group_by_length,
        }

    def save(self) -> None:
        """Write the checkpoint (adapters, optimizer state, trainer state) as one atomic unit; see ``checkpoint.py``.

        Refuses weights that are not finite, so that a diverged run never replaces a good checkpoint.
        """
        weights = trainable_weights(self.model)
        finite = not weights or mx.stack([mx.isfinite(v).all() for v in weights.values()]).all().item()
        if not finite:
            raise TrainError(
                f"step {self.step}: the weights are no longer finite numbers, so they were not saved; "
                f"the last good checkpoint (step {self.saved_step}) is kept in {self.out}; lower the "
                "learning rate"
            )
        state = dict(flatten(self.optimizer.state))
        trainer_state = {
            "step": self.step,
            **self._identity(),
            "config": _jsonable(asdict(self.cfg)),
            "history": self.history,
            "val_history": self.val_history,
            "seconds": self.seconds,
        }
        folder = write_checkpoint(
            self.out,
            self.step,
            {
                ADAPTER_FILE: lambda p: mx.save_safetensors(str(p), weights),
                CONFIG_FILE: lambda p: p.write_text(json.dumps(self.adapter_config, indent=2) + "\n"),
                OPTIMIZER_FILE: lambda p: mx.save_safetensors(str(p), state),
                STATE_FILE: lambda p: p.write_text(json.dumps(trainer_state) + "\n"),
            },
        )
        publish(folder, self.out, (ADAPTER_FILE, CONFIG_FILE))
        self.saved_step = self.step

    def resume(self) -> int:
        """Load the current checkpoint in ``out`` (weights, optimizer state, step); returns the step it continues at."""
        folder = current(self.out)
        if folder is None and (self.out / STATE_FILE).is_file():
            folder = self.out  # written before checkpoints were step folders
        if folder is None:
            raise TrainError(f"nothing to resume in {self.out}: no checkpoint there (start without --resume)")
        missing = [f for f in (ADAPTER_FILE, OPTIMIZER_FILE, STATE_FILE) if not (folder / f).is_file()]
        if missing:
            raise TrainError(
                f"cannot resume {folder}: {missing[0]} is missing (an incomplete checkpoint); "
                "start again without --resume"
            )
        state = {
            "group_by_length": False,
            **json.loads((folder / STATE_FILE).read_text()),
        }  # older checkpoints
        changed = [k for k, v in self._identity().items() if state.get(k) != v]
        if changed:
            k = changed[0]
            raise TrainError(
                f"cannot resume {self.out}: {k} was {state.get(k)}, now {self._identity()[k]}; "
                "resume with the same data, --seed, --batch-size, --grad-accum and --group-by-length"
            )
        weights = load_safetensors(folder / ADAPTER_FILE)
        if set(weights) != set(trainable_weights(self.model)):
            raise TrainError(
                f"cannot resume {self.out}: its adapters do not match this run's --lora/--full settings"
            )
        self.model.load_weights(list(weights.items()), strict=False)
        self.optimizer.state = tree_unflatten(list(load_safetensors(folder / OPTIMIZER_FILE).items()))
        self.step = self.saved_step = int(state["step"])
        if folder != self.out:
            publish(
                folder, self.out, (ADAPTER_FILE, CONFIG_FILE)
            )  # if a crash came between pointer and publish
        self.history = [tuple(h) for h in state.get("history", [])]
        self.val_history = [tuple(h) for h in state.get("val_history", [])]
        self.seconds = float(state.get("seconds", 0.0))
        mx.eval(self.model.parameters(), self.optimizer.state)
        return self.step


class _DeferredInterrupt:
    """Within the block, a first Ctrl-C only sets ``requested``; a second one interrupts at once."""

    def __enter__(self) -> _DeferredInterrupt:
        self.requested, self.previous = False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
