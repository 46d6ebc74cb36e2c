"""A checkpoint's tokenizer: ``tokenizer.json`` through the `tokenizers` library, special tokens from
``tokenizer_config.json`` and ``generation_config.json``, and the model's own chat template.

Only the fast-tokenizer file is read, so every family behaves the same and nothing from
transformers is needed at run time.
"""

from functools import cached_property
import hashlib
import json
from pathlib import Path
import shutil

import numpy as np
import tokenizers

from kdtune.config.checks import argument_checks, integer
from kdtune.errors import KDTuneError
from kdtune.tokenization.chat_template import ChatTemplate

# End-of-turn tokens of common families. They count as stop tokens whenever the vocabulary has
# them, because base checkpoints name only their end-of-text token as EOS while a chat template
# (possibly supplied by the config) ends turns with one of these.
_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "<|end|>")

# Files that make up a tokenizer in a Hugging Face checkpoint, copied by `Tokenizer.save`.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")

_ENCODE_CHUNK = 4096  # texts per parallel encode call


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KDTuneError(f"{path}: not valid JSON: {e}") from None


def _token_text(value) -> str | None:
    # tokenizer_config.json writes a special token as a string or as a serialized AddedToken.
    return value.get("content") if isinstance(value, dict) else value


def _template_source(path: Path, config: dict, chat_template: str | None) -> tuple[str | None, str]:
    """The template text and a name for it: the config's, else the checkpoint's."""
    if chat_template is not None:
        if "{{" in chat_template or "{%" in chat_template:
            return chat_template, "given inline"
        file = Path(chat_template).expanduser()
        if not file.is_file():
            raise KDTuneError(f"chat_template: no such file: {chat_template}")
        return file.read_text(encoding="utf-8"), str(file)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8"), str(path / "chat_template.jinja")
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    return source, str(path / "tokenizer_config.json")


def _span_tokens(encoding, start: int, end: int) -> tuple[int, int]:
    """The tokens covering characters ``[start, end)``; a token straddling an edge is included."""
    first = next((t for c in range(start, end) if (t := encoding.char_to_token(c)) is not None), None)
    if first is None:
        return 0, 0
    last = next(t for c in range(end - 1, start - 1, -1) if (t := encoding.char_to_token(c)) is not None)
    return first, last + 1


