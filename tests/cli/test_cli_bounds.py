"""Bounded inputs on the command line and at start-up (issue 26): each hostile input is one ``error:`` line and
exit code 2, never a traceback, and nothing reads, allocates or runs without a bound.

Inputs that once hung or grew without end run in a real process with a hang guard (``HANG_S``, passed as the
subprocess timeout: a bound against a hang, not a speed test); that they stay bounded holds by construction
(a FIFO or a device is refused before it is opened, standard input is read up to its cap plus one byte).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from mlx_dgemma import CheckpointError, load
from mlx_dgemma.cli.generate import main
from mlx_dgemma.model.config import MAX_SIZES, ModelArgs
from mlx_dgemma.runtime.bounded import MAX_INPUT_BYTES
from tests.conftest import DEMO24, HANG_S

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A template that never finishes in Python code (2**60 macro calls), and one whose single C call wants 100 GB.
LOOPING_TEMPLATE = (
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}"
)
HUGE_TEMPLATE = "{{ 'x' * 100000000000 }}"


@pytest.fixture
def folder(tmp_path):
    out = tmp_path / "model"
    shutil.copytree(DEMO24, out, ignore=shutil.ignore_patterns("drafter"))
    return out


def one_line(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and "error:" in err, err
    for needle in needles:
        assert needle in err, err
    return err


def run_main(capsys, *argv: str) -> tuple[int, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse's errors
        rc = e.code
    return rc, capsys.readouterr().err


def cli(*argv: str, stdin: bytes | None = None, module: str = "mlx_dgemma generate") -> tuple[int, str]:
    """The command in a fresh process; its standard input is ``stdin`` (else nothing)."""
    proc = subprocess.run(
        [sys.executable, "-m", *module.split(), *argv],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=HANG_S,
        cwd=ROOT,
    )
    return proc.returncode, proc.stderr.decode("utf-8", "replace")


GENERATE = ("--model", str(DEMO24), "--prompt", "hi", "--max-tokens", "4", "--steps", "2")


# --- --json-schema ------------------------------------------------------------------------------------------


def test_a_schema_file_in_latin_1(tmp_path, capsys):
    schema = tmp_path / "schema.json"
    text = '{"type": "string", "description": "café"}'
    schema.write_bytes(text.encode("latin-1"))
    one_line(
        *run_main(capsys, *GENERATE, "--json-schema", str(schema)),
        "schema.json",
        "not UTF-8",
        f"byte {text.index('é')}",
    )


def test_a_schema_nested_3000_deep(tmp_path, capsys):
    schema = tmp_path / "deep.json"
    schema.write_text("[" * 3000 + "]" * 3000)
    one_line(*run_main(capsys, *GENERATE, "--json-schema", str(schema)), "deep.json", "too deeply")


def test_dev_zero_as_a_schema_is_refused_unread():
    rc, err = cli(*GENERATE, "--json-schema", "/dev/zero")
    one_line(rc, err, "/dev/zero", "not a regular file")


def test_a_fifo_without_a_writer_as_a_schema_does_not_hang(tmp_path):
    fifo = tmp_path / "schema.json"
    os.mkfifo(fifo)
    rc, err = cli(*GENERATE, "--json-schema", str(fifo))
    one_line(rc, err, str(fifo), "FIFO", "not a regular file")


def test_a_schema_over_the_cap(tmp_path, capsys):
    schema = tmp_path / "big.json"
    schema.write_text('{"description": "' + "x" * MAX_INPUT_BYTES + '"}')
    one_line(
        *run_main(capsys, *GENERATE, "--json-schema", str(schema)), "big.json", "over the limit of 8 MiB"
    )


# --- --prompt - ---------------------------------------------------------------------------------------------


def test_50_mb_on_standard_input_is_refused_past_the_cap():
    rc, err = cli("--model", str(DEMO24), "--prompt", "-", "--max-tokens", "4", stdin=b"a" * 50_000_000)
    one_line(rc, err, "standard input", "8 MiB")


# --- --infill -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["99999999999", str(10**30), "9" * 5000])
def test_an_infill_hole_beyond_max_tokens_is_refused_before_allocating(capsys, size):
    err = one_line(
        *run_main(capsys, *GENERATE, "--infill", "Name: {{" + size + "}}"), "infill hole", "max_tokens (4)"
    )
    assert len(err) < 400


def test_an_infill_hole_written_as_an_expression(capsys):
    one_line(*run_main(capsys, *GENERATE, "--infill", "Name: {{10**30}}"), "no holes", "{{8}}")


def test_infill_holes_that_add_up_past_max_tokens(capsys):
    one_line(*run_main(capsys, *GENERATE, "--infill", "{{3}} and {{3}}"), "max_tokens (4)")


# --- --chat-template-config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["messages", "add_generation_prompt", "tokenize", "tools", "conversation"])
def test_a_reserved_chat_template_key(capsys, key):
    one_line(
        *run_main(capsys, *GENERATE, "--chat-template-config", json.dumps({key: 1})), repr(key), "reserved"
    )


def test_a_chat_template_config_nested_too_deeply(capsys):
    deep = '{"a": ' + "[" * 3000 + "]" * 3000 + "}"
    one_line(
        *run_main(capsys, *GENERATE, "--chat-template-config", deep), "--chat-template-config", "too deeply"
    )


def test_the_api_refuses_reserved_template_kwargs_too():
    from mlx_dgemma.errors import GenerationError
    from mlx_dgemma.model.loader import load_tokenizer
    from mlx_dgemma.request import encode_prompt

    with pytest.raises(GenerationError, match=r"'tokenize'.*reserved"):
        encode_prompt(load_tokenizer(DEMO24), "hi", chat_template_kwargs={"tokenize": True})


# --- config.json --------------------------------------------------------------------------------------------


def set_text_config(folder, **values):
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(values)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "name", ["vocab_size", "num_hidden_layers", "hidden_size", "max_position_embeddings"]
)
def test_an_absurd_size_in_the_config(folder, capsys, name):
    set_text_config(folder, **{name: 10**12})
    with pytest.raises(CheckpointError) as info:
        load(folder)
    assert name in str(info.value) and str(MAX_SIZES[name]) in str(info.value)
    one_line(
        *run_main(capsys, "--model", str(folder), "--prompt", "hi", "--max-tokens", "2"), name, "at most"
    )


def test_the_bounds_admit_the_released_model():
    args = ModelArgs()  # google/diffusiongemma-26B-A4B-it
    args.check()
    assert all(
        getattr(args, name) * 16 <= most for name, most in MAX_SIZES.items() if name != "top_k_experts"
    )


# --- tokenizer.json -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "needle"), [("[]", "JSON list"), ('{"model": 1}', "cannot load the tokenizer")]
)
def test_a_tokenizer_json_of_the_wrong_shape(folder, capsys, content, needle):
    (folder / "tokenizer.json").write_text(content)
    with pytest.raises(CheckpointError, match=needle):
        load(folder)
    one_line(*run_main(capsys, "--model", str(folder), "--prompt", "hi", "--max-tokens", "2"), needle)


def test_a_tokenizer_file_that_is_a_fifo(folder):
    (folder / "tokenizer_config.json").unlink()
    os.mkfifo(folder / "tokenizer_config.json")
    rc, err = cli("--model", str(folder), "--prompt", "hi", "--max-tokens", "2")
    one_line(rc, err, "tokenizer_config.json", "FIFO")


# --- the chat template --------------------------------------------------------------------------------------


def test_a_chat_template_that_never_ends_is_refused_at_load(folder):
    (folder / "chat_template.jinja").write_text(LOOPING_TEMPLATE)
    rc, err = cli("--model", str(folder), "--prompt", "hi", "--max-tokens", "2")
    one_line(rc, err, "chat_template.jinja", "s of CPU")


@pytest.mark.skipif(
    sys.platform != "linux", reason="RLIMIT_AS is enforced on Linux only (elsewhere: the CPU limit)"
)
def test_a_chat_template_that_wants_100_gb_is_refused_at_load(folder):
    (folder / "chat_template.jinja").write_text(HUGE_TEMPLATE)
    rc, err = cli("--model", str(folder), "--prompt", "hi", "--max-tokens", "2")
    one_line(rc, err, "chat_template.jinja", "MiB of memory")


def test_a_template_that_loops_only_on_some_prompts_is_cut_at_generation(monkeypatch):
    import mlx_dgemma.prompt.chat_template as chat_template
    from mlx_dgemma.model.loader import load_tokenizer
    from mlx_dgemma.request import encode_prompt

    tokenizer = load_tokenizer(DEMO24)
    tokenizer._tokenizer.chat_template = (
        LOOPING_TEMPLATE.replace("{{ f(60) }}", "")
        + '{% if messages[0].content == "hi" %}ok{% else %}{{ f(60) }}{% endif %}'
    )
    monkeypatch.setattr(chat_template, "RENDER_CPU_S", 0.5)
    assert encode_prompt(tokenizer, "hi")
    with pytest.raises(chat_template.TemplateTooSlow, match="s of CPU"):
        encode_prompt(tokenizer, "anything else")


# --- the server ---------------------------------------------------------------------------------------------


def test_two_servers_on_one_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = subprocess.Popen(
        [sys.executable, "-m", "mlx_dgemma.server", "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + HANG_S
        while True:  # the port is taken as soon as it is bound, before the model loads
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert first.poll() is None and time.monotonic() < deadline, "the first server did not start"
                time.sleep(0.1)
        rc, err = cli("--port", str(port), module="mlx_dgemma.server")
        one_line(rc, err, f"port {port} is already in use", "--port")
    finally:
        first.terminate()
        first.wait(HANG_S)
