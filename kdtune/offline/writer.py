"""One pass of the teacher over a dataset, writing its top-k log-probabilities to a cache folder.

Each shard's samples are batched in order of length (less padding) and projected only at their
trained positions, chunk by chunk, so the ``[tokens, vocab]`` logits never exist whole. A shard is
written once complete; a rerun with the same settings skips the shards on disk and, because shard
contents depend only on the dataset and settings, writes byte-identical files.
"""

from pathlib import Path

import torch
from tqdm import tqdm

from kdtune.datasets import IGNORE_INDEX, collate
from kdtune.errors import KDTuneError
from kdtune.losses.token_loss import upcast
from kdtune.modules.softcap import softcap
from kdtune.offline.index import build_index, differences, read_index, summarize_dataset, write_index
from kdtune.offline.shards import STORAGES, encode_rows, id_bytes, write_shard

ROWS_PER_CHUNK = 1024  # positions projected onto the vocabulary at once: 1024 × 152k float32 is 0.6 GB


@torch.inference_mode()
def teacher_topk(teacher, batch: dict, weight: torch.Tensor, k: int, temperature: float):
    """Top-k log-probabilities (float32, at ``temperature``, over ``weight``'s rows) and their ids,
    ``[N, k]`` each, at the batch's trained positions in row-major order."""
    inputs = {key: batch[key] for key in ("mask", "input_pos") if key in batch}
    hidden = teacher(batch["tokens"], return_hidden=True, **inputs)
    rows = hidden[batch["labels"] != IGNORE_INDEX]
    values, ids = [], []
    for chunk in rows.split(ROWS_PER_CHUNK):
        # the teacher's capped logits (Gemma 2), then the temperature, as every loss form takes them
        logits = softcap(upcast(chunk @ weight.T), teacher.args.final_logit_softcapping)
        top = (logits / temperature).log_softmax(-1).topk(k, dim=-1)
        values.append(top.values)
        ids.append(top.indices)
    return torch.cat(values), torch.cat(ids)


class CacheWriter:
    """A cache folder being written: created, or resumed when its index records the same settings.

    ``teacher`` describes the teacher for the record (checkpoint dir, dtype, quantization); the
    folder is refused when it holds anything but a cache made with exactly these settings.
    """

    def __init__(self, folder, dataset, tokenizer, *, top_k: int, temperature: float, logprob_dtype: str,
                 samples_per_shard: int, teacher: dict):
        if logprob_dtype not in STORAGES:
            raise KDTuneError(f"logprob_dtype: expected one of {', '.join(STORAGES)}, got '{logprob_dtype}'")
        if not 0 < top_k <= tokenizer.vocab_size:
            raise KDTuneError(f"top_k: expected 1 to the vocabulary size {tokenizer.vocab_size}, got {top_k}")
        if not temperature > 0:
            raise KDTuneError(f"temperature: expected a positive number, got {temperature}")
        self.folder, self.dataset = Path(folder), dataset
        self.summary = summarize_dataset(dataset)
        settings = {"top_k": top_k, "temperature": float(temperature), "vocab_size": tokenizer.vocab_size,
                    "vocab_fingerprint": tokenizer.vocab_fingerprint,
                    "max_seq_len": getattr(dataset, "max_seq_len", None), "teacher": teacher,
                    "logprob_dtype": logprob_dtype, "id_bytes": id_bytes(tokenizer.vocab_size)}
        self.index = build_index(self.summary, settings, samples_per_shard)
        self.complete = self._start()

    def _start(self) -> bool:
        """Whether the folder already holds this cache complete; checks it may be (re)used."""
        recorded = read_index(self.folder) if self.folder.is_dir() else None
        if recorded is None:
            if self.folder.is_dir() and any(self.folder.iterdir()):
                raise KDTuneError(f"output_dir '{self.folder}' is not empty and holds no teacher cache; "
                                  f"choose another output_dir")
            self.folder.mkdir(parents=True, exist_ok=True)
            write_index(self.folder, self.index)
            return False
        changed = differences(recorded, self.index)
        if changed:
            raise KDTuneError(f"output_dir '{self.folder}' holds a teacher cache made with other settings "
                              f"({'; '.join(changed)}); choose another output_dir")
        return recorded["complete"]

    def write(self, teacher, *, batch_size: int, pad_id: int, device: torch.device) -> None:
        """Compute and write every shard not yet on disk with ``teacher`` (a model), then mark the
        index complete."""
        vocab = self.index["vocab_size"]
        weight = teacher.output_weight
        if weight.shape[0] < vocab:
            raise KDTuneError(f"the teacher has {weight.shape[0]} output rows but the tokenizer has {vocab} tokens: "
                              f"the cache must be made with the teacher's own tokenizer")
        weight = weight[:vocab]  # padding rows of the embedding are no token

        def rows(samples):
            batch = {key: v.to(device) for key, v in collate(samples, pad_id).items()}
            values, ids = teacher_topk(teacher, batch, weight, self.index["top_k"], self.index["temperature"])
            return values.cpu(), ids.cpu()

        self._write_all(rows, batch_size)

    def write_served(self, teacher, *, batch_size: int) -> None:
        """`write` with a served teacher (`kdtune.serving.ServedTeacher`): ``batch_size`` samples'
        requests are in flight together."""
        def rows(samples):
            per_sample = teacher.sample_rows(samples)
            return torch.cat([row[0] for row in per_sample]), torch.cat([row[1] for row in per_sample])

        self._write_all(rows, batch_size)

    def _write_all(self, rows, batch_size: int) -> None:
        lengths, per_shard = self.summary.lengths, self.index["samples_per_shard"]
        todo = [s for s, name in enumerate(self.index["shards"]) if not (self.folder / name).is_file()]
        left = sum(sum(lengths[s * per_shard:(s + 1) * per_shard]) for s in todo)
        bar = tqdm(total=sum(lengths), initial=sum(lengths) - left, unit="tok", unit_scale=True,
                   desc="cache teacher", dynamic_ncols=True, disable=None)  # hidden off a terminal
        for shard in todo:
            self._write_shard(shard, rows, batch_size, bar)
        bar.close()
        self.index["complete"] = True
        write_index(self.folder, self.index)

    def _write_shard(self, shard, rows_of, batch_size, bar) -> None:
        """``rows_of(samples)``: the top-k values and ids ``[N, k]`` of the samples' trained positions,
        in order."""
        per_shard, samples = self.index["samples_per_shard"], self.index["samples"]
        members = range(shard * per_shard, min((shard + 1) * per_shard, len(samples)))
        rows = sum(samples[i][2] for i in members)
        stored: dict[str, torch.Tensor] = {}  # each storage tensor, one leading row per token
        order = sorted(members, key=lambda i: self.summary.lengths[i])
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            values, top_ids = rows_of([self.dataset[i] for i in chosen])
            encoded = encode_rows(values, top_ids, self.index["logprob_dtype"], self.index["vocab_size"])
            counts = [samples[i][2] for i in chosen]
            for name, tensor in encoded.items():
                target = stored.setdefault(name, tensor.new_empty((rows, *tensor.shape[1:])))
                for i, part in zip(chosen, tensor.split(counts)):
                    target[samples[i][1]:samples[i][1] + len(part)] = part
            bar.update(sum(self.summary.lengths[i] for i in chosen))
        write_shard(self.folder / self.index["shards"][shard], stored)