class Tokenizer:
    """Text to token ids and back, chat formatting, and the trained-token mask of a conversation.

    Build it with `load_tokenizer`. ``eos_ids`` are all ids that end a turn or the text (what
    generation stops on); ``eos_id`` is the checkpoint's own EOS; ``pad_id`` falls back to
    ``eos_id`` when the checkpoint names no pad token (padding is always masked).
    """

    def __init__(self, path: Path, *, chat_template: str | None = None, max_seq_len: int | None = None):
        self.path = path
        self.max_seq_len = max_seq_len
        self._config = _read_json(path / "tokenizer_config.json")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the library raises a bare Exception for unreadable files
            raise KDTuneError(f"{path / 'tokenizer.json'}: cannot load tokenizer: {e}") from None

        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        special = {k: _token_text(self._config.get(k)) for k in names}
        special = {k: v for k, v in special.items() if v is not None}
        extra = [_token_text(t) for t in self._config.get("additional_special_tokens") or []]
        if extra:
            special["additional_special_tokens"] = extra
        self.bos_id = self._id_of(special.get("bos_token"), "bos_token")
        self.eos_id = self._id_of(special.get("eos_token"), "eos_token")
        self.pad_id = self._id_of(special.get("pad_token"), "pad_token")

        generation = _read_json(path / "generation_config.json")
        gen_eos = generation.get("eos_token_id")
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        if self.eos_id is None:
            self.eos_id = next((i for i in gen_eos if i is not None), None)
        if self.pad_id is None:
            self.pad_id = generation.get("pad_token_id")
        if self.pad_id is None:
            self.pad_id = self.eos_id
        turn_ends = [self._tok.token_to_id(t) for t in _TURN_ENDS]
        stops = [self.eos_id, *gen_eos, *turn_ends]
        self.eos_ids = tuple(dict.fromkeys(i for i in stops if i is not None))
        if not self.eos_ids:
            raise KDTuneError(f"{path}: the tokenizer names no EOS token (tokenizer_config.json eos_token)")

        source, origin = _template_source(path, self._config, chat_template)
        self.chat_template = None
        if source is not None:
            stop_tokens = [self._tok.id_to_token(i) for i in self.eos_ids]
            self.chat_template = ChatTemplate(source, origin=origin, special_tokens=special, stop_tokens=stop_tokens)

    def _id_of(self, token: str | None, key: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise KDTuneError(f"{self.path / 'tokenizer_config.json'}: {key} {token!r} is not in the vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may be larger)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @cached_property
    def marker_ids(self) -> frozenset[int]:
        """Ids of special added tokens other than BOS, EOS, padding and end-of-turn: markers such as
        Gemma 3's image placeholder, which encoding text never gives and generation never stops on."""
        roles = {*self.eos_ids, self.bos_id, self.pad_id}
        return frozenset(i for i, token in self._tok.get_added_tokens_decoder().items()
                         if token.special and i not in roles)

    @cached_property
    def vocab_fingerprint(self) -> str:
        """A hash of the token-to-id mapping: teacher and student must agree on it to distill."""
        vocab = sorted(self._tok.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
        return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; ``add_special_tokens`` adds what tokenizer.json's post-processor adds (BOS)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for many texts at once, in parallel (in chunks: an encoding weighs more than its ids)."""
        out = []
        for chunk in range(0, len(texts), _ENCODE_CHUNK):
            part = texts[chunk : chunk + _ENCODE_CHUNK]
            out.extend(e.ids for e in self._tok.encode_batch_fast(part, add_special_tokens=add_special_tokens))
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def require_chat_template(self) -> ChatTemplate:
        """The chat template, or a user error saying how to supply one."""
        if self.chat_template is None:
            raise KDTuneError(
                f"{self.path}: the tokenizer has no chat_template; set the tokenizer's chat_template "
                f"to a template file (base models ship none)"
            )
        return self.chat_template

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as the model's chat template writes it."""
        return self.require_chat_template().render(messages, add_generation_prompt)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Token ids of the rendered conversation (the template writes any BOS itself)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def render_with_spans(
        self, messages: list[dict], *, train_on_input: bool = False, train_on: str = "all"
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans to train on (see `tokenize_messages`)."""
        template = self.require_chat_template()
        return template.render_with_spans(messages, train_on_input=train_on_input, train_on=train_on)

    def tokenize_rendered(
        self, rendered: list[tuple[str, list[tuple[int, int]]]], max_seq_len: int | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Encode many `render_with_spans` results in parallel: ``(ids int32, mask bool)`` per item,
        truncated to ``max_seq_len`` (if given) as `tokenize_messages` describes."""
        out = []
        for chunk in range(0, len(rendered), _ENCODE_CHUNK):  # chunks: an encoding holds far more than its ids
            items = rendered[chunk : chunk + _ENCODE_CHUNK]
            encodings = self.encodings([text for text, _ in items])
            out += [self.truncate(*self.masked(encoding, spans), max_seq_len) for (_, spans), encoding in zip(items, encodings)]
        return out

    def encodings(self, texts: list[str]) -> list:
        """The `tokenizers` encodings (ids and character offsets) of many texts, encoded in parallel
        without added special tokens (a rendered template writes its own)."""
        out = []
        for chunk in range(0, len(texts), _ENCODE_CHUNK):
            out += self._tok.encode_batch(texts[chunk : chunk + _ENCODE_CHUNK], add_special_tokens=False)
        return out

    @staticmethod
    def masked(encoding, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int32, mask bool)`` of an encoding, the mask true on the tokens overlapping ``spans``
        (character ranges)."""
        ids = np.array(encoding.ids, dtype=np.int32)
        mask = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            first, stop = _span_tokens(encoding, start, end)
            mask[first:stop] = True
        return ids, mask

    def tokenize_messages(
        self,
        messages: list[dict],
        *,
        train_on_input: bool = False,
        train_on: str = "all",
        max_seq_len: int | None = None,
    ) -> tuple[list[int], list[bool]]:
        """Token ids of the conversation and a mask, true on the tokens the model learns.

        The mask covers each assistant reply (``train_on="all"``) or the last one (``"last"``) and
        its end-of-turn token, and nothing the template writes around them; ``train_on_input``
        trains on every token. Past ``max_seq_len`` (default: the tokenizer's) the sequence is cut
        and its last token becomes the end-of-turn token.
        """
        rendered = self.render_with_spans(messages, train_on_input=train_on_input, train_on=train_on)
        ids, mask = self.tokenize_rendered([rendered], self.max_seq_len if max_seq_len is None else max_seq_len)[0]
        return ids.tolist(), mask.tolist()

    def truncate(self, ids: np.ndarray, mask: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        """``ids`` and ``mask`` cut at ``limit`` tokens, the last one becoming the end-of-turn token."""
        if limit is None or len(ids) <= limit:
            return ids, mask
        stops = np.flatnonzero(np.isin(ids, self.eos_ids))
        end_of_turn = ids[stops[-1]] if len(stops) else self.eos_id
        ids, mask = ids[:limit].copy(), mask[:limit]
        ids[-1] = end_of_turn
        return ids, mask

    def save(self, directory) -> None:
        """Copy the tokenizer files to ``directory``, with the chat template in use."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in _TOKENIZER_FILES:
            if (self.path / name).is_file():
                shutil.copyfile(self.path / name, directory / name)
        if self.chat_template is not None:
            (directory / "chat_template.jinja").write_text(self.chat_template.source, encoding="utf-8")


@argument_checks(max_seq_len=integer(1, optional=True))
def load_tokenizer(path, *, chat_template: str | None = None, max_seq_len: int | None = None) -> Tokenizer:
    """The tokenizer of the checkpoint directory ``path``.

    ``chat_template``: a template file (or template text) to use instead of the checkpoint's, for
    base models that ship none. ``max_seq_len``: default truncation length of `tokenize_messages`
    and of the datasets built with this tokenizer.
    """
    path = Path(path).expanduser()
    if not (path / "tokenizer.json").is_file():
        raise KDTuneError(f"{path}: no tokenizer.json (kdtune reads the fast-tokenizer file)")
    return Tokenizer(path, chat_template=chat_template, max_seq_len=max_seq_len)
