"""A checkpoint's chat template, checked and rendered within bounds.

A chat template is code from the checkpoint (Jinja). transformers renders it in jinja2's
``ImmutableSandboxedEnvironment``, which stops it from reaching Python's internals but not from running forever
or filling memory: ``{% macro f(n) %}{{ f(n - 1) }}{{ f(n - 1) }}{% endmacro %}{{ f(99) }}`` never ends, and
``{{ 7 ** 999999999 }}`` or ``{{ "x" * 10 ** 11 }}`` spend minutes or gigabytes inside a single C call (even at
compile time: Jinja folds constant expressions), where no Python-level deadline can stop them; a thread with a
deadline cannot be killed either.

So the load-time check (:func:`probe`) compiles the template and renders a one-message conversation in a
separate, short-lived Python process that imports only jinja2: the same sandbox, extensions, filters and
globals as transformers, under ``RLIMIT_CPU`` (``PROBE_CPU_S`` seconds of CPU: it is killed past them, C code
included), ``RLIMIT_AS`` (``PROBE_MEMORY_BYTES``, where the OS enforces it) and a wall-clock timeout. That
truly bounds it, at the price of one process start per template (tens of milliseconds; once per template and
process, the result is cached).

Rendering a request's prompt (:func:`render`) stays in this process, through transformers, so that the prompt
is exactly what transformers makes of it. The template has passed the probe by then; what remains is a template
that loops only on some input. :func:`render` bounds the template's own Python code (loops, macros,
recursion) by ``RENDER_CPU_S`` seconds of CPU, checked by a trace hook on the template's frames only, and
refuses the ``chat_template_kwargs`` that would collide with what the renderer passes (:data:`RESERVED`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, cast

from mlx_dgemma.errors import DGemmaError, GenerationError, TemplateTooSlow

# Names apply_chat_template / the renderer set themselves: a chat_template_kwargs key among them would be
# "got multiple values for keyword argument" or, worse, change what apply_chat_template returns (tokenize).
RESERVED = frozenset(
    {
        "messages",
        "conversation",
        "conversations",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "sanitize_control_tokens",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)

PROBE_CPU_S = 5  # CPU seconds the load-time check may spend compiling and rendering the template
PROBE_WALL_S = 60  # and wall-clock seconds, process start included (a loaded machine starts Python slowly)
PROBE_MEMORY_BYTES = (
    1 << 30
)  # address space of the checking process (Linux; macOS does not enforce RLIMIT_AS)
RENDER_CPU_S = 10.0  # CPU seconds the template's own code may run when rendering a request's prompt


def check_kwargs(
    kwargs: dict[str, Any], name: str = "chat_template_kwargs", error: type[DGemmaError] = GenerationError
) -> None:
    """Refuse (one line) a key of ``kwargs`` that the template renderer sets itself."""
    bad = sorted(k for k in kwargs if k in RESERVED)
    if bad:
        raise error(
            f"{name} may not set {bad[0]!r}: it is reserved, the chat template renderer sets it itself; "
            "drop that key"
        )


@contextlib.contextmanager
def time_limit(seconds: float | None = None) -> Iterator[None]:
    """Bound the CPU time (default ``RENDER_CPU_S``) of compiled Jinja code (frames of ``<template>``) run in this
    thread in the block.

    A trace hook (this thread only; the previous one is put back) counts the template's lines and calls and,
    every 256 events, raises :class:`TemplateTooSlow` once the thread has spent ``seconds`` of CPU. Other code
    runs untraced. C code called by the template (a string repeated 10**11 times) is not interrupted: the
    load-time :func:`probe` is what bounds that."""
    seconds = RENDER_CPU_S if seconds is None else seconds
    deadline = time.thread_time() + seconds
    events = 0

    def local(frame: Any, event: str, arg: Any) -> Any:
        nonlocal events
        events += 1
        if not events & 255 and time.thread_time() > deadline:
            raise TemplateTooSlow(
                f"the chat template ran for more than {seconds:g} s of CPU on this prompt "
                "(a loop that does not end?): fix the template or shorten the prompt"
            )
        return local

    def calls(frame: Any, event: str, arg: Any) -> Any:
        return local(frame, event, arg) if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        yield
    finally:
        sys.settrace(previous)


def render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """``tokenizer.apply_chat_template(messages, add_generation_prompt=..., tokenize=False, tools=..., **kwargs)``,
    with reserved ``kwargs`` refused (:func:`check_kwargs`), the template's own code bounded by
    :func:`time_limit`, and a template that recurses without end or runs out of memory reported in one line.

    It renders with the Hugging Face tokenizer under mlx-lm's wrapper: without ``enable_thinking`` the wrapper
    would switch thinking on when it spots thinking tokens in the vocabulary, not the template's own default."""
    tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
    kwargs = dict(kwargs or {})
    check_kwargs(kwargs)
    if tools is not None:
        kwargs["tools"] = tools
    try:
        with time_limit():
            return tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
            )
    except RecursionError:
        raise GenerationError(
            "the chat template recursed too deeply on this prompt: fix the template"
        ) from None
    except MemoryError:
        raise GenerationError(
            "the chat template ran out of memory on this prompt: fix the template or shorten the prompt"
        ) from None


