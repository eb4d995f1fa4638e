"""Train the demo model from scratch and ship it as the embedded default (``mlx_dgemma/default_model/``).

    python scripts/train_demo.py [--out DIR] [--iters N] [--work DIR] [--resume]

1. A skeleton: the real DiffusionGemma architecture at a small size (5 sliding + 1 full layer, k=v full layer with
   proportional RoPE, dense MLP + 8 routed experts, self-conditioning), a byte-level BPE tokenizer trained on the
   task's text, the Gemma-style chat template (``make_default_model.py`` builds these with the reference,
   ``transformers``), well-conditioned random weights.
2. Training in MLX with ``mlx_dgemma.train`` (the block-diffusion objective, full training, router included) on
   the task of ``demo_task.py``: fill a JSON record from a sentence, seeded data, held-out test set never trained on.
3. The trained weights written back in the released HF layout (bf16), with the tokenizer, configs and a model card;
   the output folder is replaced atomically once everything is written.

Checkpoints go to ``--work`` every 100 steps; ``--resume`` continues an interrupted run at the same step.
Takes ~45 minutes on a 2-core x86 CPU (see the model card it writes for the measured figures).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import demo_task
import numpy as np

import mlx_dgemma  # noqa: F401 (first: on Linux it loads a fast BLAS before mlx)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "mlx_dgemma" / "default_model"
VOCAB_SIZE = 1024
# The skeleton's sizes (make_default_model.TEXT: hidden 128, 6 layers, 8 experts, all multiples of 64 so that the
# model quantizes with group size 64), with the task's vocabulary and a window the task exercises.
TEXT = {
    "vocab_size": VOCAB_SIZE,
    "sliding_window": 64,  # shorter than a prompt plus two canvases
    "max_position_embeddings": 1024,
}
TRAIN = {"batch_size": 32, "learning_rate": 2e-3, "warmup": 50, "weight_decay": 0.01}
VALID_SIZE, TEST_SIZE = 256, 500


def build_skeleton(folder: Path) -> None:
    """Tokenizer, chat template, configs and random weights in ``folder`` (HF released layout), via the reference."""
    import make_default_model as skeleton
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    text = {**skeleton.TEXT, **TEXT}
    corpus = demo_task.corpus() + skeleton.build_corpus(skeleton.SEED)[:1500]
    folder.mkdir(parents=True, exist_ok=True)
    skeleton.save_tokenizer(skeleton.train_tokenizer(corpus, VOCAB_SIZE), folder)
    model = skeleton.build_model(text, demo_task.CANVAS_LENGTH)
    model.save_pretrained(folder)
    skeleton.write_released_config(folder / "config.json")


def examples(items: list[demo_task.Item], tokenizer, eos: set[int]):
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


def exact_match(model, tokenizer, items: list[demo_task.Item], steps: int = 16) -> float:
    from mlx_dgemma import generate

    hits = sum(generate(model, tokenizer, it.prompt, max_tokens=128, max_denoising_steps=steps, seed=i).strip()
               == it.answer for i, it in enumerate(items))
    return hits / len(items)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the model folder to write ({DEFAULT_OUT})")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "demo", help="skeleton and checkpoints")
    parser.add_argument("--iters", type=int, default=400, help=f"optimizer steps (batch {TRAIN['batch_size']})")
    parser.add_argument("--train-size", type=int, default=demo_task.TRAIN_SIZE)
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint in --work")
    args = parser.parse_args()

    import mlx.core as mx

    from mlx_dgemma import load_model, load_tokenizer
    from mlx_dgemma.train.lora import adapter_config, prepare_full
    from mlx_dgemma.train.trainer import Progress, TrainConfig, Trainer

    start = time.perf_counter()
    skeleton, ckpt = args.work / "skeleton", args.work / "checkpoint"
    if not args.resume:
        shutil.rmtree(args.work, ignore_errors=True)
        build_skeleton(skeleton)
    model, tokenizer = load_model(skeleton, mx.float32), load_tokenizer(skeleton)
    eos = set(model.args.eos_token_id)
    train = examples(demo_task.split("train", args.train_size), tokenizer, eos)
    valid = examples(demo_task.split("valid", VALID_SIZE), tokenizer, eos)
    lengths = np.array([len(e.answer) for e in train])
    print(f"data: {len(train)} train / {len(valid)} valid examples; answers {lengths.min()}-{lengths.max()} tokens "
          f"(mean {lengths.mean():.1f}), prompts {np.mean([len(e.prompt) for e in train]):.1f} tokens "
          f"({time.perf_counter() - start:.0f}s)")

    prepare_full(model, train_router=True)
    cfg = TrainConfig(iters=args.iters, lr_schedule="cosine", val_every=250, val_batches=8, save_every=100,
                      report_every=25, seed=0, **TRAIN)
    trainer = Trainer(model, train, valid, ckpt, cfg, adapter_config("full", None, len(model.layers)),
                      fill_id=tokenizer.eos_token_id, progress=Progress(cfg.iters, sys.stdout, cfg.report_every))
    if args.resume:
        print(f"resuming at step {trainer.resume()}")
    result = trainer.run()
    train_seconds = sum(s.seconds for s in result.steps)

    model.eval()
    model.set_dtype(mx.bfloat16)  # what ships: measure that
    test = demo_task.split("test", 100)
    accuracy = exact_match(model, tokenizer, test)
    print(f"held-out exact match (100, bf16): {accuracy:.1%}")

    staging = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(skeleton, staging, ignore=shutil.ignore_patterns("*.safetensors", "README.md"))
    write_weights(model, skeleton, staging)
    history = trainer.history
    write_card(staging, history, trainer.val_history, train_seconds, result, accuracy, len(train))
    for file in staging.iterdir():
        file.chmod(0o644)
    shutil.rmtree(args.out, ignore_errors=True)
    staging.replace(args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"{args.out}: {size / 1e6:.1f} MB, {time.perf_counter() - start:.0f}s in all")
    return 0


def write_card(folder: Path, history, val_history, seconds: float, result, accuracy: float, n_train: int) -> None:
    def at(step: int) -> float:
        window = [loss for s, loss in history if step - 25 < s <= step]
        return sum(window) / len(window)

    steps = [s for s, _ in history]
    marks = sorted({25, *range(250, steps[-1] + 1, 250), steps[-1]}) if steps else []
    curve = ", ".join(f"{s}: {at(s):.3f}" for s in marks if s <= steps[-1])
    vals = ", ".join(f"{s}: {v:.3f}" for s, v in val_history)
    config = json.loads((folder / "config.json").read_text())["text_config"]
    card = f"""# mlx_dgemma demo model

