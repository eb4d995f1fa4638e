"""The untrained skeleton that ``demo.train`` trains into the embedded model, built with the reference.

The real DiffusionGemma architecture (encoder-decoder sharing one set of weights, 5 sliding + 1 full attention layers,
k=v full layers with proportional RoPE, dense MLP + mixture of experts, self-conditioning, a tiny Gemma 4 vision
tower) at a tiny size, in the layout of the released ``google/diffusiongemma-26B-A4B-it`` (``global_head_dim`` /
``num_global_key_value_heads`` in config.json, no ``per_layer_config``), with a byte-level BPE tokenizer and a
Gemma-style chat template. Its weights are random but well-conditioned (norms and scales around a trained model's
magnitudes). ``demo.train`` calls these functions with its own sizes and a tokenizer corpus of its task plus the
built-in English + code one here, then trains the skeleton.

Pure torch + transformers (the reference, ``transformers==5.23.0``) + tokenizers: this module never imports mlx.
Deterministic (fixed seeds).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import (
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

SEED = 0
DTYPE = torch.bfloat16  # as the released checkpoint

# --- tokenizer -----------------------------------------------------------------------------------------------------
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
# Multiples of 64 wherever a weight's last dimension is, so that it quantizes with group size 64. The caller adds
# the vocabulary size (its tokenizer's) and may override the rest.
TEXT = {
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


def train_tokenizer(corpus: list[str], vocab_size: int) -> Tokenizer:
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


def build_config(text: dict, canvas_length: int) -> DiffusionGemmaConfig:
    # global_head_dim / num_global_key_value_heads go in as kwargs: __post_init__ turns them into per_layer_config.
    return DiffusionGemmaConfig(
        text_config=DiffusionGemmaTextConfig(**text),
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


def build_model(text: dict, canvas_length: int) -> DiffusionGemmaForBlockDiffusion:
    """The skeleton (``text``: a full text config, e.g. ``TEXT`` with a vocabulary size), seeded random weights."""
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
