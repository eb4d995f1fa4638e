"""Train the embedded default model from scratch (``mlx_dgemma/default_model/``: the long-answer demo model).

    python -m demo.train [--out DIR] [--work DIR] [--init MODEL] [--iters N] [--resume]

A two-stage curriculum:

1. A skeleton: the real DiffusionGemma architecture at a small size (5 sliding + 1 full layer, k=v full layer with
   proportional RoPE, dense MLP + 8 routed experts, self-conditioning), a byte-level BPE tokenizer trained on the
   task's text, the Gemma-style chat template (``demo.skeleton`` builds these with the reference,
   ``transformers``), well-conditioned random weights.
2. Stage 1 (``--stage1-iters``, 400): ``demo.task``'s record task (one person), 24-token canvases: the model
   learns the record's grammar and to copy values, cheaply. The tests' ``tests/fixtures/demo24`` (the embedded
   default before the long model) is this stage's model. ``--init MODEL`` skips it and starts stage 2 from such a
   model (or from a stage 2 model, to train it further).
3. Stage 2 (``--iters``): ``demo.task``'s long task (one to four people, answers of 32-168 tokens) at 128-token
   canvases, with a sliding window longer than the canvas (as the released model's 1024 over 256). Both stages are
   ``mlx_dgemma.train`` (the block-diffusion objective, full training, router included, batches grouped by
   length), seeded data, the held-out test set never trained on.
4. The trained weights written back in the released HF layout (bf16), with the tokenizer, configs, the sampler
   settings the model ships with (``GENERATION``) and a model card; the output folder is replaced atomically once
   everything is written (without a drafter: ``python -m demo.train_drafter --model DIR`` distils one for it).

Why 128 and not the released 256: at 256 every answer is one canvas decoded in parallel, and 400 steps of stage 2
(90 minutes here) left the model exact on none of 20 held-out several-person answers (24% of their records right,
validation loss 0.55): a 130-token answer denoised at once needs per-token accuracy near 99.9%. At 128 a long answer
is two canvases, the second conditioned on the committed first; the step is cheaper too. Answers still end
mid-canvas with an EOS tail, and a canvas still takes many passes, which is what fast decoding and the drafter are
measured on.

Stage 2 checkpoints go to ``--work`` every 50 steps; ``--resume`` continues an interrupted stage 2 at the same step
(with a smaller ``--iters`` than the run had, it writes the model from the last checkpoint without training).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import mlx_dgemma  # noqa: F401 (first: on Linux it loads a fast BLAS before mlx)
from demo import task

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "mlx_dgemma" / "default_model"
VOCAB_SIZE = 1024
# The skeleton's sizes (demo.skeleton.TEXT: hidden 128, 6 layers, 8 experts, all multiples of 64 so that the
# model quantizes with group size 64), with the task's vocabulary.
TEXT = {"vocab_size": VOCAB_SIZE, "sliding_window": 64, "max_position_embeddings": 1024}
STAGE1 = {"batch_size": 32, "learning_rate": 2e-3, "warmup": 50, "weight_decay": 0.01}
STAGE1_CANVAS = 24
# Stage 2: 128-token canvases (see the docstring), and a window longer than them (the released model: 1024 over 256),
# so that a canvas sees the whole of a four-person prompt through every layer, not through the full layer alone.
STAGE2_CONFIG = {"canvas_length": task.LONG_CANVAS_LENGTH, "sliding_window": 512}
STAGE2 = {"batch_size": 16, "learning_rate": 1e-3, "warmup": 20, "weight_decay": 0.01}
# The encoder's next-token loss on answers only: the prompts' random names and numbers cannot be predicted, and
# their loss (~0.42 of the ~0.48 total at step 1000) only drowned the answer's.
STAGE2_OBJECTIVE = {"mask_prompt": True}
VALID_SIZE, TEST_N = 256, 100  # validation records; held-out records whose exact match the card reports
# The reference sampler's settings this model ships with (generation_config.json), chosen on the validation split
# (first 60 records, demo.eval's evaluate): with the released model's (temperature 0.8 -> 0.4, entropy bound 0.1) it
# accepts ~27 tokens a pass and commits misaligned ones ("bakerbaker", a dropped quote): 73% at 4.8 passes a
# canvas. Hotter and stricter, it takes 13.9 passes, as the released model does on real tasks (12-16): 90%.
# (Entropy bound 0.003 alone: 85% at 6.4; temperature 1.0 -> 0.6 alone: 87% at 6.2; 1.3 -> 0.8: 92% at 27.)
GENERATION = {"t_max": 1.0, "t_min": 0.6, "max_denoising_steps": 96, "entropy_bound": 0.01}


def build_skeleton(folder: Path) -> None:
    """Tokenizer, chat template, configs and random weights in ``folder`` (HF released layout), via the reference."""
    from transformers.utils import logging as hf_logging

    from demo import skeleton  # torch and the reference: only to build a skeleton

    hf_logging.set_verbosity_error()
    text = {**skeleton.TEXT, **TEXT}
    corpus = task.corpus() + skeleton.build_corpus(skeleton.SEED)[:1500]
    folder.mkdir(parents=True, exist_ok=True)
    skeleton.save_tokenizer(skeleton.train_tokenizer(corpus, VOCAB_SIZE), folder)
    model = skeleton.build_model(text, STAGE1_CANVAS)
    model.save_pretrained(folder)
    skeleton.write_released_config(folder / "config.json")


def examples(items: list[task.Item], tokenizer, eos: set[int]):
    from mlx_dgemma.train.data import encode_record

    return [encode_record({"prompt": it.prompt, "completion": it.answer}, tokenizer, eos) for it in items]


def hf_names(folder: Path, model) -> dict[str, str]:
    """Our parameter name → the key the HF checkpoint in ``folder`` stores it under (``sanitize`` only renames)."""
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "np") as f:
        keys = list(f.keys())
    return model.sanitize({k: k for k in keys})


def write_weights(model, skeleton: Path, out: Path) -> None:
    """The trained weights under the skeleton's HF keys, in bf16; vision weights kept from the skeleton."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    names = hf_names(skeleton, model)
    weights = {}
    for ours, value in tree_flatten(model.parameters()):
        weights[names[ours]] = value.astype(mx.bfloat16)
    for key, value in mx.load(str(skeleton / "model.safetensors")).items():
        weights.setdefault(key, value)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})


