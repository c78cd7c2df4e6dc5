"""The checkpoint's tokenizer and chat template, as the runtime uses them (no `transformers` needed).

Reads what an HF checkpoint ships: `tokenizer.json` (the `tokenizers` library runs it),
`tokenizer_config.json` (bos/eos tokens, `chat_template`), optionally `chat_template.jinja` (newer HF
checkpoints keep the template there) and `generation_config.json` (extra stop ids, e.g. the end of an
assistant turn). Templates render in a sandboxed Jinja environment set up like HF's, so the templates
people publish behave the same here, and a template cannot reach Python internals.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from converters.errors import Step3Error


class TokenizerError(Step3Error):
    """The tokenizer files are missing or broken, or a chat template refused its input."""


def _raise_exception(message: str) -> None:
    """Templates call `raise_exception('...')` to reject input (HF exposes the same global)."""
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """HF's `tojson`: plain json.dumps (Jinja's own escapes <, > and & for HTML, which chat must not)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{file}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(config: dict[str, Any], field: str, file: Path) -> str | None:
    """bos_token/eos_token are a string or an AddedToken dict ({"content": ...}), or absent."""
    value = config.get(field)
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise TokenizerError(f"{file}: field '{field}' must be a token string, got {value!r}")
    return text


def _pick_template(value: Any, file: Path) -> str | None:
    """`chat_template` is one string, or a list of {name, template} from which HF uses 'default'."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
    raise TokenizerError(f"{file}: field 'chat_template' must be a string or a list of {{name, template}} "
                         f"with a 'default' entry")


class ChatTokenizer:
    """encode/decode text and render chat messages into the model's prompt format."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str | None = None, *,
                 bos_token: str | None = None, eos_token: str | None = None,
                 extra_stop_ids: Sequence[int] = (), source: str = "<tokenizer>"):
        self.tokenizer, self.chat_template, self.source = tokenizer, chat_template, source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = self._id_of(bos_token, "bos_token")
        self.eos_token_id = self._id_of(eos_token, "eos_token")
        stops = ([self.eos_token_id] if self.eos_token_id is not None else []) + list(extra_stop_ids)
        self.stop_token_ids: tuple[int, ...] = tuple(dict.fromkeys(stops))  # eos first, no repeats

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ChatTokenizer:
        """Load from a checkpoint directory (HF or AFD layout: both carry the tokenizer files verbatim)."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{file}: not found; the checkpoint must ship its tokenizer.json "
                                 f"(copy it from the original HF checkpoint)")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as e:  # the tokenizers library raises bare Exceptions for bad files
            raise TokenizerError(f"{file}: not a valid tokenizers file ({e})") from None
        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        template = _pick_template(config.get("chat_template"), config_file)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tokenizer, template, bos_token=_token_text(config, "bos_token", config_file),
                   eos_token=_token_text(config, "eos_token", config_file),
                   extra_stop_ids=_generation_stop_ids(path / "generation_config.json"), source=str(path))

    def _id_of(self, token: str | None, field: str) -> int | None:
        if token is None:
            return None
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.source}: tokenizer_config.json field '{field}' is {token!r}, "
                                 f"which is not in tokenizer.json's vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids. Special-token strings in the text become their ids; chat templates write BOS
        themselves, so nothing is added unless `add_special_tokens` (the tokenizer's post-processor)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        if not self.chat_template:
            raise TokenizerError(f"{self.source}: no chat template (tokenizer_config.json has no "
                                 f"'chat_template' and there is no chat_template.jinja); add one or send "
                                 f"plain completions instead of chat messages")
        try:
            return _environment().from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"{self.source}: the chat template has a syntax error at line {e.lineno}: "
                                 f"{e.message}") from None

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render [{role, content}, ...] into prompt text; extra kwargs (tools, ...) reach the template."""
        _check_messages(messages)
        try:
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template of {self.source} rejected the messages: {e}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """The prompt ids for a chat: the rendered template, encoded."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("chat messages must be a non-empty list of {'role': ..., 'content': ...} "
                             "objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise TokenizerError(f"chat message {i} must be an object with a string 'role', got {m!r}")


def _generation_stop_ids(file: Path) -> list[int]:
    """generation_config.json's eos_token_id (an int or a list), if the file is there."""
    if not file.is_file():
        return []
    value = _read_json(file).get("eos_token_id")
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TokenizerError(f"{file}: field 'eos_token_id' must be an integer or a list of integers")
    return ids
