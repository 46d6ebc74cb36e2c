"""A packed batch gives every token the same loss as running its samples one by one."""

from itertools import accumulate
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdtune.datasets import IGNORE_INDEX, arithmetic_dataset, collate
from kdtune.tokenization import load_tokenizer
from tests.models.tiny import qwen_tokenizer_config

QWEN = Path(__file__).parents[1] / "assets" / "qwen2_5_tokenizer"
# Large weights, so attention is far from uniform and leaks across samples would show.
TINY_QWEN2 = qwen_tokenizer_config(initializer_range=0.5)


def token_losses(model, batch):
    kwargs = {k: batch[k] for k in ("mask", "input_pos") if k in batch}
    logits = model(batch["tokens"], **kwargs).float()
    return F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=IGNORE_INDEX, reduction="none")


def test_packed_batch_matches_samples_one_by_one(tmp_path):
    checkpointing = pytest.importorskip("kdtune.checkpointing", reason="needs the tiny-model helpers")
    checkpointing.write_random_checkpoint(TINY_QWEN2, tmp_path / "tiny", seed=0)
    model = checkpointing.load_model(tmp_path / "tiny")
    tok = load_tokenizer(QWEN)
    plain = arithmetic_dataset(tok, num_rows=6, seed=5, max_digits=4)
    packed = arithmetic_dataset(tok, num_rows=6, seed=5, max_digits=4, max_seq_len=128, packed=True)
    assert any(len(row["seq_lens"]) > 2 for row in packed)  # several samples share a row

    with torch.no_grad():
        one_by_one = [token_losses(model, collate([s], tok.pad_id))[0] for s in plain]
        batch = collate(list(packed), tok.pad_id)
        packed_losses = token_losses(model, batch)
        leaky = token_losses(model, {"tokens": batch["tokens"], "labels": batch["labels"]})

    segments = []  # (losses packed, losses packed without the mask) per sample, padding left out
    for row, losses, leaks in zip(packed, packed_losses, leaky):
        starts = accumulate([0] + row["seq_lens"][:-1])
        for start, n in zip(starts, row["seq_lens"]):
            if any(t != tok.pad_id for t in row["tokens"][start : start + n]):
                segments.append((losses[start : start + n], leaks[start : start + n]))
    assert len(segments) == len(one_by_one)
    for want, (have, _) in zip(one_by_one, segments):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
    # Without the block-causal mask and restarted positions, later samples see earlier ones.
    assert not all(torch.allclose(want, leak, rtol=1e-5, atol=1e-5) for want, (_, leak) in zip(one_by_one, segments))
