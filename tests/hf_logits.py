"""Decoder logits of a checkpoint folder by the reference (transformers), in its own process (no OpenBLAS
preload, no mlx): ``python tests/hf_logits.py IDS.npz OUT.npz FOLDER...`` (one process for several: importing torch is slow).
IDS holds ``prompt`` and ``canvas`` (int32, [1, L]); OUT gets ``<i>/logits`` and ``<i>/logits_sc``
(self-conditioned on the first) for the i-th folder."""

from __future__ import annotations

import sys

import numpy as np
import torch
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.cache_utils import DynamicCache


def logits(folder: str, prompt: torch.Tensor, canvas: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        cache = DynamicCache(config=model.config.get_text_config(decoder=True))
        model.model.encoder(input_ids=prompt, past_key_values=cache, use_cache=True)
        first = model(decoder_input_ids=canvas, past_key_values=cache).logits
        second = model(decoder_input_ids=canvas, past_key_values=cache, self_conditioning_logits=first).logits
    return first.numpy(), second.numpy()


def main(ids_file: str, out_file: str, *folders: str) -> None:
    ids = np.load(ids_file)
    prompt, canvas = (torch.from_numpy(ids[k]).long() for k in ("prompt", "canvas"))
    out = {}
    for i, folder in enumerate(folders):
        out[f"{i}/logits"], out[f"{i}/logits_sc"] = logits(folder, prompt, canvas)
    np.savez(out_file, **out)


if __name__ == "__main__":
    main(*sys.argv[1:])