A small DiffusionGemma (the architecture of `google/diffusiongemma-26B-A4B-it`: {config['num_hidden_layers']} layers,
5 sliding + 1 full attention, k=v full layer with proportional RoPE, dense MLP + {config['num_experts']} routed
experts (top {config['top_k_experts']}), self-conditioning; hidden {config['hidden_size']}, vocabulary
{config['vocab_size']}, canvas {demo_task.CANVAS_LENGTH} tokens) trained from scratch by `scripts/train_demo.py` on one
task: fill a JSON record from a sentence about a person.

    Fill the record: Meet Maya, 34, a pilot living in Oslo. Maya speaks Greek and Hindi.
    {{"name": "Maya", "age": 34, "city": "Oslo", "job": "pilot", "languages": ["Greek", "Hindi"]}}

It knows nothing else. It is the embedded default of `mlx_dgemma` so that every command runs offline, and the
target the bundled drafter was distilled from.

- Training: {result.step} steps of {TRAIN['batch_size']} examples ({n_train} distinct), AdamW, cosine
  learning rate from {TRAIN['learning_rate']}, block-diffusion objective of `mlx_dgemma.train`, {seconds / 60:.0f}
  minutes on a 2-core x86 CPU (MLX CPU backend, fp32).
- Training loss (mean of 25 steps): {curve}.
- Validation loss: {vals}.
- Held-out exact match (first 100 test records, bf16, 16 denoising steps): {accuracy:.0%}.
  `python scripts/eval_demo.py` measures the whole held-out set.
"""
    (folder / "README.md").write_text(card)


if __name__ == "__main__":
    sys.exit(main())
