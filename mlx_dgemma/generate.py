"""``mlx_dgemma.generate``: generate text from the command line (flags in the style of ``mlx_lm.generate``)."""

from __future__ import annotations

import argparse
import shutil
import sys
from typing import TextIO

from ._cli import add_model_arguments, run_cli

DEMO_PROMPT = "Fill the record: Meet Maya, 34, a pilot living in Oslo. Maya speaks Greek and Hindi."
DESCRIPTION = """Generate text with DiffusionGemma: the answer is denoised one canvas (block of tokens) at a time.
With no --model, runs the small model shipped inside the package."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx_dgemma.generate", description=DESCRIPTION)
    add_model_arguments(p)
    p.add_argument("--prompt", "-p", default=DEMO_PROMPT,
                   help="the prompt, or '-' to read it from standard input")
    p.add_argument("--system", help="system prompt (passed to the chat template)")
    p.add_argument("--max-tokens", "-m", type=int, default=256, help="exact maximum of new tokens (default 256)")
    p.add_argument("--steps", type=int, help="maximum denoising steps per canvas (default: the checkpoint's)")
    p.add_argument("--temp-max", type=float, help="temperature at the first denoising step")
    p.add_argument("--temp-min", type=float, help="temperature at the last denoising step")
    p.add_argument("--entropy-bound", type=float, help="entropy bound of the sampler (more = bolder steps)")
    p.add_argument("--seed", type=int, help="random seed, for reproducible output")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--thinking", action="store_true", help="turn on the chat template's thinking mode")
    p.add_argument("--show-canvas", action="store_true",
                   help="show the canvas being denoised, redrawn in place (terminals only)")
    p.add_argument("--verbose", "-v", action="store_true", help="print statistics when done")
    p.add_argument("--json-schema", metavar="FILE", help="constrain the answer to this JSON schema (a .json file)")
    p.add_argument("--infill", metavar="TEMPLATE", help="fill the {{N}} holes (N tokens each) of this template")
    return p


class CanvasView:
    """Redraws the current draft below the committed text, in place, on a terminal."""

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, out: TextIO):
        self.out, self.lines = out, 0

    def clear(self) -> None:
        if self.lines:
            self.out.write(f"\x1b[{self.lines}F\x1b[J")  # up to the draft's first line, clear below
        else:
            self.out.write("\r\x1b[J")
        self.lines = 0

    def show(self, label: str, text: str) -> None:
        self.clear()
        width = max(shutil.get_terminal_size().columns, 20)
        body = f"{label} {text}".replace("\n", " ⏎ ")
        body = body[: width * 6]  # a few lines are enough to watch it settle
        self.out.write(f"{self.DIM}{body}{self.RESET}\n")
        self.lines = (len(body) + width - 1) // width
        self.out.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    return run_cli(lambda: run(args, prompt))


def run(args: argparse.Namespace, prompt: str) -> int:
    from .constrain import read_schema
    from .generation import Commit, Done, Draft, stream_generate
    from .loader import load

    model, tokenizer = load(args.model, adapter_path=args.adapter_path)
    live = args.show_canvas and sys.stdout.isatty()
    view = CanvasView(sys.stdout) if live else None
    events = stream_generate(
        model, tokenizer, prompt, args.max_tokens, system=args.system,
        use_chat_template=not args.no_chat_template, thinking=args.thinking, seed=args.seed,
        max_denoising_steps=args.steps, t_max=args.temp_max, t_min=args.temp_min,
        entropy_bound=args.entropy_bound, drafts=live, drafter=args.drafter,
        json_schema=read_schema(args.json_schema) if args.json_schema else None, infill=args.infill,
    )
    for event in events:
        if isinstance(event, Draft) and view:
            view.show(f"[canvas {event.canvas_index + 1}, step {event.step}]", event.text)
        elif isinstance(event, Commit):
            if view:
                view.clear()
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, Done):
            sys.stdout.write("\n")
            if args.verbose:
                print_stats(event, sys.stderr)
    return 0


def print_stats(done, out: TextIO) -> None:
    s = done.stats
    print("=" * 10, file=out)
    print(f"Prompt: {s.prompt_tokens} tokens, {s.prompt_tps:.1f} tokens-per-sec", file=out)
    print(f"Generation: {s.generated_tokens} tokens, {s.generation_tps:.1f} tokens-per-sec "
          f"({s.canvases} canvases, {s.decoder_passes} decoder passes, "
          f"{s.tokens_per_forward:.2f} tokens per forward)", file=out)
    if s.drafter != "none":
        print(f"Drafter: {s.drafter}, {s.drafted_canvases} canvases drafted, {s.restarted_canvases} rejected",
              file=out)
    print(f"Finish reason: {done.finish_reason}", file=out)
    print(f"Peak memory: {s.peak_memory_gb:.3f} GB", file=out)


if __name__ == "__main__":
    sys.exit(main())
