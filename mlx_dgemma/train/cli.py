"""``mlx_dgemma.train``: LoRA (default) or full fine-tuning of DiffusionGemma on JSONL data, with the model's own
block-diffusion objective; resumable checkpoints; ``--fuse`` to write a plain model folder.

``python -m mlx_dgemma.train`` works too.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from mlx_dgemma.cli.shared import run_cli
from mlx_dgemma.errors import DGemmaError

DESCRIPTION = """Fine-tune DiffusionGemma with its block-diffusion objective (corrupted answer canvases denoised by the
decoder, self-conditioning, plus the encoder's next-token loss). LoRA by default, QLoRA on a quantized model.
Data: a folder with train.jsonl [valid.jsonl, test.jsonl], or one .jsonl file; each line {"messages": [...]} or
{"prompt": ..., "completion": ...}. With --fuse and no --data, fuses the adapters already in --out.
mlx-lm lora's flag names work too (--adapter-path, --learning-rate, --num-layers, --fine-tune-type,
--grad-accumulation-steps, --steps-per-report, --steps-per-eval, --train, --test, -c config.yaml)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_dgemma.train", description=DESCRIPTION, allow_abbrev=False)
    p.add_argument(
        "-c",
        "--config",
        help="a YAML file of options (mlx-lm lora's keys, or these flags' names); "
        "flags given here override it",
    )
    p.add_argument("--model", help="model folder or Hugging Face repo id (default: the embedded model)")
    p.add_argument("--data", help="folder with train.jsonl [valid.jsonl, test.jsonl], or a .jsonl file")
    p.add_argument(
        "--out", "--adapter-path", default="adapters", help="adapter / checkpoint folder (default: adapters)"
    )
    p.add_argument("--train", action="store_true", help="train (the default with --data; mlx-lm's flag)")
    p.add_argument(
        "--test",
        action="store_true",
        help="report the loss and perplexity on DATA/test.jsonl after "
        "training; without --train, of the adapters already in --out",
    )
    p.add_argument(
        "--test-batches", type=int, default=500, help="test batches (-1: the whole set; default 500)"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--lora",
        dest="fine_tune_type",
        action="store_const",
        const="lora",
        help="train LoRA adapters (default)",
    )
    mode.add_argument(
        "--full",
        dest="fine_tune_type",
        action="store_const",
        const="full",
        help="train every weight (unquantized models)",
    )
    mode.add_argument(
        "--fine-tune-type",
        choices=["lora", "dora", "full"],
        help="lora or full (mlx-lm's flag; dora is not supported)",
    )
    p.set_defaults(fine_tune_type="lora")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    lora.add_argument("--alpha", type=float, help="LoRA alpha; scale = alpha / rank (default 2 x rank)")
    lora.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout, in [0, 1) (default 0)")
    lora.add_argument(
        "--lora-layers",
        "--num-layers",
        type=_layers,
        default="all",
        help="adapt the last N layers, or 'all' / -1 (default all)",
    )
    lora.add_argument(
        "--lora-targets",
        default="attn,mlp",
        help="comma list of attn, mlp, experts, self_conditioning (default attn,mlp)",
    )
    loop = p.add_argument_group("training loop")
    loop.add_argument("--iters", type=int, default=100, help="optimizer steps (default 100)")
    loop.add_argument("--batch-size", type=int, default=1, help="examples per micro-batch (default 1)")
    loop.add_argument(
        "--grad-accum",
        "--grad-accumulation-steps",
        type=int,
        default=1,
        help="micro-batches per optimizer step (default 1)",
    )
    loop.add_argument(
        "--lr", "--learning-rate", type=float, default=1e-4, help="learning rate (default 1e-4)"
    )
    loop.add_argument("--optimizer", choices=["adamw", "adam", "sgd"], default="adamw")
    loop.add_argument(
        "--weight-decay", type=float, default=0.0, help="weight decay for adamw / sgd (default 0)"
    )
    loop.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine"],
        default="constant",
        help="cosine decays to a tenth of --lr (default constant)",
    )
    loop.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    loop.add_argument(
        "--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off; default 1)"
    )
    loop.add_argument(
        "--grad-checkpoint",
        action="store_true",
        help="recompute activations in the backward pass: less memory, slower steps",
    )
    loop.add_argument(
        "--group-by-length",
        action="store_true",
        help="batch examples of similar length (mlx-lm's order): less padding, faster steps",
    )
    loop.add_argument(
        "--val-every",
        "--steps-per-eval",
        type=int,
        default=50,
        help="validate every N steps (0: only at the end)",
    )
    loop.add_argument("--val-batches", type=int, default=8, help="validation batches (-1: all; default 8)")
    loop.add_argument(
        "--save-every", type=int, default=100, help="checkpoint every N steps (0: only at the end)"
    )
    loop.add_argument(
        "--report-every",
        "--steps-per-report",
        type=int,
        default=10,
        help="progress line every N steps when piped",
    )
    loop.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    loop.add_argument(
        "--seed", type=int, default=0, help="seed of data order, noise and LoRA init (default 0)"
    )
    loop.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="weights' dtype while training (auto: float32 on CPU, as stored on GPU)",
    )
    obj = p.add_argument_group("objective")
    obj.add_argument(
        "--encoder-loss-weight",
        type=float,
        default=1.0,
        help="weight of the encoder's next-token loss (default 1.0)",
    )
    obj.add_argument(
        "--mask-prompt",
        action="store_true",
        help="the encoder's next-token loss on the answer only, not the prompt (mlx-lm's flag)",
    )
    obj.add_argument(
        "--self-conditioning-p",
        type=float,
        default=0.5,
        help="probability of a self-conditioned example (default 0.5)",
    )
    obj.add_argument("--eps", type=float, default=1e-3, help="minimum corruption level t (default 0.001)")
    obj.add_argument("--train-router", action="store_true", help="with --full, train the MoE router too")
    out = p.add_argument_group("fusing")
    out.add_argument("--fuse", action="store_true", help="merge the adapters into a plain model folder")
    out.add_argument("--fused-out", help="where --fuse writes the model (default: OUT_fused)")
    out.add_argument(
        "--hf-layout",
        action="store_true",
        help="--fuse writes the original Hugging Face layout (transformers, vLLM), unquantized",
    )
    out.add_argument(
        "--fused-dtype",
        choices=["base", "float32", "bfloat16", "float16"],
        default="base",
        help="dtype of the fused weights (default: the base checkpoint's)",
    )
    out.add_argument(
        "--dequantize",
        action="store_true",
        help="write the fused model unquantized (fusing into a quantized base re-rounds it)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, over the defaults of ``-c config.yaml`` when given (flags win, as in mlx-lm)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        from mlx_dgemma.train.config_file import read_config_file

        parser.set_defaults(**read_config_file(args.config, parser))
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: run(parse_args(argv)))


