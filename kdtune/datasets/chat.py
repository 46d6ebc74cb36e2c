"""Multi-turn chat data: OpenAI-style ``messages`` (role/content) or ShareGPT ``conversations`` (from/value)."""

from functools import partial

from kdtune.config.checks import argument_checks, boolean, choice, integer
from kdtune.datasets.messages import STYLES, chat_messages
from kdtune.datasets.rows import load_rows
from kdtune.datasets.sft import SFTDataset, chat_sft_dataset
from kdtune.errors import KDTuneError


@argument_checks(max_seq_len=integer(1, optional=True), conversation_style=choice(*STYLES),
                 train_on=choice("all", "last"), train_on_input=boolean(), packed=boolean(), skip_bad_rows=boolean(),
                 drop_untrained=boolean())
def chat_dataset(
    tokenizer,
    *,
    source: str = "json",
    data_files=None,
    split: str = "train",
    column_map: dict | None = None,
    conversation_style: str = "auto",
    train_on: str = "all",
    max_seq_len: int | None = None,
    train_on_input: bool = False,
    packed: bool = False,
    skip_bad_rows: bool = False,
    drop_untrained: bool = True,
    teacher_tokenizer=None,
) -> SFTDataset:
    """Conversations in the model's own chat template, trained on assistant replies.

    ``conversation_style``: ``openai``, ``sharegpt`` or ``auto`` (by the column a row has);
    ``train_on``: every assistant reply (``all``) or only the ``last``; ``column_map`` maps
    ``messages``/``conversations`` to the column holding the conversation.
    """
    if conversation_style not in STYLES:
        raise KDTuneError(f"conversation_style: expected one of {STYLES}, got {conversation_style!r}")
    rows = load_rows(source, data_files, split, column_map)
    return chat_sft_dataset(
        tokenizer, rows, partial(chat_messages, style=conversation_style),
        name=f"chat dataset {source} {data_files or ''}".strip(), max_seq_len=max_seq_len,
        train_on_input=train_on_input, train_on=train_on, packed=packed, skip_bad_rows=skip_bad_rows,
        drop_untrained=drop_untrained, teacher_tokenizer=teacher_tokenizer,
    )
