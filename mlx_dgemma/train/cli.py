"""``mlx_dgemma.train``: LoRA (default) or full fine-tuning of DiffusionGemma on JSONL data, with the model's own
block-diffusion objective; resumable checkpoints; ``--fuse`` to write a plain model folder.

``python -m mlx_dgemma.train`` works too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .._cli import run_cli
from ..errors import DGemmaError

DESCRIPTION = """Fine-tune DiffusionGemma with its block-diffusion objective (corrupted answer canvases denoised by the
decoder, self-conditioning, plus the encoder's next-token loss). LoRA by default, QLoRA on a quantized model.
Data: a folder with train.jsonl [and valid.jsonl], or one .jsonl file; each line {"messages": [...]} or
{"prompt": ..., "completion": ...}. With --fuse and no --data, fuses the adapters already in --out."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_dgemma.train", description=DESCRIPTION)
    p.add_argument("--model", help="model folder or Hugging Face repo id (default: the embedded model)")
    p.add_argument("--data", help="folder with train.jsonl [valid.jsonl], or a .jsonl file")
    p.add_argument("--out", default="adapters", help="adapter / checkpoint folder (default: adapters)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--lora", dest="full", action="store_false", help="train LoRA adapters (default)")
    mode.add_argument("--full", dest="full", action="store_true", help="train every weight (unquantized models)")
    p.set_defaults(full=False)
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    lora.add_argument("--alpha", type=float, help="LoRA alpha; scale = alpha / rank (default 2 x rank)")
    lora.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    lora.add_argument("--lora-layers", default="all", help="adapt the last N layers, or 'all' (default)")
    lora.add_argument("--lora-targets", default="attn,mlp",
                      help="comma list of attn, mlp, experts, self_conditioning (default attn,mlp)")
    loop = p.add_argument_group("training loop")
    loop.add_argument("--iters", type=int, default=100, help="optimizer steps (default 100)")
    loop.add_argument("--batch-size", type=int, default=1, help="examples per micro-batch (default 1)")
    loop.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    loop.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    loop.add_argument("--optimizer", choices=["adamw", "adam", "sgd"], default="adamw")
    loop.add_argument("--weight-decay", type=float, default=0.0, help="weight decay for adamw / sgd (default 0)")
    loop.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                      help="cosine decays to a tenth of --lr (default constant)")
    loop.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    loop.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off; default 1)")
    loop.add_argument("--val-every", type=int, default=50, help="validate every N steps (0: only at the end)")
    loop.add_argument("--val-batches", type=int, default=8, help="validation batches (default 8)")
    loop.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    loop.add_argument("--report-every", type=int, default=10, help="progress line every N steps when piped")
    loop.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    loop.add_argument("--seed", type=int, default=0, help="seed of data order, noise and LoRA init (default 0)")
    loop.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                      help="weights' dtype while training (auto: float32 on CPU, as stored on GPU)")
    obj = p.add_argument_group("objective")
    obj.add_argument("--encoder-loss-weight", type=float, default=1.0,
                     help="weight of the encoder's next-token loss (default 1.0)")
    obj.add_argument("--self-conditioning-p", type=float, default=0.5,
                     help="probability of a self-conditioned example (default 0.5)")
    obj.add_argument("--eps", type=float, default=1e-3, help="minimum corruption level t (default 0.001)")
    obj.add_argument("--train-router", action="store_true", help="with --full, train the MoE router too")
    out = p.add_argument_group("fusing")
    out.add_argument("--fuse", action="store_true", help="merge the adapters into a plain model folder")
    out.add_argument("--fused-out", help="where --fuse writes the model (default: OUT_fused)")
    out.add_argument("--fused-dtype", choices=["base", "float32", "bfloat16", "float16"], default="base",
                     help="dtype of the fused weights (default: the base checkpoint's)")
    out.add_argument("--dequantize", action="store_true",
                     help="write the fused model unquantized (fusing into a quantized base re-rounds it)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from ..loader import DEFAULT_MODEL, load_model, load_tokenizer, resolve
    from .lora import load_adapters, save_fused

    folder = resolve(args.model if args.model else DEFAULT_MODEL)
    dtype = _dtype(args.dtype)
    model, tokenizer = load_model(folder, dtype), load_tokenizer(folder)
    out = Path(args.out)
    fused_out = Path(args.fused_out) if args.fused_out else out.with_name(out.name + "_fused")
    if args.data is None:
        if not args.fuse:
            raise _usage("give --data to train (or --fuse to fuse the adapters already in --out)")
        save_fused(load_adapters(model, out), folder, fused_out, _fused_dtype(args.fused_dtype, folder),
                   args.dequantize)
        print(f"fused {out} into {folder.name}: {fused_out}")
        return 0
    mx.random.seed(args.seed)  # the LoRA initialisation
    trainer = _trainer(args, model, tokenizer, folder, out)
    if args.resume:
        print(f"resuming {out} at step {trainer.resume()}")
    result = trainer.run()
    if result.steps:
        last = result.steps[-1]
        print(f"done: step {result.step}, loss {last.loss:.4f}, {result.tokens_per_second:,.0f} tok/s; "
              f"adapters in {out}")
    if args.fuse:
        save_fused(model, folder, fused_out, _fused_dtype(args.fused_dtype, folder), args.dequantize)
        print(f"fused model: {fused_out}")
    return 0


def _trainer(args: argparse.Namespace, model: Any, tokenizer: Any, folder: Path, out: Path):
    """Data, trainable weights and the trainer, as the flags say; prints what it is about to do."""
    from mlx.utils import tree_flatten

    from ..generation import eos_ids
    from .data import data_files, load_jsonl
    from .trainer import Progress, Trainer

    a = model.args
    eos = eos_ids(model, tokenizer)
    train_file, valid_file = data_files(args.data)
    train_set = load_jsonl(train_file, tokenizer, eos, a.max_position_embeddings, a.canvas_length)
    valid_set = load_jsonl(valid_file, tokenizer, eos, a.max_position_embeddings, a.canvas_length) if valid_file else []
    config = _make_trainable(args, model, base_model=str(folder))
    cfg = _train_config(args)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"model {folder}: {'full' if args.full else 'LoRA'} fine-tuning, {trainable:,} trainable of {total:,} "
          f"stored parameters; {len(train_set)} training / {len(valid_set)} validation examples")
    fill = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else a.eos_token_id[0]
    progress = Progress(cfg.iters, sys.stdout, cfg.report_every)
    return Trainer(model, train_set, valid_set, out, cfg, config, fill, progress)


