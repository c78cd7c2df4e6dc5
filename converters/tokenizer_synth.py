"""A synthetic Step-3-style tokenizer: byte-level BPE with Step-3's special tokens and chat template.

The real Step-3 tokenizer is DeepSeek-V3-derived (128K entries). A synthetic checkpoint needs one
that behaves the same way at the edges that matter to a runtime: byte-level (round-trips any text),
the same special-token strings, encoded atomically, and the same chat format. It is trained
deterministically on a small embedded English corpus, topped up with seeded pseudo-words so the
tokenizer fills the model's vocabulary (no embedding rows that decode to nothing).

Id layout: BOS 0, EOS 1, the trained byte-level vocabulary, then the other special tokens with
`<im_patch>` last, placed so its id equals the config's `image_token_id` when that fits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from converters.config import Step3Config
from converters.errors import ConfigError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
BOT, EOT, THINK, END_THINK = "<|BOT|>", "<|EOT|>", "<think>", "</think>"
IM_PATCH = "<im_patch>"
# Added after the trained vocabulary, in this order; <im_patch> last so it can land on image_token_id.
EXTRA_SPECIALS = (BOT, EOT, THINK, END_THINK, "<im_start>", "<im_end>", "<patch_start>", "<patch_end>",
                  "<patch_newline>", IM_PATCH)
N_BYTES = 256
MIN_VOCAB = 2 + N_BYTES + len(EXTRA_SPECIALS)

# Our own template in the Step-3 format (vLLM's step3 example prompt:
# "<BOS> system text <|BOT|>user\n...<|EOT|><|BOT|>assistant\n<think>\n"): a leading system message
# follows BOS directly, every other turn is `<|BOT|>role\ncontent<|EOT|>`, images become <im_patch>,
# and past assistant turns drop their reasoning (text up to </think>).
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content is not none -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}<im_patch>{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] == 'system' -%}{{ render(message['content']) }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set text = render(message['content']) -%}"
    "{%- if '</think>' in text -%}{%- set text = text.split('</think>')[-1].lstrip() -%}{%- endif -%}"
    "<|BOT|>assistant\n{{ text }}<|EOT|>"
    "{%- else -%}<|BOT|>{{ message['role'] }}\n{{ render(message['content']) }}<|EOT|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|BOT|>assistant\\n<think>\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class SynthTokenizer:
    """The trained tokenizer plus the ids the config must agree with."""

    tokenizer: Tokenizer
    special_ids: dict[str, int]

    @property
    def bos_id(self) -> int:
        return self.special_ids[BOS]

    @property
    def eos_id(self) -> int:
        return self.special_ids[EOS]

    @property
    def image_token_id(self) -> int:
        return self.special_ids[IM_PATCH]


def _corpus(n_pseudo_words: int) -> list[str]:
    """The embedded English lines, then seeded pseudo-words (12 a line) that give BPE enough merges."""
    text = resources.files("converters").joinpath("synth_corpus.txt").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip()]
    rng = random.Random(20250729)  # fixed: the tokenizer is the same for every seed and shard count
    cons = [*"bcdfghjklmnprstvwz", "ch", "sh", "th", "st", "tr", "pl", "br", "gr"]
    vowels = [*"aeiou", "ai", "ea", "ou", "io"]
    words = ["".join(rng.choice(cons) + rng.choice(vowels) for _ in range(rng.randint(1, 4)))
             + (rng.choice(cons) if rng.random() < 0.5 else "") for _ in range(n_pseudo_words)]
    return lines + [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]


def _trained_size(cfg: Step3Config) -> int:
    """How many entries (BOS, EOS, bytes, merges) to train so that <im_patch> lands on image_token_id."""
    if cfg.vocab_size < MIN_VOCAB:
        raise ConfigError(f"{cfg.source}: field 'vocab_size' ({cfg.vocab_size}) is too small for a synthetic "
                          f"byte-level tokenizer; use at least {MIN_VOCAB}")
    wanted = cfg.image_token_id - (len(EXTRA_SPECIALS) - 1)
    if wanted >= 2 + N_BYTES and cfg.image_token_id < cfg.vocab_size:
        return wanted
    return cfg.vocab_size - len(EXTRA_SPECIALS)


def build_tokenizer(cfg: Step3Config) -> SynthTokenizer:
    """Train (deterministically) a byte-level BPE that fits cfg.vocab_size, then add the special tokens."""
    size = _trained_size(cfg)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(n_pseudo_words=2 * size), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in EXTRA_SPECIALS])
    ids = {t: tok.token_to_id(t) for t in (BOS, EOS, *EXTRA_SPECIALS)}
    assert tok.get_vocab_size() <= cfg.vocab_size, (tok.get_vocab_size(), cfg.vocab_size)
    assert (ids[BOS], ids[EOS]) == (0, 1), ids
    return SynthTokenizer(tok, ids)


def tokenizer_config(cfg: Step3Config, st: SynthTokenizer) -> dict[str, Any]:
    """tokenizer_config.json: HF's PreTrainedTokenizerFast form with the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "add_bos_token": False,  # the chat template writes BOS itself
        "add_eos_token": False,
        "model_max_length": cfg.max_position_embedding,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False}
                                 for t, i in sorted(st.special_ids.items(), key=lambda kv: kv[1])},
        "chat_template": CHAT_TEMPLATE,
    }


def generation_config(st: SynthTokenizer) -> dict[str, Any]:
    """generation_config.json: generation stops at EOS or at the end of an assistant turn (<|EOT|>)."""
    return {
        "bos_token_id": st.bos_id,
        "eos_token_id": [st.eos_id, st.special_ids[EOT]],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.95,
    }
