import json
import sys
import types

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdtune.config.instantiate import instantiate
from kdtune.errors import KDTuneError
from kdtune.training.metric_logging import (
    JsonlLogger,
    MultiLogger,
    StdoutLogger,
    TensorBoardLogger,
    WandBLogger,
    read_metrics,
)


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_writes_plain_values_and_flushes_each_line(tmp_path):
    logger = JsonlLogger(tmp_path / "run")
    logger.log_dict({"loss": torch.tensor(1.25), "lr": np.float32(0.5), "tokens": np.int64(7),
                     "epoch": 0, "note": "x"}, step=1)
    # Readable before close: each record is flushed as a whole line.
    assert lines(tmp_path / "run" / "metrics.jsonl") == [
        {"step": 1, "loss": 1.25, "lr": 0.5, "tokens": 7, "epoch": 0, "note": "x"}]
    logger.log_dict({"loss": torch.tensor(2, dtype=torch.int64)}, step=2)
    logger.close()
    record = lines(tmp_path / "run" / "metrics.jsonl")[1]
    assert record == {"step": 2, "loss": 2.0} and isinstance(record["loss"], float)


def test_jsonl_resume_appends(tmp_path):
    for step in (1, 2):
        logger = JsonlLogger(tmp_path)
        logger.log_dict({"loss": float(step)}, step=step)
        logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_jsonl_resume_drops_partial_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # killed mid-write
    assert read_metrics(path) == [{"step": 1, "loss": 1.0}]  # readers skip the unfinished line
    logger = JsonlLogger(tmp_path)
    logger.log_dict({"loss": 2.0}, step=2)
    logger.close()
    assert lines(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]


def test_read_metrics_errors_name_the_file(tmp_path):
    with pytest.raises(KDTuneError, match="metrics.jsonl"):
        read_metrics(tmp_path / "metrics.jsonl")
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(KDTuneError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_stdout_logger(capsys):
    StdoutLogger().log_dict({"loss": torch.tensor(1.23456789), "epoch": 0, "lr": 2e-5}, step=3)
    assert capsys.readouterr().out == "step 3 | loss 1.235 | epoch 0 | lr 2e-05\n"


class Recorder:
    def __init__(self):
        self.calls, self.closed = [], False

    def log_dict(self, metrics, step):
        self.calls.append((dict(metrics), step))

    def close(self):
        self.closed = True


def test_multi_logger_fans_out():
    a, b = Recorder(), Recorder()
    logger = MultiLogger([a, b])
    logger.log_dict({"loss": 1.0}, step=4)
    logger.close()
    assert a.calls == b.calls == [({"loss": 1.0}, 4)] and a.closed and b.closed


def test_multi_logger_from_config(tmp_path, capsys):
    cfg = OmegaConf.create({"metric_logger": {"_component_": "multi_logger", "loggers": [
        {"_component_": "jsonl_logger", "log_dir": str(tmp_path)}, {"_component_": "stdout_logger"}]}})
    logger = instantiate(cfg.metric_logger)
    logger.log_dict({"loss": 0.5}, step=1)
    logger.close()
    assert lines(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5}]
    assert capsys.readouterr().out == "step 1 | loss 0.5\n"


def test_missing_backends_name_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(KDTuneError, match="pip install tensorboard"):
        TensorBoardLogger(tmp_path)
    with pytest.raises(KDTuneError, match="pip install wandb"):
        WandBLogger(project="p")


def test_tensorboard_logger_writes_numeric_scalars(monkeypatch, tmp_path):
    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def add_scalar(self, tag, value, global_step):
            calls.append((tag, value, global_step))

        def flush(self):
            calls.append("flush")

        def close(self):
            calls.append("close")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    logger = TensorBoardLogger(tmp_path)
    logger.log_dict({"loss": torch.tensor(0.5), "note": "skip", "ok": True, "epoch": 1}, step=9)
    logger.close()
    assert calls == [("init", str(tmp_path)), ("loss", 0.5, 9), ("epoch", 1, 9), "flush", "close"]


def test_wandb_logger(monkeypatch):
    calls = []

    class FakeRun:
        def log(self, metrics, step):
            calls.append(("log", metrics, step))

        def finish(self):
            calls.append("finish")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    logger = WandBLogger(project="kd", name="r1", tags=["a"])
    logger.log_dict({"loss": torch.tensor(1.5)}, step=2)
    logger.close()
    assert calls == [("init", {"project": "kd", "entity": None, "name": "r1", "dir": None, "tags": ["a"]}),
                     ("log", {"loss": 1.5}, 2), "finish"]


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_logger_real(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    logger.log_dict({"loss": 1.0}, step=1)
    logger.close()
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