def run(args: argparse.Namespace) -> int:
    import mlx.core as mx

    from mlx_dgemma.model.loader import DEFAULT_MODEL, load_model, load_tokenizer, resolve
    from mlx_dgemma.train.lora import load_adapters

    check_args(args)
    cfg = _train_config(args)  # before the model loads: bad numbers fail at once
    lora = None if args.fine_tune_type == "full" else _lora_config(args)
    folder = resolve(args.model if args.model else DEFAULT_MODEL)
    dtype = _dtype(args.dtype)
    model, tokenizer = load_model(folder, dtype), load_tokenizer(folder)
    out = Path(args.out)
    fused_out = Path(args.fused_out) if args.fused_out else out.with_name(out.name + "_fused")
    if args.data is None or (args.test and not args.train):
        if args.data is None and not args.fuse:
            raise _usage("give --data to train (or --fuse to fuse the adapters already in --out)")
        if args.out:  # mlx-lm: an empty --adapter-path tests the base model
            load_adapters(model, out)
        if args.test:
            _test(args, model, tokenizer, out, cfg)
        if args.fuse:
            _fuse(args, model, folder, fused_out)
            print(f"fused {out} into {folder.name}: {fused_out}")
        return 0
    mx.random.seed(args.seed)  # the LoRA initialisation
    trainer = _trainer(args, model, tokenizer, folder, out, cfg, lora)
    if args.resume:
        print(f"resuming {out} at step {trainer.resume()}")
    result = trainer.run()
    if result.steps:
        last = result.steps[-1]
        print(
            f"done: step {result.step}, loss {last.loss:.4f}, {result.tokens_per_second:,.0f} tok/s; "
            f"adapters in {out}"
        )
    if args.test:
        _test(args, model, tokenizer, out, cfg)
    if args.fuse:
        _fuse(args, model, folder, fused_out)
        print(f"fused model: {fused_out}")
    return 0


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for flags no config class checks (the numbers are checked by the configs)."""
    if args.fine_tune_type == "dora":
        raise _usage("--fine-tune-type dora is not supported: use lora (the default) or full")
    if args.fine_tune_type == "full" and args.lora_layers != "all":
        raise _usage("--num-layers / --lora-layers apply to LoRA only: --full trains every layer")
    if args.test and not args.data:
        raise _usage("--test needs --data (a folder with test.jsonl)")
    if args.test:
        from mlx_dgemma.train.data import test_file

        test_file(args.data)
    if args.test_batches == 0 or args.test_batches < -1:
        raise _usage(f"--test-batches must be a positive number or -1 for all (got {args.test_batches})")
    if args.resume and args.test and not args.train:
        raise _usage("--resume continues training: add --train, or drop --resume to only --test")


def _test(args: argparse.Namespace, model: Any, tokenizer: Any, out: Path, cfg: Any) -> None:
    """mlx-lm's ``--test``: the loss on ``test.jsonl`` (the objective with fixed noise) and its exponential."""
    from mlx_dgemma.request import eos_ids
    from mlx_dgemma.train.data import load_jsonl, test_file
    from mlx_dgemma.train.trainer import Trainer

    a = model.args
    examples = load_jsonl(
        test_file(args.data), tokenizer, eos_ids(model, tokenizer), a.max_position_embeddings, a.canvas_length
    )
    evaluator = Trainer(model, examples, None, out, cfg, {}, _fill_id(model, tokenizer))
    loss = evaluator.evaluate(examples, None if args.test_batches == -1 else args.test_batches)
    ppl = math.exp(loss) if loss < 700 else math.inf
    print(f"Test loss {loss:.3f}, Test ppl {ppl:.3f}.")


