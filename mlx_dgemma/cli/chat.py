"""``mlx_dgemma.chat``: chat with a model in the terminal, as ``mlx_lm.chat`` does.

Each turn renders the whole conversation with the chat template and encodes only what follows the longest
prefix an earlier turn left in the encoder cache (:class:`Conversation`), so a turn costs its new tokens and its
answer is the one the model gives the whole conversation without a cache.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

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
    run_cli,
    seed,
)
from mlx_dgemma.errors import DGemmaError
from mlx_dgemma.model.cache import copy_cache

if TYPE_CHECKING:
    from mlx_dgemma.generation import Done
    from mlx_dgemma.model.cache import DiffusionCache
    from mlx_dgemma.model.diffusion_gemma import Model

DESCRIPTION = """Chat with DiffusionGemma in the terminal: each answer is denoised one canvas (block of tokens) at a
time and printed as it is committed. With no --model, chats with the small model shipped inside the package (it
fills JSON records from sentences about people)."""

QUIT, RESET, HELP = ("q", "exit", "/exit", "/quit"), ("r", "/reset"), ("h", "/help")
HELP_TEXT = """Type a message and press Enter. Commands:
  q, exit     quit (Ctrl-D too)
  r, /reset   start a new conversation
  h, /help    show this help
Ctrl-C stops an answer; at the prompt it quits."""


def build_parser() -> argparse.ArgumentParser:
    p = parser("mlx_dgemma.chat", DESCRIPTION)
    add_model_arguments(p)
    p.add_argument(
        "--system", "--system-prompt", dest="system", help="system prompt (passed to the chat template)"
    )
    p.add_argument(
        "--max-tokens",
        "-m",
        type=int,
        default=256,
        help="exact maximum of new tokens per answer (default 256)",
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
        help="temperature T, as mlx_dgemma.generate maps it (default: the checkpoint's schedule)",
    )
    p.add_argument("--entropy-bound", type=float, help="entropy bound of the sampler (more = bolder steps)")
    p.add_argument("--seed", type=seed, help="random seed (0 to 2**64 - 1): each answer is reproducible")
    p.add_argument(
        "--fast",
        action="store_true",
        help="fast decoding: fewer decoder positions per token (a departure from the reference sampler)",
    )
    add_chat_template_flags(p)
    add_bool_flag(p, "--verbose", "-v", help="print a statistics line after each answer (on standard error)")
    add_trust_remote_code(p)
    add_log_level(p)
    add_ar_only_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    note_ignored(args)
    return run_cli(lambda: run(args), interrupted="[bye]")


SIGNAL_POLL_S = 0.2  # how long a piped REPL waits in one go for its next line (a Ctrl-C ends the wait)


@dataclass
class Held:
    """An encoder cache and the token ids it holds, exactly."""

    ids: list[int]
    cache: DiffusionCache


@dataclass
class Turn:
    """One exchange, begun: the conversation through the user's message, rendered, and the caches to answer it."""

    messages: list[dict[str, Any]]
    ids: list[int]  # the rendering, generation prompt included
    cache: DiffusionCache  # a working cache holding ids[: cache.offset], which the answer extends
    reused: int  # how many of ids came from an earlier turn's cache
    history: Held | None  # the rendering before the generation prompt, encoded: what the next turn extends


