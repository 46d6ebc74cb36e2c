"""Rendering a model's own chat template, and finding the text a model should learn in it.

Chat templates come from checkpoints, so they are untrusted code: they run in jinja2's immutable
sandbox, with the globals and filters Hugging Face templates expect (``raise_exception``,
``strftime_now``, a ``tojson`` that keeps non-ASCII text, ``trim_blocks``/``lstrip_blocks``, loop
controls, and the ``{% generation %}`` tag, rendered as its plain body).

Which characters are trained is found without any knowledge of the template's format: the
conversation up to message ``i`` rendered with the generation prompt ends where the assistant's
reply begins, and the conversation up to and including message ``i`` ends after its turn. Both
must be prefixes of the whole rendering (true of the usual templates, checked every time). The
span between them is the reply, its end-of-turn token and whatever the template writes after it
(Qwen's newline); the span is cut after its last end-of-turn token, so the model learns the
reply and when to stop, as the ``{% generation %}`` convention marks it.
"""

from datetime import datetime
import json

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kdtune.errors import KDTuneError


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body; masks are found by rendering."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def check_train_on(train_on: str) -> None:
    if train_on not in ("all", "last"):
        raise KDTuneError(f"train_on: expected 'all' or 'last', got {train_on!r}")


class ChatTemplate:
    """A compiled chat template with the special tokens it may refer to (``bos_token``, ...).

    ``origin`` names where the template came from, for error messages; ``stop_tokens`` are the
    end-of-turn strings a reply is cut after.
    """

    def __init__(self, source: str, *, origin: str, special_tokens: dict, stop_tokens: list[str]):
        self.source = source
        self.origin = origin
        self.special_tokens = special_tokens
        self.stop_tokens = stop_tokens
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise KDTuneError(f"chat template {origin}: line {e.lineno}: {e.message}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except jinja2.TemplateError as e:
            raise KDTuneError(f"chat template {self.origin} rejected the conversation: {e}") from None

    def render_with_spans(
        self, messages: list[dict], *, train_on_input: bool = False, train_on: str = "all"
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the ``[start, end)`` character spans to train on.

        ``train_on``: ``"all"`` assistant turns or only the ``"last"``; ``train_on_input`` trains
        on every character.
        """
        check_train_on(train_on)
        text = self.render(messages)
        if train_on_input:
            return text, [(0, len(text))]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if train_on == "last":
            turns = turns[-1:]
        spans = []
        for i in turns:
            start = len(self._prefix(text, messages[:i], add_generation_prompt=True))
            end = len(self._prefix(text, messages[: i + 1])) if i + 1 < len(messages) else len(text)
            spans.append((start, self._cut_after_stop(text, start, end)))
        return text, spans

    def _prefix(self, text: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
        prefix = self.render(messages, add_generation_prompt=add_generation_prompt)
        if not text.startswith(prefix):
            raise KDTuneError(
                f"chat template {self.origin} renders a conversation's beginning differently once more "
                f"messages follow, so the tokens to train on cannot be found; use train_on: last or "
                f"supply a chat template whose earlier turns do not change"
            )
        return prefix

    def _cut_after_stop(self, text: str, start: int, end: int) -> int:
        found = [(text.rfind(s, start, end), s) for s in self.stop_tokens]
        return max((at + len(s) for at, s in found if at >= 0), default=end)
