"""Chat templates: a conversation -> the prompt text a chat model was trained on.

A chat template is Jinja2 source shipped with the model (a GGUF file's `tokenizer.chat_template`,
a transformers directory's `chat_template.jinja`). It is code from the internet, so it renders in
Jinja's immutable sandbox, set up as transformers' `apply_chat_template` sets it up (trim_blocks,
lstrip_blocks, loop controls, a `{% generation %}` block, `raise_exception`, `strftime_now`, a
`tojson` that does not escape HTML, a `namespace` that refuses underscore names) and given the same
variables (`messages`, `tools`, `documents`, `add_generation_prompt`, the special token strings),
so the prompt is the same string, character for character.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

MIN_JINJA = (3, 1, 6)  # older releases have known sandbox escapes


class ChatTemplateError(ValueError):
    """A template that does not compile, or that refuses a conversation (`raise_exception`)."""


def _plain(value: Any) -> Any:
    """Rebuild what the template sees from plain JSON-like types; anything else becomes an inert
    placeholder naming its type, so no object's methods are reachable from the sandbox."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (bool, str, int, float):  # subclasses (enums, numpy scalars) back to the base type
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _plain(value.item())
    return f"<{type(value).__name__}>"


@lru_cache(maxsize=16)
def _compile(template: str):
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2 >= 3.1.6: pip install 'jinja2>=3.1.6'") from None
    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < MIN_JINJA:
        raise ImportError(f"chat templates need jinja2 >= 3.1.6 (sandbox fixes), found {jinja2.__version__}")

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks the assistant's text; it renders as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # jinja's own signature trick, so namespace(self=...) works
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")

    class Dict:
        """`dict(...)` and `dict.fromkeys(...)`, without the type's other attributes."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       dict=Dict(), namespace=Namespace)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e.message} (line {e.lineno})") from None


def apply_chat_template(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                        tools: list[dict] | None = None, documents: list[dict] | None = None,
                        **variables: Any) -> str:
    """The prompt for `messages` ([{"role": "user", "content": "..."}, ...]).

    add_generation_prompt: end with the header of the assistant's next turn. variables: anything else
    the template reads, such as `bos_token` / `eos_token` (see `template_tokens`). Keys whose value is
    None are dropped from each message, as transformers does.
    """
    if not isinstance(template, str) or not template:
        raise ChatTemplateError("no chat template: the model ships none; pass one")
    compiled = _compile(template)  # first: it says clearly when jinja2 is missing or too old
    import jinja2

    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"messages[{i}] is a {type(m).__name__}, not a dict with 'role' and 'content'")
    chat = [_plain({k: v for k, v in m.items() if v is not None}) for m in messages]
    try:
        return compiled.render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                                         add_generation_prompt=add_generation_prompt, **_plain(variables))
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template refused the conversation: {e}") from None


def template_tokens(tokenizer) -> dict[str, str]:
    """`bos_token`, `eos_token` and `pad_token` strings of a polymodal Tokenizer, the variables
    transformers hands every template (those it has)."""
    ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
    return {name: tokenizer.backend.id_to_token(i) for name, i in ids.items() if i is not None}


CHAT_TEMPLATE_FILE = "chat_template.jinja"


def read_chat_template(directory: Path) -> str | None:
    """chat_template.jinja, or the `chat_template` string of a transformers tokenizer_config.json."""
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        return (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    return template if isinstance(template, str) else None


def write_chat_template(directory: Path, template: str | None) -> None:
    if template is not None:
        (directory / CHAT_TEMPLATE_FILE).write_text(template, encoding="utf-8")
