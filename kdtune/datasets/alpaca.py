"""Instruction tuning on Alpaca-style rows (``instruction``, optional ``input``, ``output``)."""

from kdtune.config.checks import argument_checks, boolean, integer
from kdtune.datasets.messages import alpaca_messages
from kdtune.datasets.rows import load_rows
from kdtune.datasets.sft import SFTDataset, chat_sft_dataset


@argument_checks(max_seq_len=integer(1, optional=True), train_on_input=boolean(), packed=boolean(),
                 skip_bad_rows=boolean(), drop_untrained=boolean())
def alpaca_dataset(
    tokenizer,
    *,
    source: str = "json",
    data_files=None,
    split: str = "train",
    column_map: dict | None = None,
    max_seq_len: int | None = None,
    train_on_input: bool = False,
    packed: bool = False,
    skip_bad_rows: bool = False,
    drop_untrained: bool = True,
    teacher_tokenizer=None,
) -> SFTDataset:
    """Each row as a one-turn chat in the model's own chat template; the output is trained.

    ``source``: ``json``, ``jsonl``, ``parquet``, ``csv`` or a hub dataset id; ``column_map`` maps
    ``instruction``/``input``/``output`` to the columns holding them.
    """
    rows = load_rows(source, data_files, split, column_map)
    return chat_sft_dataset(
        tokenizer, rows, alpaca_messages, name=f"alpaca dataset {source} {data_files or ''}".strip(),
        max_seq_len=max_seq_len, train_on_input=train_on_input, train_on="last", packed=packed,
        skip_bad_rows=skip_bad_rows,
        drop_untrained=drop_untrained, teacher_tokenizer=teacher_tokenizer,
    )
