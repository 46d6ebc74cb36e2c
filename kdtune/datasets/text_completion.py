"""Continued pretraining on raw text: every token is trained."""

import numpy as np

from kdtune.config.checks import argument_checks, boolean, integer
from kdtune.datasets.rows import convert_rows, field, load_rows
from kdtune.datasets.sft import SFTDataset, report_cut
from kdtune.errors import KDTuneError


@argument_checks(max_seq_len=integer(1, optional=True), add_eos=boolean(), packed=boolean(), skip_bad_rows=boolean())
def text_completion_dataset(
    tokenizer,
    *,
    source: str = "json",
    data_files=None,
    split: str = "train",
    column_map: dict | None = None,
    max_seq_len: int | None = None,
    add_eos: bool = True,
    packed: bool = False,
    skip_bad_rows: bool = False,
) -> SFTDataset:
    """The ``text`` column, encoded with the tokenizer's BOS (if it adds one) and, with ``add_eos``, EOS.

    A text longer than ``max_seq_len`` is cut there without an EOS: it did not end.
    """

    def text(data: dict) -> str:
        value = field(data, "text")
        if not value.strip():
            raise KDTuneError("field 'text' is empty")
        return value

    converted = convert_rows(load_rows(source, data_files, split, column_map), text, skip_bad_rows)
    max_seq_len = tokenizer.max_seq_len if max_seq_len is None else integer(1)("max_seq_len", max_seq_len)
    name = f"text_completion dataset {source} {data_files or ''}".strip()
    eos = [tokenizer.eos_id] if add_eos else []
    encoded = [ids + eos for ids in tokenizer.encode_batch([value for _, value in converted])]
    samples = []
    for ids in encoded:
        ids = np.array(ids, dtype=np.int32)[:max_seq_len]
        samples.append((ids, np.ones(len(ids), dtype=bool)))
    dataset = SFTDataset(samples, packed=packed, max_seq_len=max_seq_len, pad_id=tokenizer.pad_id, name=name)
    report_cut(name, [len(ids) for ids in encoded], max_seq_len, [row.where for row, _ in converted])
    return dataset
