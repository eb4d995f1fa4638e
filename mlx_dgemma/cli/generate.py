"""``mlx_dgemma.generate``: generate text from the command line (flags in the style of ``mlx_lm.generate``)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import unicodedata
from typing import TextIO

from mlx_dgemma.cli.shared import (
    add_ar_only_flags,
    add_bool_flag,
    add_chat_template_flags,
    add_log_level,
    add_model_arguments,
    add_trust_remote_code,
    configure_logging,
    note_ignored,
    parser,
    read_stdin,
    run_cli,
    seed,
)
from mlx_dgemma.errors import DGemmaError

DEMO_PROMPT = "Fill the record: Meet Maya, 34, a pilot living in Oslo. Maya speaks Greek and Hindi."
DESCRIPTION = """Generate text with DiffusionGemma: the answer is denoised one canvas (block of tokens) at a time.
With no --model, runs the small model shipped inside the package."""


# mlx-lm generate flags that have no counterpart here, beyond the autoregressive-only ones in _cli.
UNSUPPORTED_FLAGS = {
    "--prompt-cache-file": "use the Python API's prompt_cache= (mlx_lm.models.cache.load_prompt_cache works on "
    "our caches) instead",
    "--use-default-chat-template": "the checkpoint's chat template is always used: drop the flag",
    "--extra-eos-token": "the checkpoint's end-of-turn tokens end the answer: drop the flag",
    "--prefill-response": "a canvas is denoised as a whole: put the start of the answer in the prompt instead",
    "--prefill-step-size": "the prompt is encoded in fixed chunks: drop the flag",
}


def build_parser() -> argparse.ArgumentParser:
    p = parser("mlx_dgemma.generate", DESCRIPTION)
    add_model_arguments(p)
    p.add_argument(
        "--prompt",
        "-p",
        default=DEMO_PROMPT,
        help="the prompt, or '-' to read it (UTF-8) from standard input",
    )
    p.add_argument(
        "--system", "--system-prompt", dest="system", help="system prompt (passed to the chat template)"
    )
    p.add_argument(
        "--max-tokens", "-m", type=int, default=256, help="exact maximum of new tokens (default 256)"
    )
    p.add_argument(
        "--steps",
        "--max-denoising-steps",
        dest="steps",
        type=int,
        help="maximum denoising steps per canvas (default: the checkpoint's)",
    )
    p.add_argument(
        "--temp",
        "--temperature",
        dest="temp",
        type=float,
        help="temperature T, as the server maps it: --temp-max T, --temp-min T x the checkpoint's "
        "t_min/t_max ratio (1/2 in the released config)",
    )
    p.add_argument("--temp-max", type=float, help="temperature at the first denoising step")
    p.add_argument("--temp-min", type=float, help="temperature at the last denoising step")
    p.add_argument("--entropy-bound", type=float, help="entropy bound of the sampler (more = bolder steps)")
    p.add_argument("--seed", type=seed, help="random seed (0 to 2**64 - 1), for reproducible output")
    p.add_argument(
        "--fast",
        action="store_true",
        help="fast decoding: fewer decoder positions per token (a departure from the reference sampler)",
    )
    p.add_argument(
        "--no-chat-template",
        "--ignore-chat-template",
        dest="no_chat_template",
        action="store_true",
        help="feed the prompt as raw text",
    )
    add_chat_template_flags(p)
    p.add_argument(
        "--show-canvas",
        action="store_true",
        help="show the canvas being denoised below the committed text, redrawn in place (terminals only)",
    )
    add_bool_flag(
        p, "--verbose", "-v", help="print statistics when done (--verbose, or --verbose True/False)"
    )
    add_trust_remote_code(p)
    add_log_level(p)
    add_ar_only_flags(p)
    add_ar_only_flags(p, UNSUPPORTED_FLAGS, why="has no counterpart in mlx_dgemma")
    p.add_argument(
        "--image",
        action="extend",
        nargs="+",
        default=None,
        metavar="PATH",
        help="images for the vision tower, in prompt order: --image a.jpg b.jpg, or repeated",
    )
    p.add_argument(
        "--json-schema", metavar="FILE", help="constrain the answer to this JSON schema (a .json file)"
    )
    p.add_argument(
        "--infill", metavar="TEMPLATE", help="fill the {{N}} holes (N tokens each) of this template"
    )
    return p


def _width(text: str) -> int:
    """Terminal columns of ``text`` (East Asian wide characters take two)."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


