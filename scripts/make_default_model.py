"""Write a small, untrained DiffusionGemma checkpoint: the skeleton ``train_demo.py`` trains into the embedded model.

    python scripts/make_default_model.py OUT_DIR

The checkpoint has the real DiffusionGemma architecture (encoder-decoder sharing one set of weights, 5 sliding +
1 full attention layers, k=v full layers with proportional RoPE, dense MLP + mixture of experts, self-conditioning,
a tiny Gemma 4 vision tower) at a tiny size, in the layout of the released ``google/diffusiongemma-26B-A4B-it``
(``global_head_dim`` / ``num_global_key_value_heads`` in config.json, no ``per_layer_config``), with a small
byte-level BPE tokenizer trained here on a built-in English + code corpus, and a Gemma-style chat template.

Its weights are RANDOM (well-conditioned: random norms and scales around a trained model's magnitudes): it is
untrained. ``train_demo.py`` builds its skeleton with these functions, at its own sizes and with a tokenizer trained
on its task, then trains it.

Pure torch + transformers (the reference, ``transformers==5.23.0``) + tokenizers: this script never imports mlx.
Deterministic (fixed seeds) and quick (a few seconds). It ends by reloading what it wrote with transformers
(model, generate, tokenizer, chat template) and fails loudly if anything is off.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
    AutoTokenizer,
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaTextConfig,
    TokenizersBackend,
)
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    EntropyBoundSamplerConfig,
)
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import (
    DiffusionGemmaRMSNorm,
    DiffusionGemmaTextExperts,
    DiffusionGemmaTextRouter,
)
from transformers.models.gemma4 import Gemma4VisionConfig
from transformers.utils import logging as hf_logging

SEED = 0
DTYPE = torch.bfloat16  # as the released checkpoint; float32 would make the folder ~10 MB

# --- tokenizer -----------------------------------------------------------------------------------------------------
VOCAB_SIZE = 2048
# Index = token id. The chat template emits <bos> itself; <end_of_turn> closes every turn (an EOS, with <eos>).
SPECIAL_TOKENS = [
    "<pad>",  # 0
    "<eos>",  # 1
    "<bos>",  # 2
    "<unk>",  # 3
    "<start_of_turn>",  # 4
    "<end_of_turn>",  # 5
    "<start_of_thought>",  # 6
    "<end_of_thought>",  # 7
    "<start_of_image>",  # 8: boi_token_id
    "<end_of_image>",  # 9: eoi_token_id
    "<image_soft_token>",  # 10: image_token_id
]
TOKEN_ID = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
PAD_ID, EOS_ID, BOS_ID = TOKEN_ID["<pad>"], TOKEN_ID["<eos>"], TOKEN_ID["<bos>"]
EOS_IDS = [EOS_ID, TOKEN_ID["<end_of_turn>"]]

# Gemma-style turns. The system prompt gets its own turn. Thinking: with enable_thinking the generation prompt opens
# a thought block (the model thinks, closes it, then answers); without (the default) it is an empty, closed block.
# Thoughts in earlier model turns are dropped, as Gemma's templates do.
CHAT_TEMPLATE = """\
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['role'] in ['assistant', 'model'] -%}
        {%- set role = 'model' -%}
    {%- elif message['role'] in ['system', 'user'] -%}
        {%- set role = message['role'] -%}
    {%- else -%}
        {{- raise_exception("unknown role '" + message['role'] + "': use system, user or assistant") -}}
    {%- endif -%}
    {%- set ns = namespace(text='') -%}
    {%- if message['content'] is string -%}
        {%- set ns.text = message['content'] -%}
    {%- elif message['content'] is not none -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] == 'text' -%}
                {%- set ns.text = ns.text + part['text'] -%}
            {%- else -%}
                {{- raise_exception("only text content is supported, got a '" + part['type'] + "' part") -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {%- set text = ns.text -%}
    {%- if role == 'model' and '<end_of_thought>' in text -%}
        {%- set text = text.split('<end_of_thought>')[-1] -%}
    {%- endif -%}
    {{- '<start_of_turn>' + role + '\\n' + text | trim + '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\\n' -}}
    {%- if enable_thinking is defined and enable_thinking -%}
        {{- '<start_of_thought>' -}}
    {%- else -%}
        {{- '<start_of_thought><end_of_thought>' -}}
    {%- endif -%}
{%- endif -%}
"""

# --- model ---------------------------------------------------------------------------------------------------------
# Multiples of 64 wherever a weight's last dimension is, so that it quantizes with group size 64.
TEXT = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 6,  # 5 sliding + 1 full, as the released 5:1 pattern
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_global_key_value_heads": 1,
    "head_dim": 32,
    "global_head_dim": 64,
    "num_experts": 8,
    "top_k_experts": 2,
    "moe_intermediate_size": 64,
    "sliding_window": 128,
    "max_position_embeddings": 8192,
    "use_bidirectional_attention": "vision",
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_IDS,
}
CANVAS_LENGTH = 32
TINY_VISION = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "patch_size": 4,
    "pooling_kernel_size": 2,
    "position_embedding_size": 64,
}
# The released sampler defaults, as the reference writes them.
GENERATION = {
    "max_denoising_steps": 48,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "bos_token_id": BOS_ID,
    "pad_token_id": PAD_ID,
    "eos_token_id": EOS_IDS,
}
ENTROPY_BOUND = 0.1
# Embedding std = gain / sqrt(hidden): logits (tied lm_head) of std ~ gain, far below the soft-cap 30.
EMBED_GAIN = 3.0
ROUTER_STD = 1.0  # the router scales its input by hidden**-0.5: unit-std projections give O(1) expert scores

# --- corpus --------------------------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return text.split()


NOUNS = words("""time year people way day man woman child world life hand part place case week company system program
question work government number night point home water room mother area money story fact month lot right study
book eye job word business issue side kind head house service friend father power hour game line end member law
car city community name president team minute idea kid body information back parent face others level office door
health person art war history party result change morning reason research girl guy moment air teacher force
education river mountain forest ocean sea island garden flower tree bird fish horse dog cat computer phone screen
keyboard window file folder network server client database table query function variable value list array string
method class object module package library framework model token sentence paragraph language poem song music
picture camera light sun moon star sky cloud rain snow wind storm summer winter spring autumn bread coffee tea
apple orange kitchen recipe dinner breakfast lunch street road bridge train plane ship market shop price
village castle valley desert beach harbor lighthouse meadow canyon glacier volcano planet galaxy telescope
microscope battery engine machine robot signal message letter journal diary chapter novel theater museum
hospital doctor student lesson exam homework puzzle riddle secret treasure journey adventure dragon wizard
candle lantern blanket pillow mirror clock calendar holiday birthday festival concert painting sculpture""")
VERBS = words("""wrote read built found made took gave saw knew thought told asked used moved opened closed started
finished called tried left kept brought learned changed followed stopped created spoke watched helped played
walked carried painted fixed cooked cleaned counted measured tested checked loaded saved sorted printed parsed
compiled deployed trained answered explained described remembered forgot noticed enjoyed visited discovered""")
BASE_VERBS = words("""write read build find make take give see know think tell ask use move open close start finish
call try keep bring learn change follow stop create speak watch help play walk carry paint fix cook clean count
measure test check load save sort print parse compile deploy train answer explain describe remember notice enjoy
visit discover return compute update install configure debug refactor import export render""")
ADJECTIVES = words("""good new first last long great little own other old right big high different small large next early
young important few public bad same able quiet bright dark warm cold blue green red white black golden silver
simple complex fast slow careful happy sad strange beautiful gentle heavy light empty full open closed tiny huge
ancient modern clever curious brave calm busy clean fresh sharp soft""")
ADVERBS = words("""quickly slowly carefully quietly easily often always never sometimes usually really almost already
together finally suddenly gently clearly simply nearly""")
NAMES = words("""Alice Bob Carol David Emma Frank Grace Henry Iris Jack Karen Leo Maya Noah Olivia Paul Quinn Rosa Sam
Tara""")
PLACES = words("""Paris London Tokyo Berlin Rome Madrid Lisbon Cairo Delhi Sydney Toronto Chicago Boston Seattle Oslo
Vienna Prague Dublin Athens Kyoto""")
SENTENCES = [
    "The {adj} {noun} {verb} the {noun2} {adv}.",
    "{name} {verb} a {adj} {noun} in {place}.",
    "Yesterday {name} and {name2} {verb} the {noun} together.",
    "Why is the {noun} so {adj}?",
    "How do I {base} a {adj} {noun}?",
    "Can you {base} the {noun} for me, please?",
    "I think the {noun} is {adj}, but the {noun2} is {adj2}.",
    "In {place}, the {noun} is always {adj} in the {season}.",
    "Here is a {adj} {noun} that {verb} the {noun2}.",
    "Sure! To {base} the {noun}, first {base2} the {noun2}.",
    "Thank you for the {adj} {noun}.",
    "{name} asked: what is the best way to {base} a {noun}?",
    "There are {num} {noun}s in the {adj} {noun2}.",
    "The answer is {num}, because {num2} plus {num3} is {num}.",
    "Step {num}: {base} the {noun} and {base2} the result.",
    "It was a {adj} {season} day, and the {noun} {verb} {adv}.",
    "Write a short poem about the {adj} {noun}.",
    "Explain why the {noun} {verb} the {noun2}.",
    "Let me {base} that for you.",
    "The {noun} of the {noun2} is {adj} and {adj2}.",
]
PROSE = """\
The sea was calm that morning. Small waves touched the sand, and the gulls called over the water.
A haiku about the sea: waves fold into foam, the tide forgets its own name, salt wind keeps the time.
Rain fell on the old city all night, and in the morning the streets were bright and clean.
To make bread, mix flour, water, salt and yeast, let the dough rise, then bake it until it is golden.
The sky is blue because air scatters short wavelengths of sunlight more than long ones.
Water boils at one hundred degrees Celsius at sea level, and at a lower temperature on a high mountain.
A good answer is short, correct and kind. If you are not sure, say so, and explain what you know.
Once upon a time, a curious fox lived at the edge of a quiet forest, next to a river full of fish.
The train left the station at noon and crossed the long bridge over the river before the storm arrived.
Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the leaves of plants.
Hello! How can I help you today? I can answer questions, write stories, explain code, or summarise text.
First, read the question carefully. Second, think about what is being asked. Third, write a clear answer.
The library opens at nine in the morning and closes at six in the evening, except on Sundays.
Sorting a list means putting its items in order, for example from the smallest number to the largest one.
A function takes some inputs, does a little work, and returns a value; a good function does one thing well.
The museum downtown shows paintings, sculptures and photographs from many countries and centuries.
Every autumn the leaves turn yellow, orange and red, and the village holds a harvest festival.
To install the package, create a virtual environment, activate it, and run the install command.
If the tests fail, read the error message, find the line that raised it, and fix the smallest thing first.
The recipe needs two eggs, a cup of milk, a spoon of sugar and a pinch of salt; whisk them together.
Astronomers use telescopes to study planets, stars and galaxies that are millions of years away.
Dear friend, thank you for your letter. I hope you are well and that the weather is kind to you.
"""
IDENTIFIERS = words("""data items result value values total count index key keys name names path text line lines
token tokens model config args kwargs output buffer cache size width height score scores batch step steps
logits weights mask prompt answer user message messages request response""")
CODE_TEMPLATES = [
    'def {fn}({a}, {b}):\n    """{Base} the {noun} and return the {noun2}."""\n    {c} = {a} + {b}\n    return {c}\n',
    "def {fn}({a}):\n    {b} = []\n    for {c} in {a}:\n        if {c} is not None:\n            {b}.append({c})\n"
    "    return {b}\n",
    "class {Cls}:\n    def __init__(self, {a}):\n        self.{a} = {a}\n\n    def {fn}(self):\n"
    "        return len(self.{a})\n",
    'for i in range({num}):\n    print(f"{{i}}: {{{a}[i]}}")\n',
    'import json\nwith open("{a}.json") as f:\n    {b} = json.load(f)\n',
    'if {a} > {num}:\n    raise ValueError("{a} is too large")\nelse:\n    {b} = {a} * 2\n',
    '{a} = {{"{b}": {num}, "{c}": [{num2}, {num3}], "{noun}": true}}\n',
    "function {fn}({a}, {b}) {{\n  const {c} = {a}.map((x) => x * {b});\n  return {c};\n}}\n",
    "$ pip install {noun}\n$ python -m {noun}.{fn} --{a} {num}\n",
    "# {Base} the {noun}\n\n- {base2} the {noun2}\n- check the {a}\n\n```python\n{a} = {fn}({b})\n```\n",
    "SELECT {a}, {b} FROM {noun}s WHERE {c} > {num} ORDER BY {a};\n",
    'assert {fn}({a}) == {num}, "{a} should be {num}"\n',
    '{{"role": "user", "content": "{Base} the {noun}."}}\n',
]


def build_corpus(seed: int) -> list[str]:
    """A few thousand lines of English and code, from the templates above (deterministic for a seed)."""
    rng = random.Random(seed)

    def fill(template: str) -> str:
        nouns, bases = rng.sample(NOUNS, 2), rng.sample(BASE_VERBS, 2)
        names, adjs, idents = rng.sample(NAMES, 2), rng.sample(ADJECTIVES, 2), rng.sample(IDENTIFIERS, 3)
        nums = [
            str(rng.choice([rng.randint(0, 9), rng.randint(10, 99), rng.randint(100, 9999)]))
            for _ in range(3)
        ]
        fn = f"{bases[0]}_{rng.choice(IDENTIFIERS)}"
        return template.format(
            noun=nouns[0],
            noun2=nouns[1],
            verb=rng.choice(VERBS),
            base=bases[0],
            base2=bases[1],
            Base=bases[0].capitalize(),
            adj=adjs[0],
            adj2=adjs[1],
            adv=rng.choice(ADVERBS),
            name=names[0],
            name2=names[1],
            place=rng.choice(PLACES),
            season=rng.choice(["spring", "summer", "autumn", "winter"]),
            num=nums[0],
            num2=nums[1],
            num3=nums[2],
            a=idents[0],
            b=idents[1],
            c=idents[2],
            fn=fn,
            Cls="".join(part.capitalize() for part in fn.split("_")),
        )

    lines = PROSE.splitlines()
    lines += [fill(rng.choice(SENTENCES)) for _ in range(3000)]
    lines += [fill(rng.choice(CODE_TEMPLATES)) for _ in range(800)]
    lines += [" ".join(rng.sample(NOUNS + VERBS + ADJECTIVES + BASE_VERBS, 12)) for _ in range(500)]
    return lines


def train_tokenizer(corpus: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE (digits split one by one, as Gemma does), <bos> prepended to raw text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
            ),
        ]
    )
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"tokenizer has {tok.get_vocab_size()} tokens, not {vocab_size}: enlarge the corpus"
        )
    for token, idx in TOKEN_ID.items():
        if tok.token_to_id(token) != idx:
            raise RuntimeError(f"special token {token} has id {tok.token_to_id(token)}, expected {idx}")
    return tok


def save_tokenizer(tok: Tokenizer, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and chat_template.jinja."""
    wrapped = TokenizersBackend(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=TEXT["max_position_embeddings"],
        padding_side="left",  # batched generation pads on the left
        chat_template=CHAT_TEMPLATE,
    )
    wrapped.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    # transformers 5 writes its own class name; this older alias loads in transformers 4 and 5 alike.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def build_config(text: dict | None = None, canvas_length: int = CANVAS_LENGTH) -> DiffusionGemmaConfig:
    # global_head_dim / num_global_key_value_heads go in as kwargs: __post_init__ turns them into per_layer_config.
    return DiffusionGemmaConfig(
        text_config=DiffusionGemmaTextConfig(**(text or TEXT)),
        vision_config=Gemma4VisionConfig(**TINY_VISION),
        boi_token_id=TOKEN_ID["<start_of_image>"],
        eoi_token_id=TOKEN_ID["<end_of_image>"],
        image_token_id=TOKEN_ID["<image_soft_token>"],
        canvas_length=canvas_length,
    )


def uniform_(tensor: torch.Tensor, gen: torch.Generator, scale: float = 1.0) -> None:
    """U(0.5, 1.5) * scale: random, around the magnitude of a trained model's norms and scales."""
    tensor.copy_((torch.rand(tensor.shape, generator=gen) + 0.5) * scale)


def normal_(tensor: torch.Tensor, gen: torch.Generator, std: float) -> None:
    tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)


@torch.no_grad()
def randomise_(model: DiffusionGemmaForBlockDiffusion, gen: torch.Generator) -> None:
    """Well-conditioned random text weights, in place (the encoder shares the decoder's Parameters).

    Attention scaling is 1.0 in DiffusionGemma: q/k norm weights around head_dim**-0.25 keep the attention scores
    O(1) rather than O(head_dim). Vision weights keep their (seeded) default init.
    """
    decoder = model.model.decoder
    for name, module in decoder.named_modules():
        if isinstance(module, DiffusionGemmaRMSNorm) and module.with_scale:
            is_qk = name.endswith(("q_norm", "k_norm"))
            uniform_(module.weight, gen, module.weight.numel() ** -0.25 if is_qk else 1.0)
        elif isinstance(module, DiffusionGemmaTextRouter):
            uniform_(module.scale, gen)
            uniform_(module.per_expert_scale, gen)
        elif isinstance(module, DiffusionGemmaTextExperts):
            normal_(module.gate_up_proj, gen, module.hidden_dim**-0.5)
            normal_(module.down_proj, gen, module.intermediate_dim**-0.5)
        elif isinstance(module, nn.Embedding):
            normal_(module.weight, gen, EMBED_GAIN * module.embedding_dim**-0.5)
        elif isinstance(module, nn.Linear):
            std = ROUTER_STD if name.endswith("router.proj") else module.in_features**-0.5
            normal_(module.weight, gen, std)
    # layer_scalar is a per-side buffer, not tied.
    for layers in (decoder.layers, model.model.encoder.language_model.layers):
        for layer in layers:
            uniform_(layer.layer_scalar, gen)


def build_model(
    text: dict | None = None, canvas_length: int = CANVAS_LENGTH
) -> DiffusionGemmaForBlockDiffusion:
    torch.manual_seed(SEED)  # the default init (vision tower) draws from the global generator
    model = DiffusionGemmaForBlockDiffusion(build_config(text, canvas_length)).eval()
    randomise_(model, torch.Generator().manual_seed(SEED))
    model.generation_config = DiffusionGemmaGenerationConfig(
        **GENERATION, sampler_config=EntropyBoundSamplerConfig(entropy_bound=ENTROPY_BOUND)
    )
    return model.to(DTYPE)


def write_released_config(path: Path) -> None:
    """Rewrites config.json the way the released checkpoint names the full-attention overrides."""
    config = json.loads(path.read_text())
    text = config["text_config"]
    overrides = list(text.pop("per_layer_config").values())
    if any(override != overrides[0] for override in overrides):
        raise ValueError(f"full-attention layers differ, no released form for {overrides}")
    text["global_head_dim"] = overrides[0]["head_dim"]
    text["num_global_key_value_heads"] = overrides[0]["num_key_value_heads"]
    config.update(bos_token_id=BOS_ID, pad_token_id=PAD_ID, eos_token_id=EOS_IDS)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def count_parameters(model: DiffusionGemmaForBlockDiffusion) -> tuple[int, int]:
    """(text parameters, vision parameters), shared weights counted once."""
    text = vision = 0
    for name, param in model.named_parameters():  # named_parameters() yields tied parameters once
        if "vision" in name:
            vision += param.numel()
        else:
            text += param.numel()
    return text, vision


MODEL_CARD = """\
---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags:
- diffusion_gemma
- untrained
- placeholder
---

# mlx_dgemma embedded default model (UNTRAINED)

**This model is untrained: its weights are random and its output is gibberish.** It is a placeholder with the
real DiffusionGemma architecture at a tiny size, shipped inside `mlx_dgemma` so that `mlx_dgemma.generate`, the
Python API and the tests run the whole path (tokenizer, chat template, encoder, denoising loop, streaming) on a
fresh machine with no network. For real answers, use `google/diffusiongemma-26B-A4B-it` (`--model ...`).

## What it is

A `DiffusionGemmaForBlockDiffusion` checkpoint (`model_type: diffusion_gemma`, transformers 5.23) in the
layout of the released `google/diffusiongemma-26B-A4B-it`: `config.json` names `global_head_dim` and
`num_global_key_value_heads` (no `per_layer_config`), weights in one `model.safetensors` ({dtype}, tied
embeddings stored once; the released weights are sharded), sampler defaults in `generation_config.json`.

| | this model | released 26B-A4B |
|---|---|---|
| hidden size | {hidden_size} | 2816 |
| layers | {num_hidden_layers} ({n_sliding} sliding + {n_full} full) | 30 (25 + 5) |
| attention heads / kv heads (sliding) / kv heads (full, k=v) | {num_attention_heads} / {num_key_value_heads} / {num_global_key_value_heads} | 16 / 8 / 2 |
| head_dim / global_head_dim | {head_dim} / {global_head_dim} | 256 / 512 |
| dense MLP intermediate | {intermediate_size} | 2112 |
| experts, top-k, expert intermediate | {num_experts}, top-{top_k_experts}, {moe_intermediate_size} | 128, top-8, 704 |
| vocabulary | {vocab_size} | 262144 |
| sliding window | {sliding_window} | 1024 |
| max positions | {max_position_embeddings} | 262144 |
| canvas length | {canvas_length} | 256 |
| parameters | {text_params:,} text + {vision_params:,} vision | ~26B |

Every weight dimension that a quantizer groups is a multiple of 64, so the model can be quantized with group
size 64. The vision tower is a tiny Gemma 4 vision config (present in the weights because the real checkpoint
has one; text-only runtimes skip it). Weights are random but well-conditioned: normal projections with std
`fan_in**-0.5`, norms and scales uniform in [0.5, 1.5], and `q_norm`/`k_norm` weights scaled by
`head_dim**-0.25` (DiffusionGemma's attention has no `1/sqrt(d)` scaling).

## Tokenizer

Byte-level BPE ({vocab_size} tokens, digits split one by one) trained with the `tokenizers` library on a small
English + code corpus that the script generates from built-in templates. It round-trips any UTF-8 text.
Tokenizing raw text prepends `<bos>` (`add_special_tokens=True`, the default).

| id | token | role |
|---|---|---|
{special_table}

`eos_token_id` is `[1, 5]` (`<eos>` and `<end_of_turn>`) in `config.json` and `generation_config.json`;
`bos_token_id` 2, `pad_token_id` 0; image tokens: `boi_token_id` 8, `eoi_token_id` 9, `image_token_id` 10.

## Chat template

Gemma style (`chat_template.jinja`, and the same text in `tokenizer_config.json`). The template writes `<bos>`
itself, so **tokenize its output with `add_special_tokens=False`** (or use `apply_chat_template(...,
tokenize=True)`), else the prompt starts with two `<bos>`.

- Roles: `system`, `user`, `assistant` (rendered as `model`). Each message is a turn
  `<start_of_turn>ROLE\\n` + content (trimmed) + `<end_of_turn>\\n`; content is a string or a list of
  `{{"type": "text"}}` parts.
- **System prompt**: its own `system` turn, where it appears (Gemma 4 style; Gemma 3 folded it into the first
  user turn instead).
- `add_generation_prompt=True` appends `<start_of_turn>model\\n` and a thought block:
  - `enable_thinking=True`: `<start_of_thought>` (an open block: the model thinks, writes `<end_of_thought>`,
    then answers);
  - `enable_thinking=False` or absent (the default): `<start_of_thought><end_of_thought>` (an empty, closed
    block: the model answers directly).
- Thoughts in earlier `assistant` turns (up to `<end_of_thought>`) are dropped.

Example, system prompt + user message, `add_generation_prompt=True`, thinking off:

```
{example}
```

## Generation defaults (`generation_config.json`)

The released sampler settings: `max_denoising_steps` 48, `t_min` 0.4, `t_max` 0.8, entropy-bound sampler with
`entropy_bound` 0.1, `stability_threshold` 1, `confidence_threshold` 0.005.

## How it was made

`python scripts/make_default_model.py` in the `mlx_dgemma` repository (torch + transformers 5.23 + tokenizers,
no network, a few seconds), seed {seed}: it writes the corpus, trains the tokenizer, builds the model with the
reference implementation, draws the weights, saves everything and checks that transformers reloads it and
generates. Re-running it reproduces this folder.

## License

Apache-2.0.
"""


def write_model_card(out: Path, model: DiffusionGemmaForBlockDiffusion, example: str) -> None:
    text_params, vision_params = count_parameters(model)
    layer_types = model.config.text_config.layer_types
    special_roles = {
        "<pad>": "padding",
        "<eos>": "end of sequence (EOS)",
        "<bos>": "beginning of sequence",
        "<unk>": "unknown (unused by byte-level BPE)",
        "<start_of_turn>": "opens a chat turn",
        "<end_of_turn>": "closes a chat turn (EOS)",
        "<start_of_thought>": "opens a thought block",
        "<end_of_thought>": "closes a thought block",
        "<start_of_image>": "begin of image",
        "<end_of_image>": "end of image",
        "<image_soft_token>": "image placeholder",
    }
    table = "\n".join(
        f"| {i} | `{token}` | {special_roles[token]} |" for i, token in enumerate(SPECIAL_TOKENS)
    )
    card = MODEL_CARD.format(
        **TEXT,
        canvas_length=CANVAS_LENGTH,
        dtype=str(DTYPE).removeprefix("torch."),
        n_sliding=layer_types.count("sliding_attention"),
        n_full=layer_types.count("full_attention"),
        text_params=text_params,
        vision_params=vision_params,
        special_table=table,
        example=example.rstrip("\n"),
        seed=SEED,
    )
    (out / "README.md").write_text(card)


def check(out: Path) -> str:
    """Reload everything with transformers; return the chat-template example for the model card."""
    config = json.loads((out / "config.json").read_text())
    if "per_layer_config" in config["text_config"] or "global_head_dim" not in config["text_config"]:
        raise RuntimeError("config.json is not in the released form")

    tokenizer = AutoTokenizer.from_pretrained(out)
    sample = "Hello, world! def f(x):\n    return x * 42  # héllo 🌊 naïve"
    ids = tokenizer(sample)["input_ids"]
    if ids[0] != BOS_ID or tokenizer.decode(ids, skip_special_tokens=True) != sample:
        raise RuntimeError(f"tokenizer does not round-trip: {ids}")
    for token, idx in TOKEN_ID.items():
        if tokenizer.convert_tokens_to_ids(token) != idx:
            raise RuntimeError(f"{token} is not id {idx} after reload")
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}]
    rendered = {
        thinking: tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, enable_thinking=thinking
        )
        for thinking in (True, False)
    }
    if not rendered[True].endswith("model\n<start_of_thought>") or not rendered[False].endswith(
        "<start_of_thought><end_of_thought>"
    ):
        raise RuntimeError(f"chat template renders unexpectedly: {rendered}")
    prompt = tokenizer(rendered[False], add_special_tokens=False, return_tensors="pt")["input_ids"]
    if prompt[0, 0] != BOS_ID or (prompt == BOS_ID).sum() != 1:
        raise RuntimeError("the chat template must emit exactly one <bos>")

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(out).eval()
    if model.dtype != DTYPE:
        raise RuntimeError(f"reloaded as {model.dtype}, expected {DTYPE}")
    torch.manual_seed(SEED)
    with torch.no_grad():  # one canvas, few steps: the released 48 take ~25 s on a small CPU
        output = model.generate(prompt, max_new_tokens=CANVAS_LENGTH, max_denoising_steps=4)
    sequences = output.sequences if hasattr(output, "sequences") else output
    new = sequences[0, prompt.shape[1] :]
    print(f"generate: {len(new)} new tokens (gibberish, untrained): {tokenizer.decode(new)[:80]!r}")
    return rendered[False]


def digest(out: Path) -> str:
    h = hashlib.sha256()
    for file in sorted(out.iterdir()):
        if file.is_file() and file.name != "README.md":
            h.update(file.name.encode() + file.read_bytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, help="output folder")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # an earlier sharded save would confuse loaders

    save_tokenizer(train_tokenizer(build_corpus(SEED)), out)
    model = build_model()
    model.save_pretrained(out)
    write_released_config(out / "config.json")
    example = check(out)
    write_model_card(out, model, example)
    for file in out.iterdir():
        if file.is_file():
            file.chmod(0o644)  # save_pretrained writes the weights 0600; the folder ships as package data
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"{out}: {size / 1e6:.2f} MB, digest {digest(out)}, {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