def exact_match(model, tokenizer, items: list[task.Item]) -> float:
    """Exact match with the sampler settings the model ships with (``GENERATION``), seed ``i`` for item ``i``."""
    from mlx_dgemma import generate

    length = task.max_tokens(model.args.canvas_length)
    hits = sum(
        generate(model, tokenizer, it.prompt, max_tokens=length, drafter="none", seed=i).strip() == it.answer
        for i, it in enumerate(items)
    )
    return hits / len(items)


def set_generation(folder: Path, values: dict) -> None:
    """Write sampler ``values`` into ``folder``'s generation_config.json (``entropy_bound`` in its ``sampler_config``)."""
    path = folder / "generation_config.json"
    config = json.loads(path.read_text())
    for key, value in values.items():
        (config["sampler_config"] if key == "entropy_bound" else config)[key] = value
    path.write_text(json.dumps(config, indent=2) + "\n")


def set_config(folder: Path, values: dict) -> None:
    """Write ``values`` into ``folder``'s config.json (``canvas_length`` at the top, the rest in ``text_config``)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in values.items():
        (config if key == "canvas_length" else config["text_config"])[key] = value
    path.write_text(json.dumps(config, indent=2) + "\n")


def train(
    folder: Path,
    items,
    valid_items,
    work: Path,
    iters: int,
    hyper: dict,
    resume: bool = False,
    objective: dict | None = None,
):
    """Train the model in ``folder`` on ``items``; returns ``(model, tokenizer, trainer, result)``."""
    import mlx.core as mx

    from mlx_dgemma import load_model, load_tokenizer
    from mlx_dgemma.train.lora import adapter_config, prepare_full
    from mlx_dgemma.train.objective import ObjectiveConfig
    from mlx_dgemma.train.trainer import Progress, TrainConfig, Trainer

    model, tokenizer = load_model(folder, mx.float32), load_tokenizer(folder)
    eos = set(model.args.eos_token_id)
    train_set, valid = examples(items, tokenizer, eos), examples(valid_items, tokenizer, eos)
    lengths = np.array([len(e.answer) for e in train_set])
    print(
        f"{folder.name}: canvas {model.args.canvas_length}, {len(train_set)} train / {len(valid)} valid examples; "
        f"answers {lengths.min()}-{lengths.max()} tokens (mean {lengths.mean():.1f}), prompts "
        f"{np.mean([len(e.prompt) for e in train_set]):.1f} tokens",
        flush=True,
    )
    prepare_full(model, train_router=True)
    cfg = TrainConfig(
        iters=iters,
        lr_schedule="cosine",
        val_every=100,
        val_batches=8,
        save_every=50,
        report_every=10,
        seed=0,
        group_by_length=True,
        objective=ObjectiveConfig(**(objective or {})),
        **hyper,
    )
    trainer = Trainer(
        model,
        train_set,
        valid,
        work,
        cfg,
        adapter_config("full", None, len(model.layers)),
        fill_id=tokenizer.eos_token_id,
        progress=Progress(cfg.iters, sys.stdout, cfg.report_every),
    )
    if resume:
        print(f"resuming at step {trainer.resume()}")
    result = trainer.run()
    model.eval()
    return model, tokenizer, trainer, result


def save_model(model, skeleton: Path, out: Path) -> None:
    """``skeleton``'s tokenizer and configs with ``model``'s weights (bf16) in ``out``, replaced atomically."""
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(skeleton, staging, ignore=shutil.ignore_patterns("*.safetensors", "README.md", "drafter"))
    write_weights(model, skeleton, staging)
    for file in staging.iterdir():
        if file.is_file():
            file.chmod(0o644)
    shutil.rmtree(out, ignore_errors=True)
    staging.replace(out)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"the model folder to write ({DEFAULT_OUT})"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "demo", help="skeleton and checkpoints")
    parser.add_argument(
        "--init", type=Path, help="skip stage 1: start stage 2 from this model (its tokenizer too)"
    )
    parser.add_argument("--stage1-iters", type=int, default=400, help=f"batch {STAGE1['batch_size']}")
    parser.add_argument(
        "--iters", type=int, default=400, help=f"stage 2 steps (batch {STAGE2['batch_size']})"
    )
    parser.add_argument("--train-size", type=int, default=task.TRAIN_SIZE)
    parser.add_argument(
        "--valid-size", type=int, default=VALID_SIZE, help=f"validation records ({VALID_SIZE})"
    )
    parser.add_argument(
        "--test-n", type=int, default=TEST_N, help=f"held-out records of the final exact match ({TEST_N})"
    )
    parser.add_argument("--resume", action="store_true", help="continue stage 2's checkpoint in --work")
    parser.add_argument(
        "--lr",
        type=float,
        default=STAGE2["learning_rate"],
        help=f"stage 2's peak learning rate ({STAGE2['learning_rate']}; lower to continue a model)",
    )
    args = parser.parse_args()
    if not args.lr > 0:
        parser.error(f"--lr must be above 0, got {args.lr}")
    for name in ("train_size", "valid_size", "test_n"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    hyper = {**STAGE2, "learning_rate": args.lr}

    import mlx.core as mx

    start = time.perf_counter()
    stage1, stage2 = args.work / "stage1", args.work / "stage2"
    if not args.resume:
        shutil.rmtree(args.work, ignore_errors=True)
        if args.init is not None:
            shutil.copytree(args.init, stage1, ignore=shutil.ignore_patterns("drafter"))
            stage1_note = f"stage 1 skipped: started from {args.init}"
        else:
            build_skeleton(args.work / "skeleton")
            model, _, _, result = train(
                args.work / "skeleton",
                task.split("train", args.train_size),
                task.split("valid", args.valid_size),
                args.work / "checkpoint1",
                args.stage1_iters,
                STAGE1,
            )
            save_model(model, args.work / "skeleton", stage1)
            stage1_note = (
                f"stage 1: {result.step} steps of {STAGE1['batch_size']}, one person, "
                f"{STAGE1_CANVAS}-token canvases, {sum(s.seconds for s in result.steps) / 60:.0f} minutes"
            )
        shutil.copytree(stage1, stage2)
        set_config(stage2, STAGE2_CONFIG)
        set_generation(stage2, GENERATION)
        (args.work / "stage1.txt").write_text(stage1_note)
    stage1_note = (args.work / "stage1.txt").read_text()
    print(stage1_note, flush=True)

    model, tokenizer, trainer, result = train(
        stage2,
        task.split("train", args.train_size, long=True),
        task.split("valid", args.valid_size, long=True),
        args.work / "checkpoint",
        args.iters,
        hyper,
        args.resume,
        STAGE2_OBJECTIVE,
    )
    train_seconds = trainer.seconds  # a resumed run's earlier steps included
    # What ships is bf16: round the weights to it. On a CPU the rounded weights are evaluated in fp32 (bf16
    # matmuls are ~10x slower there); a Mac runs them in bf16.
    model.set_dtype(mx.bfloat16)
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)
    accuracy = exact_match(model, tokenizer, task.split("test", args.test_n, long=True))
    print(f"held-out exact match ({args.test_n}, bf16): {accuracy:.1%}")

    save_model(model, stage2, args.out)
    write_card(
        args.out,
        trainer.history,
        trainer.val_history,
        train_seconds,
        result,
        (accuracy, args.test_n),
        args.train_size,
        stage1_note,
        hyper,
    )
    (args.out / "README.md").chmod(0o644)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"{args.out}: {size / 1e6:.1f} MB, {time.perf_counter() - start:.0f}s in all")
    return 0


def write_card(
    folder: Path,
    history,
    val_history,
    seconds: float,
    result,
    exact: tuple[float, int],
    n_train: int,
    stage1: str,
    hyper: dict,
) -> None:
    def at(step: int) -> float:
        window = [loss for s, loss in history if step - 10 < s <= step]
        return sum(window) / len(window)

    steps = [s for s, _ in history]
    marks = sorted({10, *range(100, steps[-1] + 1, 100), steps[-1]}) if steps else []
    curve = ", ".join(f"{s}: {at(s):.3f}" for s in marks if s <= steps[-1])
    vals = ", ".join(f"{s}: {v:.3f}" for s, v in val_history)
    accuracy, n_test = exact
    config = json.loads((folder / "config.json").read_text())
    text = config["text_config"]
    gen = json.loads((folder / "generation_config.json").read_text())
    card = f"""# mlx_dgemma demo model