def _make_trainable(args: argparse.Namespace, model: Any, **extra: Any) -> dict[str, Any]:
    """Apply LoRA (or unfreeze for --full) as the flags say; returns the adapter config to save."""
    from .lora import LoRAConfig, adapter_config, apply_lora, prepare_full

    if args.full:
        prepare_full(model, train_router=args.train_router)
        return adapter_config("full", None, len(model.layers), **extra)
    layers = None if args.lora_layers == "all" else _positive(args.lora_layers, "--lora-layers")
    lora = LoRAConfig(rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                      dropout=args.dropout, num_layers=layers,
                      targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()))
    apply_lora(model, lora)
    return adapter_config("lora", lora, len(model.layers), **extra)


def _train_config(args: argparse.Namespace):
    from .objective import ObjectiveConfig
    from .trainer import TrainConfig

    return TrainConfig(
        iters=args.iters, batch_size=args.batch_size, grad_accum=args.grad_accum, learning_rate=args.lr,
        optimizer=args.optimizer, weight_decay=args.weight_decay, lr_schedule=args.lr_schedule, warmup=args.warmup,
        grad_clip=args.grad_clip or None, val_every=args.val_every, val_batches=args.val_batches,
        save_every=args.save_every, report_every=args.report_every, seed=args.seed,
        objective=ObjectiveConfig(eps=args.eps, self_conditioning_p=args.self_conditioning_p,
                                  encoder_loss_weight=args.encoder_loss_weight),
    )


def _dtype(name: str):
    import mlx.core as mx

    if name == "auto":
        return mx.float32 if mx.default_device() == mx.cpu else None
    return getattr(mx, name)


def _fused_dtype(name: str, folder: Path):
    import mlx.core as mx

    from .lora import stored_dtype

    return stored_dtype(folder) if name == "base" else getattr(mx, name)


def _positive(text: str, flag: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise _usage(f"{flag} must be 'all' or a positive integer (got {text!r})")
    return int(text)


def _usage(message: str) -> DGemmaError:
    from .errors import TrainError

    return TrainError(message)
