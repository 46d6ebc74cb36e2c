import json
import math
import struct
import sys

import pytest

from kdtune.errors import KDTuneError
from kdtune.training.plot import metric_series, plot_metrics

pytest.importorskip("matplotlib", reason="plot_metrics needs matplotlib (the 'plot' extra)")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def kd_run(steps=200):
    for step in range(1, steps + 1):
        lr = 1e-4 * min(1.0, step / 20) * 0.5 * (1 + math.cos(math.pi * max(0, step - 20) / (steps - 20)))
        ce, kd = 2.0 + 3.0 / math.sqrt(step), 1.0 + 4.0 / math.sqrt(step)
        yield {"step": step, "epoch": 0, "loss": 0.5 * ce + 0.5 * kd, "ce_loss": ce, "kd_loss": kd,
               "lr": lr, "tokens_per_second": 1000.0}


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24]), len(data)


def test_writes_png_from_metrics(tmp_path):
    records = list(kd_run())
    # A resumed run re-logs steps 150..160 after the checkpoint at 150; those records win.
    records += records[149:160]
    records.append({"note": "a record without a step is ignored"})
    write_metrics(tmp_path / "metrics.jsonl", records)
    out = plot_metrics(tmp_path)
    assert out == tmp_path / "loss_curves.png"
    (width, height), size = png_size(out)
    assert (width, height) == (800, 600) and size > 20_000


def test_validation_losses_are_drawn(tmp_path):
    records = list(kd_run(40))[:20]
    for r in records[4::5]:
        r.update(val_loss=r["loss"] + 0.1, val_ce_loss=r["ce_loss"] + 0.1, val_kd_loss=r["kd_loss"], val_kl=r["kd_loss"])
    write_metrics(tmp_path / "metrics.jsonl", records)
    series = metric_series(tmp_path / "metrics.jsonl")
    assert [s for s, _ in series["val_loss"]] == [5, 10, 15, 20] and len(series["loss"]) == 20
    assert png_size(plot_metrics(tmp_path))[1] > 20_000


def test_custom_path_and_sft_metrics(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl", [{"step": s, "loss": 3.0 / s, "lr": 1e-3} for s in range(1, 6)])
    out = plot_metrics(tmp_path, out_png=tmp_path / "sft.png")
    assert out == tmp_path / "sft.png" and png_size(out)[1] > 10_000


def test_missing_or_empty_metrics_name_the_file(tmp_path):
    with pytest.raises(KDTuneError, match="metrics.jsonl"):
        plot_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(KDTuneError, match="metrics.jsonl"):
        plot_metrics(tmp_path)
    write_metrics(tmp_path / "metrics.jsonl", [{"step": 1, "grad_norm": 1.0}])
    with pytest.raises(KDTuneError, match="metrics.jsonl"):
        plot_metrics(tmp_path)
    assert not (tmp_path / "loss_curves.png").exists()


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(KDTuneError, match=r"pip install kdtune\[plot\]"):
        plot_metrics(tmp_path)