A small DiffusionGemma (the architecture of `google/diffusiongemma-26B-A4B-it`: {text["num_hidden_layers"]} layers,
5 sliding + 1 full attention, k=v full layer with proportional RoPE, dense MLP + {text["num_experts"]} routed
experts (top {text["top_k_experts"]}), self-conditioning; hidden {text["hidden_size"]}, vocabulary
{text["vocab_size"]}, sliding window {text["sliding_window"]}, canvas {config["canvas_length"]} tokens; the released
model's is 256, see `demo/train.py`)
trained from scratch by `python -m demo.train` on one task: fill JSON records from sentences about one to four
people (one record, or a list of them; answers of 32-168 tokens, one or two canvases).

    Fill the record: Meet Maya, 34, a pilot living in Oslo. Maya speaks Greek and Hindi.
    {{"name": "Maya", "age": 34, "city": "Oslo", "job": "pilot", "languages": ["Greek", "Hindi"]}}

It knows nothing else. It is the embedded default of `mlx_dgemma` (`mlx_dgemma/default_model`);
`python -m demo.train_drafter --from-data` distils its drafter. Its `generation_config.json` keeps the reference
sampler and sets its temperature from {gen["t_max"]} to {gen["t_min"]}, an entropy bound of
{gen["sampler_config"]["entropy_bound"]} and at most {gen["max_denoising_steps"]} passes a canvas (the released
model's: 0.8 to 0.4, 0.1 and 48; `demo/train.py`'s `GENERATION` says why).

- Curriculum: {stage1}.
- Stage 2: {result.step} steps of {hyper["batch_size"]} examples (from {n_train} distinct), AdamW, cosine
  learning rate from {hyper["learning_rate"]}, block-diffusion objective of `mlx_dgemma.train`, canvas
  {config["canvas_length"]}, {seconds / 60:.0f} minutes on a 2-core x86 CPU (MLX CPU backend, fp32).
- Training loss (mean of 10 steps): {curve}.
- Validation loss: {vals}.
- Held-out exact match (first {n_test} test items, bf16 weights, its sampler settings): {accuracy:.0%}.
  `python -m demo.eval` measures the whole held-out set.
"""
    (folder / "README.md").write_text(card)


if __name__ == "__main__":
    sys.exit(main())