class Conversation:
    """A chat's messages and an encoder cache holding a prefix of their rendering.

    mlx-lm's chat renders each new message alone and encodes it after the cache (``prompt_cache=``). That
    repeats the template's ``<bos>`` in mid-conversation and keeps each generation prompt (an empty thought
    block in DiffusionGemma's template) in the history, where the template writes the answer without it. Here a
    turn renders the whole conversation; the cache kept is the one holding the conversation before the
    generation prompt (the server's ``PromptCache`` keeps the same point), which the next turn's rendering
    extends: that turn encodes the answer as the template writes it, the new message and the generation prompt.
    """

    def __init__(
        self,
        model: Model,
        tokenizer: Any,
        system: str | None = None,
        thinking: bool | None = None,
        template_kwargs: dict[str, Any] | None = None,
        capture: tuple[int, ...] = (),
    ):
        self.model, self.tokenizer = model, tokenizer
        self.system, self.thinking, self.template_kwargs = system, thinking, dict(template_kwargs or {})
        # The encoder layers whose features the drafter reads: captured from a fresh cache's first token on.
        self.capture = capture
        self.messages: list[dict[str, Any]] = []
        self.held: Held | None = None

    def reset(self) -> None:
        """Forget the conversation and its cache."""
        self.messages, self.held = [], None

    def begin(self, text: str) -> Turn:
        """Render the conversation with the user's ``text`` and encode its history; the conversation itself
        changes only at :meth:`end` (a turn that fails or is stopped before any text leaves no trace)."""
        from mlx_dgemma.decoding.block_loop import prefill

        messages = [*self.messages, {"role": "user", "content": text}]
        ids, history = self._render(messages, True), self._render(messages, False)
        cache, reused = self._cache_for(ids)
        kept = None  # a template whose history is not a prefix of its prompt gets no cache across turns
        if cache.offset <= len(history) < len(ids) and ids[: len(history)] == history:
            if len(history) > cache.offset:
                prefill(self.model, _array(ids[cache.offset : len(history)]), cache)
            kept, cache = Held(history, cache), copy_cache(cache)  # the answer extends the copy
        return Turn(messages, ids, cache, reused, kept)

    def end(self, turn: Turn, answer: str) -> None:
        """Record a turn's answer (the text shown, whole or stopped) and keep its history's cache."""
        self.messages = [*turn.messages, {"role": "assistant", "content": answer}]
        self.held = turn.history

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
        from mlx_dgemma.request import encode_prompt

        return encode_prompt(
            self.tokenizer,
            messages,
            self.system,
            True,
            self.thinking,
            self.template_kwargs,
            generation_prompt=generation_prompt,
        )

    def _cache_for(self, ids: list[int]) -> tuple[DiffusionCache, int]:
        """A working copy of the held cache if it holds a prefix of ``ids``, else a fresh cache; and its length."""
        held = self.held
        if held is not None and ids[: len(held.ids)] == held.ids:
            return copy_cache(held.cache), len(held.ids)
        cache = self.model.make_cache()  # what mlx-lm's make_prompt_cache(model) returns
        cache.capture = self.capture
        return cache, 0


def _array(ids: list[int]) -> Any:
    import mlx.core as mx

    return mx.array([ids], dtype=mx.int32)


def run(args: argparse.Namespace) -> int:
    """Load the model, then answer the lines of standard input until a quit command or the end of input."""
    from mlx_dgemma.drafter import make_proposer
    from mlx_dgemma.model.loader import load
    from mlx_dgemma.request import prepare

    model, tokenizer = load(args.model, adapter_path=args.adapter_path)
    if not getattr(tokenizer, "chat_template", None):
        raise DGemmaError("this model has no chat template: use mlx_dgemma.generate --ignore-chat-template")
    proposer = make_proposer(args.drafter, model)  # once: a drafter folder is loaded here, not every turn
    # --thinking forces the template's thinking on; else off, unless --chat-template-config decides.
    thinking = True if args.thinking else (None if "enable_thinking" in args.chat_template_config else False)
    conversation = Conversation(
        model, tokenizer, args.system, thinking, args.chat_template_config, getattr(proposer, "capture", ())
    )
    options = {
        "seed": args.seed,
        "temperature": args.temp,
        "max_denoising_steps": args.steps,
        "entropy_bound": args.entropy_bound,
        "drafter": proposer if proposer is not None else "none",
        "fast": args.fast,
    }
    # A bad --max-tokens, --temp or --steps fails now, in one line, rather than at every turn.
    prepare(model, tokenizer, [model.args.pad_token_id or 0], args.max_tokens, **options)
    print(f"[INFO] Chatting with {args.model or 'the embedded demo model'}. Type h for help.")
    return repl(conversation, args.max_tokens, options, args.verbose)


def repl(conversation: Conversation, max_tokens: int, options: dict[str, Any], verbose: bool) -> int:
    """Read a line, answer it or run its command; 0 at ``q`` or the end of input."""
    _line_editing()
    while (line := _read()) is not None:
        command = line.strip()
        if command in QUIT:
            return 0
        if command in RESET:
            conversation.reset()
            print("[new conversation]")
        elif command in HELP:
            print(HELP_TEXT)
        elif command:
            answer(conversation, line, max_tokens, options, sys.stdout, sys.stderr if verbose else None)
    return 0


