"""``mlx_dgemma.server``: an OpenAI-compatible HTTP server for DiffusionGemma (FastAPI + uvicorn).

    mlx_dgemma.server --model PATH_OR_REPO [--host 127.0.0.1] [--port 8080] [--context-length N]
                      [--max-concurrency N] [--no-prompt-cache] [--temp T] [--strict] [--max-tokens N]
                      [--chat-template-args JSON]
                      [--request-timeout S] [--max-body-bytes N] [--max-connections N]
                      [--header-timeout S] [--allowed-origins URL,...] [--allowed-hosts NAME,...]
    python -m mlx_dgemma.server ...

Binds to loopback unless ``--host`` says otherwise. Without ``--model`` it serves the embedded (demo)
default model.

Endpoints
    ``GET /v1/models`` (and ``/v1/models/{id}``): the served model, with the context length the server
    really accepts (the model's native window ``max_position_embeddings``, unless ``--context-length``
    lowers it) in ``context_length``, ``max_model_len`` and ``max_context_length``.
    ``POST /v1/chat/completions``: the checkpoint's chat template, with system/developer messages,
    ``tools`` (passed to the template, which must mention them) and ``chat_template_kwargs`` (e.g.
    ``{"enable_thinking": true}``). Message text is text: a special token's spelling in it (``<start_of_turn>``,
    ``<|turn>``) is tokenized as characters, so it cannot forge a turn (as OpenAI's API); the extension
    ``"parse_special_tokens": true`` reads it as special tokens (pre-templated text sent on purpose).
    Tool calls in the answer are returned as OpenAI ``tool_calls``
    (``finish_reason: "tool_calls"``, streamed as one ``delta.tool_calls`` chunk), parsed by the parser
    mlx-lm's tokenizer infers from the template (Gemma 4: ``mlx_lm/tool_parsers/gemma4.py``); assistant
    ``tool_calls`` (arguments decoded) and ``tool`` results (named after their call) are rendered back
    through the template. With thinking enabled, the thought is returned in ``reasoning_content``.
    ``POST /v1/completions``: a raw prompt (one string or one list of token ids), no template. With ``suffix``,
    fill-in-the-middle: the answer is the middle between ``prompt`` and ``suffix``. The answer's first canvas holds a
    hole of ``max_tokens`` positions (default: the rest of the canvas beside the suffix), then the suffix's tokens
    held fixed, then the end token, so that the bidirectional decoder sees the suffix while it writes the middle
    (the library's ``infill=FillInMiddle(suffix)``, ``decoding/constrain.py``). The middle ends at the first end
    token or pad the model writes in the hole (``finish_reason`` "stop"), else it fills the hole ("length"); the
    suffix is not returned. Streaming works (the middle is one canvas's chunk). A 400 naming ``suffix``: ``suffix``
    with ``response_format``, or a suffix that does not fit beside ``max_tokens`` in one canvas; ``""`` is none.
    ``POST /v1/responses``: OpenAI's Responses API (``server/responses.py``) and ``POST /v1/messages``
    (plus ``/v1/messages/count_tokens``): Anthropic's Messages API (``server/anthropic.py``), each translated
    into a chat request and served by the same path (``server/bridge.py``); see their module docs.
    ``GET /health``: queue state and counters (served, cancelled, failed, prompt-cache reused tokens).
    ``GET /``: a chat page showing the canvas as it is denoised (``server/web.py``; ``--no-web`` turns it off).

Model names: the served id (the ``--model`` argument, a folder's name, or ``default``), the ``--model``
argument as given, and ``default``, each also behind a ``publisher/`` prefix (LM Studio's ids); another
name is a 404. ``model`` may be omitted.

Generation
    * ``max_tokens`` / ``max_completion_tokens`` are exact. Without them the answer may use ``--max-tokens``
      tokens (default 512 rounded up to whole canvases; 0: the whole remaining context), or the room left in
      the context if less. The prompt plus ``max_tokens`` rounded up to whole canvases must fit in the
      context length, else HTTP 400 naming both numbers (code ``context_length_exceeded``).
    * ``stop`` (a string or a list) ends the answer; the stop sequence is not returned. A stop sequence
      can span canvases: while streaming, the last ``len(longest stop) - 1`` characters are held back
      until they cannot start one. ``finish_reason`` is ``stop`` (end of turn or a stop sequence) or
      ``length`` (``max_tokens`` reached). ``usage.completion_tokens`` counts the answer's tokens (with a
      stop sequence: the tokens through its end); ``usage.prompt_tokens_details.cached_tokens`` counts
      the prompt tokens reused from the previous request's encoder cache.
    * Images (checkpoints with a vision tower): chat content parts ``{"type": "image_url", "image_url":
      {"url": ...}}`` with a ``data:`` URL or an http(s) URL, fetched with a size and time limit
      (``server/images.py``); a bad, unreachable or oversized image is a 400. The prompt cache keys
      images by their pixels.
    * Diffusion options, under their own names: ``max_denoising_steps``, ``t_max``, ``t_min``,
      ``entropy_bound``, ``seed``; defaults from the checkpoint's ``generation_config.json``.
    * ``temperature`` T (0 to 2) maps onto the linear temperature schedule: ``t_max = T`` and
      ``t_min = T * (default t_min / default t_max)``, i.e. ``t_min = T / 2`` with the released
      defaults (0.8 / 0.4, which T = 0.8 reproduces). T = 0 is served as T = 0.01 (the nearest the
      schedule gets to greedy) and, when no ``seed`` is given, with seed 0, so that it is reproducible.
      Giving ``temperature`` together with ``t_max``/``t_min`` is a 400.
    * Autoregressive-only sampling fields (``top_p``, ``top_k``, ``min_p``, presence / frequency /
      repetition penalties), ``verbosity``, ``prediction``, unknown fields and unknown ``stream_options``
      are ignored, logged and named in the ``X-Ignored-Fields`` response header; with ``--strict`` they are
      400s (the known ones unless they carry their "off" value).
    * ``reasoning_effort``: ``none``/``minimal`` send ``enable_thinking: false`` to the chat template,
      ``low`` and up ``true``, unless the request's ``chat_template_kwargs`` sets it; ignored and named when
      the template has no ``enable_thinking`` (``--strict``: a 400). ``chat_template_kwargs`` go over the
      server's ``--chat-template-args``.
    * ``max_denoising_steps`` is at most one step per canvas position (or the checkpoint's default, if
      larger); ``t_max``/``t_min``/``entropy_bound`` must be finite in float32. ``--request-timeout``
      cuts a longer answer: ``finish_reason`` "length" and an ``error`` (code ``request_timeout``) in the
      response (streaming: in the chunk with the ``finish_reason``).
    * Fields we cannot honour are a 400 naming the field unless they carry their "off" value (null
      always is): ``n``/``best_of`` ≠ 1, ``logprobs``, ``top_logprobs``, ``logit_bias``, ``echo``, ``suffix``
      (chat: fill-in-the-middle is a completions field),
      ``response_format`` other than text/json_object/json_schema/regex/lark, ``tool_choice`` other than
      auto/none/required/a named function (the last two force one call, its arguments under the tool's
      schema: ``toolgrammar.py``), non-text modalities,
      ``audio``, ``functions``, ``web_search_options``. Metadata with no effect on the answer (``user``, ``metadata``, ``store``, ``service_tier``,
      ``prompt_cache_key``, ``safety_identifier``, ``parallel_tool_calls``) is accepted and ignored.

Streaming (``stream: true``, server-sent events in OpenAI's chunk format)
    Each committed canvas is sent as soon as it is committed (chat: a first chunk carries the role).
    ``stream_options.include_usage`` adds the usage chunk (``choices: []``) before ``data: [DONE]``.
    Extension: ``stream_options.include_previews: true`` also sends, after every denoising step, a chunk
    with ``choices: []`` and ``"preview": {"text", "canvas", "step"}``: the canvas being denoised (it is not
    part of the answer and stop sequences are not applied to it). ``include_drafts``, its old name, sends the
    same under the old key ``"draft"``. The chunk with the
    ``finish_reason`` (and a non-streaming response) carries ``"diffusion": {"canvases",
    "decoder_passes", "tokens_per_forward"}``. An error after the stream began is sent as one
    ``data: {"error": ...}`` event.

Concurrency
    One worker thread owns MLX and decodes up to ``--decode-concurrency`` requests (default 8) together, one
    decoder pass for all of them at a time (``mlx_dgemma.batching``: each attends to its own cache, so each answer
    is the one it gets alone); queued requests join between steps, at most ``--prompt-concurrency`` (4) a step,
    first in first out. On several ranks (``mlx.launch``) requests are decoded one at a time. At most
    ``--max-concurrency`` requests may be queued or running; beyond that a 429 (``Retry-After: 1``). A
    client that disconnects frees its slot at once (its request is dropped from the queue, or stopped at
    the next denoising step), and a request frees its slot before its answer is sent. An error in one
    request is answered to that request only. SIGTERM stops the running request at its next step (it is
    answered 503, ``shutting_down``) and the server exits.

Limits
    Bodies over ``--max-body-bytes`` (8 MiB) are a 413; decoding, templating and tokenizing run on a
    thread, so the event loop (``/health``) is never blocked by a request. A connection must send its
    request headers within ``--header-timeout`` seconds; beyond ``--max-connections`` open connections, a
    new one is answered 503 and closed. Running out of file descriptors is logged once a minute. More than
    100 request headers, or more than 16 KiB of them, are a 431 and the connection is closed.

Browsers (``server/guards.py``)
    ``POST`` endpoints require ``Content-Type: application/json`` (415 otherwise): a web page cannot send that
    without a CORS preflight, which is refused unless ``--allowed-origins`` allows the page. A request whose
    ``Host`` is not ``localhost``, an IP address, this machine's name, ``--host`` or a ``--allowed-hosts``
    name is a 400 (code ``host_not_allowed``): DNS rebinding. ``--allowed-hosts '*'`` serves any name.

Prompt cache
    The encoder cache of the previous request is kept (the prompt alone, and the prompt plus any canvases
    encoded after it). A prompt that extends one of them (the next turn of the same conversation) encodes
    only the new tokens; the output is the same as without reuse. Caches are only extended, never
    trimmed (sliding-window layers cannot be trimmed).

Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 (malformed JSON, an
invalid or unsupported field, a prompt that does not fit: code ``context_length_exceeded``), 404 (unknown
model), 413 (body too large), 415 (not JSON), 429 (busy), 431 (headers too large), 500, 503 (shutting down).
"""

from __future__ import annotations

from mlx_dgemma.server.app import create_app
from mlx_dgemma.server.cli import BackgroundServer, main

__all__ = ["BackgroundServer", "create_app", "main"]
