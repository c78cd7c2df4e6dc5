"""ChatTokenizer on the synthetic step3-tiny checkpoint's tokenizer files, and the template sandbox."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from converters.config import Step3Config
from runtime.chat import ChatTokenizer, TokenizerError

BOS, EOS, BOT, EOT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<|BOT|>", "<|EOT|>"


@pytest.fixture(scope="module")
def tok(tiny_ckpt: Path) -> ChatTokenizer:
    return ChatTokenizer.from_pretrained(tiny_ckpt)


def with_template(tok: ChatTokenizer, template: str) -> ChatTokenizer:
    return ChatTokenizer(tok.tokenizer, template, bos_token=tok.bos_token, eos_token=tok.eos_token)


def copy_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


def test_special_ids_agree_with_config_and_generation_config(tok: ChatTokenizer, tiny_ckpt: Path) -> None:
    cfg = Step3Config.from_pretrained(tiny_ckpt)
    assert (tok.bos_token_id, tok.eos_token_id) == (cfg.bos_token_id, cfg.eos_token_id)
    assert tok.stop_token_ids[0] == tok.eos_token_id
    assert tok.tokenizer.token_to_id(EOT) in tok.stop_token_ids  # end of an assistant turn also stops
    assert tok.vocab_size <= cfg.vocab_size


@pytest.mark.parametrize("text", ["Hello, world!", "  two  spaces\nand a newline\t", "Grüße, 日本語 🙂"])
def test_encode_decode_round_trip(tok: ChatTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_encode_atomically_and_can_be_skipped(tok: ChatTokenizer) -> None:
    ids = tok.encode(f"{BOS}hi{EOT}")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.tokenizer.token_to_id(EOT)
    assert tok.encode("hi") == ids[1:-1]  # nothing is added around plain text
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == f"{BOS}hi{EOT}"


def test_chat_template_renders_the_step3_format(tok: ChatTokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is MFA?"},
                {"role": "assistant", "content": "secret plan</think> Shared K/V."},
                {"role": "user", "content": [{"type": "text", "text": "Thanks"}]}]
    prompt = tok.apply_chat_template(messages)
    assert prompt == (f"{BOS}Be brief.{BOT}user\nWhat is MFA?{EOT}{BOT}assistant\nShared K/V.{EOT}"
                      f"{BOT}user\nThanks{EOT}{BOT}assistant\n<think>\n")
    assert tok.apply_chat_template(messages[:2], add_generation_prompt=False).endswith(f"What is MFA?{EOT}")
    assert tok.encode_chat(messages) == tok.encode(prompt)


def test_hf_template_conveniences(tok: ChatTokenizer) -> None:
    template = ("{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
                "{{ m.role }}={{ m.content | tojson }};{% endfor %}{{ extra }}")
    rendered = with_template(tok, template).apply_chat_template(
        [{"role": "user", "content": "<b>&\"é"}, {"role": "skip", "content": "x"}], extra="!")
    assert rendered == 'user="<b>&\\"é";!'  # tojson does not HTML-escape; loop controls work; kwargs pass


def test_raise_exception_becomes_a_step3_error(tok: ChatTokenizer) -> None:
    strict = with_template(tok, "{% if messages[0].role != 'user' %}"
                                "{{ raise_exception('first must be user') }}{% endif %}ok")
    assert strict.apply_chat_template([{"role": "user", "content": "a"}]) == "ok"
    with pytest.raises(TokenizerError, match="first must be user"):
        strict.apply_chat_template([{"role": "assistant", "content": "a"}])


@pytest.mark.parametrize("template", ["{{ messages.append(1) }}", "{{ ''.__class__.__mro__ }}",
                                      "{{ cycler.__init__.__globals__ }}"])
def test_templates_are_sandboxed(tok: ChatTokenizer, template: str) -> None:
    with pytest.raises(TokenizerError, match="rejected"):
        with_template(tok, template).apply_chat_template([{"role": "user", "content": "a"}])


@pytest.mark.parametrize("messages", [[], "hello", [{"content": "no role"}], [{"role": 3}]])
def test_bad_messages_are_named(tok: ChatTokenizer, messages: object) -> None:
    with pytest.raises(TokenizerError, match="message"):
        tok.apply_chat_template(messages)  # type: ignore[arg-type]


def test_template_sources(tok: ChatTokenizer, tiny_ckpt: Path, tmp_path: Path) -> None:
    d = copy_tokenizer(tiny_ckpt, tmp_path / "t")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTokenizer.from_pretrained(d).apply_chat_template([{"role": "user", "content": ""}]) == "D"
    (d / "chat_template.jinja").write_text("J{{ messages | length }}")  # newer HF: the file wins
    assert ChatTokenizer.from_pretrained(d).apply_chat_template([{"role": "user", "content": ""}]) == "J1"


def test_missing_and_broken_files_are_named(tiny_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer.json: not found"):
        ChatTokenizer.from_pretrained(tmp_path)
    d = copy_tokenizer(tiny_ckpt, tmp_path / "t")
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<nope>"}))
    with pytest.raises(TokenizerError, match="'eos_token' is '<nope>'"):
        ChatTokenizer.from_pretrained(d)
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": 0}))
    with pytest.raises(TokenizerError, match="'bos_token' must be a token string"):
        ChatTokenizer.from_pretrained(d)
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": {"content": EOT}}))
    as_dict = ChatTokenizer.from_pretrained(d)  # the AddedToken form of a special token
    assert as_dict.eos_token == EOT and as_dict.eos_token_id == as_dict.tokenizer.token_to_id(EOT)
    del config["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="no chat template"):
        ChatTokenizer.from_pretrained(d).apply_chat_template([{"role": "user", "content": "a"}])
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{% if %}"}))
    with pytest.raises(TokenizerError, match="syntax error"):
        ChatTokenizer.from_pretrained(d).apply_chat_template([{"role": "user", "content": "a"}])
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizers file"):
        ChatTokenizer.from_pretrained(d)