def _trainer(
    args: argparse.Namespace, model: Any, tokenizer: Any, folder: Path, out: Path, cfg: Any, lora: Any
):
    """Data, trainable weights and the trainer, as the flags say; prints what it is about to do."""
    from mlx_dgemma.model.arrays import flatten
    from mlx_dgemma.request import eos_ids
    from mlx_dgemma.train.data import data_files, load_jsonl
    from mlx_dgemma.train.trainer import Progress, Trainer

    a = model.args
    eos = eos_ids(model, tokenizer)
    train_file, valid_file = data_files(args.data)
    train_set = load_jsonl(train_file, tokenizer, eos, a.max_position_embeddings, a.canvas_length)
    valid_set = (
        load_jsonl(valid_file, tokenizer, eos, a.max_position_embeddings, a.canvas_length)
        if valid_file
        else []
    )
    config = _make_trainable(args, model, lora, base_model=str(folder))
    trainable = sum(v.size for _, v in flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in flatten(model.parameters()))
    print(
        f"model {folder}: {args.fine_tune_type if args.fine_tune_type == 'full' else 'LoRA'} fine-tuning, "
        f"{trainable:,} trainable of {total:,} stored parameters; {len(train_set)} training / "
        f"{len(valid_set)} validation examples"
    )
    progress = Progress(cfg.iters, sys.stdout, cfg.report_every)
    return Trainer(model, train_set, valid_set, out, cfg, config, _fill_id(model, tokenizer), progress)


def _fill_id(model: Any, tokenizer: Any) -> int:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.args.eos_token_id[0]


def _make_trainable(args: argparse.Namespace, model: Any, lora: Any, **extra: Any) -> dict[str, Any]:
    """Apply LoRA (or unfreeze for --full) as the flags say; returns the adapter config to save."""
    from mlx_dgemma.train.lora import adapter_config, apply_lora, prepare_full

    if lora is None:
        prepare_full(model, train_router=args.train_router)
        return adapter_config("full", None, len(model.layers), **extra)
    apply_lora(model, lora)
    return adapter_config("lora", lora, len(model.layers), **extra)


def _lora_config(args: argparse.Namespace):
    from mlx_dgemma.train.lora import LoRAConfig

    layers = None if args.lora_layers == "all" else int(args.lora_layers)
    return LoRAConfig(
        rank=args.rank,
        alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
        dropout=args.dropout,
        num_layers=layers,
        targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
    )


def _train_config(args: argparse.Namespace):
    from mlx_dgemma.train.objective import ObjectiveConfig
    from mlx_dgemma.train.trainer import TrainConfig

    return TrainConfig(
        iters=args.iters,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        learning_rate=args.lr,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule,
        warmup=args.warmup,
        grad_clip=args.grad_clip or None,
        val_every=args.val_every,
        val_batches=args.val_batches,
        save_every=args.save_every,
        report_every=args.report_every,
        seed=args.seed,
        objective=ObjectiveConfig(
            eps=args.eps,
            self_conditioning_p=args.self_conditioning_p,
            encoder_loss_weight=args.encoder_loss_weight,
            mask_prompt=args.mask_prompt,
        ),
        grad_checkpoint=args.grad_checkpoint,
        group_by_length=args.group_by_length,
    )


def _dtype(name: str):
    import mlx.core as mx

    if name == "auto":
        return mx.float32 if mx.default_device() == mx.cpu else None
    return getattr(mx, name)


def _fuse(args: argparse.Namespace, model: Any, folder: Path, fused_out: Path) -> None:
    """Merge the adapters and write the model: our (mlx-community) layout, or with ``--hf-layout`` the original
    Hugging Face one (``hf_export``: dequantized, bfloat16 unless ``--fused-dtype`` says otherwise)."""
    from mlx_dgemma.train.lora import fuse_lora, save_fused

    if not args.hf_layout:
        save_fused(model, folder, fused_out, _fused_dtype(args.fused_dtype, folder), args.dequantize)
        return
    import mlx.core as mx

    from mlx_dgemma.convert.hf_export import export_hf

    fuse_lora(model, dequantize=True)
    dtype = mx.bfloat16 if args.fused_dtype == "base" else _fused_dtype(args.fused_dtype, folder)
    export_hf(model, folder, fused_out, dtype)


def _fused_dtype(name: str, folder: Path):
    import mlx.core as mx

    from mlx_dgemma.train.lora import stored_dtype

    return stored_dtype(folder) if name == "base" else getattr(mx, name)


def _layers(text: str) -> str:
    """``--num-layers`` / ``--lora-layers``: 'all' (or mlx-lm's -1), or a positive count."""
    if text.strip().lower() in ("all", "-1"):
        return "all"
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be 'all', -1 or a positive integer (got {text!r})")
    return str(int(text))


def _usage(message: str) -> DGemmaError:
    from mlx_dgemma.errors import TrainError

    return TrainError(message)