def _line_editing() -> None:
    """Arrow keys and history for ``input()`` in a terminal; never when piped (readline may write escapes)."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        with contextlib.suppress(ImportError):  # readline is not built into every Python (Windows)
            import readline  # noqa: F401 (importing it is what turns line editing on)


class _Pipe:
    """Lines of a piped standard input, read from its descriptor after waiting for them in short ``select`` calls.

    CPython's ``input()`` can lose a Ctrl-C that lands between writing the prompt and starting the read (the
    signal is taken, then the read blocks until the next line: measured here, two runs of four of the Ctrl-C
    test hung beside two busy processes). Waiting in Python wakes up for it within ``SIGNAL_POLL_S``. Its own
    buffer, so that a ``select`` never waits for bytes that were already read."""

    def __init__(self, fd: int):
        self.fd, self.buffer = fd, b""

    def readline(self) -> bytes:
        """The next line with its newline; the last one without; ``b""`` at the end of input."""
        while b"\n" not in self.buffer:
            if not select.select([self.fd], [], [], SIGNAL_POLL_S)[0]:
                continue
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                break
            self.buffer += chunk
        line, newline, self.buffer = self.buffer.partition(b"\n")
        return line + newline


_pipe: _Pipe | None = None


def _input(prompt: str) -> str:
    """``input(prompt)`` in a terminal (readline handles Ctrl-C there); from a pipe, a line of ``_Pipe``."""
    global _pipe
    if sys.stdin.isatty():
        return input(prompt)
    print(prompt, end="", flush=True)
    if _pipe is None:
        _pipe = _Pipe(sys.stdin.fileno())
    line = _pipe.readline()
    if not line:
        raise EOFError
    return line.decode("utf-8").removesuffix("\n")  # bad bytes: a UnicodeDecodeError, as a UnicodeError


def _read() -> str | None:
    """The next line after a ``>> `` prompt, or ``None`` at the end of input. Input that is not typed in a
    terminal is echoed, so that the output reads as a transcript."""
    try:
        line = _input(">> ")
        line.encode()  # a stream decoded with surrogateescape hands bad bytes on as lone surrogates
    except EOFError:
        print()  # leave the shell's prompt on a line of its own
        return None
    except UnicodeError:
        print(flush=True)
        print("error: that line is not UTF-8 text: type it again", file=sys.stderr)
        return ""
    if not sys.stdin.isatty():
        print(line)
    return line


def answer(
    conversation: Conversation,
    text: str,
    max_tokens: int,
    options: dict[str, Any],
    out: TextIO,
    stats: TextIO | None = None,
) -> Done | None:
    """Stream the answer to ``text`` onto ``out`` and add the exchange to the conversation. Ctrl-C stops the
    answer (what was shown stays in the conversation); a bad request prints one ``error:`` line. Returns the
    answer's ``Done`` (``None`` if it was stopped or failed); with ``stats``, prints a statistics line there."""
    shown: list[str] = []
    try:
        turn = conversation.begin(text)
        done = _stream(conversation, turn, max_tokens, options, shown, out)
    except KeyboardInterrupt:
        print("\n[answer stopped]" if shown else "[answer stopped]", file=out)
        if shown:
            conversation.end(turn, "".join(shown))
        return None
    except DGemmaError as e:
        if shown:
            print(file=out)
        print(f"error: {e} (r starts a new conversation)", file=sys.stderr)
        return None
    print(file=out)
    conversation.end(turn, done.answer)
    if stats is not None:
        print_stats(done, turn, stats)
    return done


def _stream(
    conversation: Conversation,
    turn: Turn,
    max_tokens: int,
    options: dict[str, Any],
    shown: list[str],
    out: TextIO,
) -> Done:
    """Write each committed piece of the answer to ``out`` as it comes (and append it to ``shown``)."""
    from mlx_dgemma.generation import Commit, Done, stream_generate

    # cache= and prompt_ids= (the API's form of mlx-lm's prompt_cache=): the drafter sees the whole
    # conversation, and the answer's last canvas is not encoded into a cache that is dropped anyway.
    events = stream_generate(
        conversation.model,
        conversation.tokenizer,
        None,
        max_tokens,
        prompt_ids=turn.ids,
        cache=turn.cache,
        **options,
    )
    try:
        for event in events:
            if isinstance(event, Commit):
                out.write(event.text)
                out.flush()
                shown.append(event.text)
            elif isinstance(event, Done):
                return event
    finally:
        events.close()
    raise AssertionError("stream_generate ends with a Done")


def print_stats(done: Done, turn: Turn, out: TextIO) -> None:
    """One line: the prompt (how much the cache held), the answer's tokens, canvases and speed, the memory."""
    s = done.stats
    line = (
        f"[prompt: {len(turn.ids)} tokens, {turn.reused} from the cache | answer: {s.generated_tokens} tokens, "
        f"{s.canvases} canvas{'es' if s.canvases != 1 else ''}, {s.decoder_passes} decoder passes, {s.generation_tps:.1f} tokens-per-sec | "
        f"peak memory {s.peak_memory_gb:.3f} GB]"
    )
    dim = out.isatty()  # escape codes for a terminal only
    print(f"\x1b[2m{line}\x1b[0m" if dim else line, file=out)


if __name__ == "__main__":
    sys.exit(main())