# ------------------------------------------------------------------------------------------------------------
# The load-time check, in a process of its own

_CHILD = r"""
import json, sys
req = json.loads(sys.stdin.buffer.read().decode("utf-8"))
sys.path[:0] = req["path"]
try:
    import resource
except ImportError:
    resource = None
for name, value in (("RLIMIT_CPU", (req["cpu"], req["cpu"] + 1)), ("RLIMIT_AS", (req["memory"], req["memory"]))):
    try:
        resource.setrlimit(getattr(resource, name), value)
    except (AttributeError, ValueError, OSError):
        pass  # not enforced here: the parent's wall-clock timeout still ends the process

def answer(**out):
    sys.stdout.write(json.dumps(out))
    sys.stdout.flush()
    raise SystemExit(0)

try:
    from datetime import datetime
    import jinja2, jinja2.ext, jinja2.nodes, jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):  # transformers' {% generation %} block, without the tracking
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_block"), [], [], body).set_lineno(lineno)

        def _block(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        template = env.from_string(req["template"])
    except jinja2.TemplateSyntaxError as e:
        answer(syntax=str(e.message), line=e.lineno)
    try:
        template.render(messages=[{"role": "user", "content": "hi"}], tools=None, documents=None,
                        add_generation_prompt=True, **req["special"])
    except (MemoryError, RecursionError):
        raise
    except Exception as e:
        answer(ok=True, raised=type(e).__name__)
    answer(ok=True)
except MemoryError:
    answer(limit="memory")
except RecursionError:
    answer(ok=True, raised="RecursionError")
"""

_PROBED: dict[str, dict[str, Any]] = {}


def _import_path() -> list[str]:
    """Where jinja2 and markupsafe are installed (the child runs isolated: no site-packages, no PYTHONPATH)."""
    import jinja2
    import markupsafe

    # Regular packages (not namespace ones): __file__ is set.
    paths = [os.path.dirname(os.path.dirname(cast(str, m.__file__))) for m in (jinja2, markupsafe)]
    return list(dict.fromkeys(paths))


def probe(template: str, special_tokens: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile ``template`` and render a one-message conversation in a bounded child process.

    Returns ``{"ok": True}`` (possibly with ``raised``: an error the template raised, which requests will
    report), ``{"syntax": message, "line": n}``, or ``{"limit": "time" | "memory"}``."""
    special = {
        k: v
        for k, v in (special_tokens or {}).items()
        if isinstance(k, str) and k not in RESERVED and isinstance(v, (str, list))
    }
    request = json.dumps(
        {
            "template": template,
            "special": special,
            "path": _import_path(),
            "cpu": PROBE_CPU_S,
            "memory": PROBE_MEMORY_BYTES,
        }
    )
    key = hashlib.sha256(request.encode()).hexdigest()
    if key in _PROBED:
        return _PROBED[key]
    result: dict[str, Any] | None
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _CHILD],
            input=request.encode(),
            capture_output=True,
            timeout=PROBE_WALL_S,
        )
    except subprocess.TimeoutExpired:
        result = {"limit": "time"}
    except (
        OSError
    ):  # no interpreter to start (an embedded Python): check in this process, bounded as requests are
        result = _probe_here(template, special)
    else:
        try:
            result = json.loads(done.stdout.decode("utf-8", "replace") or "null")
        except ValueError:
            result = None
        if not isinstance(result, dict):
            if b"MemoryError" in done.stderr:
                result = {"limit": "memory"}
            elif done.returncode < 0:  # killed: past RLIMIT_CPU (SIGXCPU, then SIGKILL)
                result = {"limit": "time"}
            else:  # the checking process itself failed (not the template): check here, bounded as requests are
                result = _probe_here(template, special)
    _PROBED[key] = result
    return result


def _probe_here(template: str, special: dict[str, Any]) -> dict[str, Any]:
    """The check without a child process: transformers' own compile and render, under :func:`time_limit`."""
    from jinja2 import TemplateSyntaxError

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return {"ok": True}
    try:
        with time_limit(PROBE_CPU_S):
            _compile_jinja_template(template).render(
                messages=[{"role": "user", "content": "hi"}],
                tools=None,
                documents=None,
                add_generation_prompt=True,
                **special,
            )
    except TemplateSyntaxError as e:
        return {"syntax": str(e.message), "line": e.lineno}
    except TemplateTooSlow:
        return {"limit": "time"}
    except MemoryError:
        return {"limit": "memory"}
    except Exception as e:
        return {"ok": True, "raised": type(e).__name__}
    return {"ok": True}