class CanvasView:
    """Shows the canvas being denoised on the lines below the committed text and redraws it in place.

    Every move is relative to where the draft was drawn, so the view stays right when the terminal scrolls;
    the committed text above it is never touched.
    """

    DIM, RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, out: TextIO):
        self.out, self.lines, self.column = out, 0, 0

    def committed(self, text: str) -> None:
        """Write committed text (after clearing the draft) and remember where the cursor is left."""
        self.clear()
        self.out.write(text)
        self.out.flush()
        tail = text.rsplit("\n", 1)
        self.column = _width(tail[-1]) if len(tail) > 1 else self.column + _width(text)

    def clear(self) -> None:
        """Erase the draft and put the cursor back at the end of the committed text."""
        if not self.lines:
            return
        width = self._columns()
        # Row by row, bottom up: clearing "to the end of the screen" from its top-left corner makes tmux (and
        # others) scroll the whole screen, draft included, into the scrollback.
        seq = "\x1b[1A\x1b[2K" * self.lines + "\r"
        if not (self.column > 0 and self.column % width == 0):  # unless the text ended at the right margin
            column = self.column % width
            seq += "\x1b[1A" + (f"\x1b[{column}C" if column else "")
        self.out.write(seq)
        self.lines = 0

    def show(self, label: str, text: str) -> None:
        """Draw ``text`` (the canvas) dimmed, from the line below the committed text."""
        self.clear()
        width = self._columns()
        # A few lines are enough to watch it settle; the committed line above must stay on screen (a cursor
        # cannot move up into the scrollback).
        rows = max(1, min(6, self._size().lines - 2))
        body = f"{label} {text}".replace("\n", " ⏎ ")
        body = body[: width * rows]
        while _width(body) > width * rows:  # wide characters take two columns
            body = body[:-1]
        self.out.write(f"\n{self.DIM}{body}{self.RESET}\n")
        self.lines = max(1, -(-_width(body) // width))
        self.out.flush()

    def _size(self) -> os.terminal_size:
        """The terminal's own size (a stale ``COLUMNS`` in the environment would misplace every redraw)."""
        try:
            size = os.get_terminal_size(self.out.fileno())
        except (AttributeError, OSError, ValueError):
            return shutil.get_terminal_size()
        return size if size.columns and size.lines else shutil.get_terminal_size()  # 0 x 0: size unknown

    def _columns(self) -> int:
        return max(self._size().columns, 1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    note_ignored(args)
    return run_cli(lambda: run(args, read_stdin() if args.prompt == "-" else args.prompt))


def run(args: argparse.Namespace, prompt: str) -> int:
    from mlx_dgemma.decoding.constrain import read_schema
    from mlx_dgemma.generation import Commit, Done, Preview, stream_generate
    from mlx_dgemma.model.loader import load
    from mlx_dgemma.runtime.distributed import quiet_followers

    if args.temp is not None and (args.temp_max is not None or args.temp_min is not None):
        raise DGemmaError("give either --temp or --temp-max/--temp-min, not both")
    schema = read_schema(args.json_schema) if args.json_schema else None  # before the model loads: fails fast
    model, tokenizer = load(args.model, adapter_path=args.adapter_path)
    quiet_followers()  # under mlx.launch, only rank 0 prints
    # --thinking forces the template's thinking on; else off, unless --chat-template-config decides.
    thinking = True if args.thinking else (None if "enable_thinking" in args.chat_template_config else False)
    live = args.show_canvas and sys.stdout.isatty()
    view = CanvasView(sys.stdout) if live else None
    events = stream_generate(
        model,
        tokenizer,
        prompt,
        args.max_tokens,
        system=args.system,
        use_chat_template=not args.no_chat_template,
        thinking=thinking,
        seed=args.seed,
        max_denoising_steps=args.steps,
        temperature=args.temp,
        t_max=args.temp_max,
        t_min=args.temp_min,
        chat_template_kwargs=args.chat_template_config,
        entropy_bound=args.entropy_bound,
        previews=live,
        drafter=args.drafter,
        fast=args.fast,
        images=args.image,
        json_schema=schema,
        infill=args.infill,
    )
    for event in events:
        if isinstance(event, Preview) and view:
            view.show(f"[canvas {event.canvas_index + 1}, step {event.step}]", event.canvas_text)
        elif isinstance(event, Commit):
            if view:
                view.committed(event.text)
            else:
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
    print(
        f"Generation: {s.generated_tokens} tokens, {s.generation_tps:.1f} tokens-per-sec "
        f"({s.canvases} canvases, {s.decoder_passes} decoder passes, "
        f"{s.tokens_per_forward:.2f} tokens per forward)",
        file=out,
    )
    if s.drafter != "none":
        print(
            f"Drafter: {s.drafter}, {s.drafted_canvases} canvases drafted, {s.restarted_canvases} rejected",
            file=out,
        )
    print(f"Finish reason: {done.finish_reason}", file=out)
    print(f"Peak memory: {s.peak_memory_gb:.3f} GB", file=out)


if __name__ == "__main__":
    sys.exit(main())
