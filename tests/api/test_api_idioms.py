"""mlx-lm's and mlx-vlm's idioms that the README says run unchanged (issue 28): each works, or answers in one
line what to use instead. On the embedded demo model; conversion from the embedded default model."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_dgemma import DEFAULT_MODEL, CheckpointError, GenerationError, generate, load
from mlx_dgemma.cli.generate import build_parser
from mlx_dgemma.request import MIN_TEMPERATURE, temperature_schedule
from tests.conftest import DEMO24

README = Path(__file__).resolve().parents[2] / "README.md"
FAST = {"max_tokens": 8, "max_denoising_steps": 4, "seed": 0, "drafter": "none"}


@pytest.fixture(scope="module")
def demo():
    return load(DEMO24)


def one_line(exc_type, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


# -- load(path, tokenizer_config=...) and mlx-lm's other load keywords ------------------------------------------


def test_load_takes_mlx_lm_tokenizer_config(demo):
    _, plain = demo
    extra = next(i for i in range(10, 200) if i not in plain.eos_token_ids)
    token = plain.convert_ids_to_tokens(extra)
    _, tokenizer = load(DEMO24, tokenizer_config={"eos_token": token, "trust_remote_code": True})
    assert extra in tokenizer.eos_token_ids  # added to the checkpoint's end-of-turn tokens, as in mlx-lm
    assert set(plain.eos_token_ids) <= set(tokenizer.eos_token_ids)
    _, positional = load(DEMO24, {"eos_token": token})  # mlx-lm's second positional argument
    assert extra in positional.eos_token_ids


def test_load_takes_mlx_lm_lazy_return_config_and_trust_remote_code(demo):
    model, tokenizer, config = load(DEMO24, lazy=False, return_config=True, trust_remote_code=True)
    assert config == json.loads((DEMO24 / "config.json").read_text())
    assert generate(model, tokenizer, "hi", **FAST) == generate(*demo, "hi", **FAST)
    assert "config.json" in one_line(CheckpointError, load, DEMO24, model_config={"vocab_size": 8})


# -- from mlx_dgemma import convert; convert(repo, quantize=True) -----------------------------------------------


def test_convert_package_is_callable_as_mlx_lm_convert(tmp_path):
    from mlx_dgemma import convert
    from mlx_dgemma.convert import ConvertError, ConvertResult

    result = convert(
        str(DEFAULT_MODEL),
        mlx_path=str(tmp_path / "q4"),
        quantize=True,
        q_bits=4,
        q_group_size=64,
        progress=False,
    )
    assert isinstance(result, ConvertResult)
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    assert isinstance(generate(*load(tmp_path / "q4"), "hi", **FAST), str)
    assert "upload" in one_line(ConvertError, convert, str(DEFAULT_MODEL), tmp_path / "x", upload_repo="me/x")
    assert "affine" in one_line(ConvertError, convert, str(DEFAULT_MODEL), tmp_path / "x", q_mode="mxfp4")
    convert(
        str(DEFAULT_MODEL), tmp_path / "y", upload_repo=None, dequantize=False, progress=False
    )  # defaults
    assert not (tmp_path / "x").exists()


def test_convert_command_line_still_runs():
    out = subprocess.run(
        [sys.executable, "-m", "mlx_dgemma.convert", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--hf-path" in out.stdout


# -- mlx-vlm's image=[...] and the Python API's temperature= ---------------------------------------------------


def test_image_keyword_is_images(demo, tmp_path):
    from PIL import Image

    pixels = np.full((32, 40, 3), 128, np.uint8)
    path = tmp_path / "grey.png"
    Image.fromarray(pixels).save(path)
    expected = generate(*demo, "Describe the image.", images=[pixels], **FAST)
    assert generate(*demo, "Describe the image.", image=[str(path)], **FAST) == expected
    assert generate(*demo, "Describe the image.", image=str(path), **FAST) == expected  # one path, as mlx-vlm
    assert generate(*demo, "Describe the image.", images=pixels, **FAST) == expected
    assert generate(*demo, "Describe the image.", [str(path)], **FAST) == expected  # mlx-vlm's 4th positional
    assert "image=" in one_line(
        GenerationError, generate, *demo, "hi", image=[pixels], images=[pixels], **FAST
    )


@pytest.mark.parametrize("temperature", [0.6, 0])
def test_temperature_maps_as_the_cli_and_server_do(demo, temperature):
    model, _ = demo
    t_max, t_min = temperature_schedule(model, temperature)
    assert t_max == max(temperature, MIN_TEMPERATURE)
    assert generate(*demo, "hi", temperature=temperature, **FAST) == generate(
        *demo, "hi", t_max=t_max, t_min=t_min, **FAST
    )


def test_temperature_with_a_schedule_is_one_line(demo):
    message = one_line(GenerationError, generate, *demo, "hi", temperature=0.5, t_max=0.5, **FAST)
    assert "temperature" in message and "t_max" in message


def test_server_maps_temperature_with_the_same_function(demo):
    from mlx_dgemma.server import protocol

    model, _ = demo
    request = protocol.ChatRequest(messages=[{"role": "user", "content": "hi"}], temperature=0)
    opts = protocol.schedule(request, model)
    assert (opts["t_max"], opts["t_min"]) == temperature_schedule(model, 0)


# -- the CLI: --image a.jpg b.jpg, --enable-thinking -----------------------------------------------------------


def test_image_flag_takes_several_paths_and_repeats():
    args = build_parser().parse_args(["--image", "a.jpg", "b.jpg", "--image", "c.jpg", "--prompt", "x"])
    assert args.image == ["a.jpg", "b.jpg", "c.jpg"]


def test_enable_thinking_flag_is_thinking():
    assert build_parser().parse_args(["--enable-thinking"]).thinking is True
    assert build_parser().parse_args([]).thinking is False


# -- the README's own imports ----------------------------------------------------------------------------------


def test_readme_imports_exist():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    imports = [
        ast.unparse(node)
        for block in blocks
        for node in ast.walk(ast.parse(block))
        if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlx_dgemma"))
        or (isinstance(node, ast.Import) and any(a.name.startswith("mlx_dgemma") for a in node.names))
    ]
    assert imports
    for line in imports:
        exec(line, {})
