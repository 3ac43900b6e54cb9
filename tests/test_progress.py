"""What a run prints: the one-line progress display (live on a terminal, sparse in a log), Lightning's
noise silenced, result files readable by others."""

import io
import logging
import os
import stat

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from meta_vqa.progress import StageProgress, count, duration


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 1)

    def training_step(self, batch, i):
        loss = self.w(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, i):
        self.log("val/acc", 50.0 + self.current_epoch, prog_bar=True)

    def test_step(self, batch, i):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _run(tmp_path, bar: StageProgress) -> str:
    data = DataLoader(TensorDataset(torch.randn(6, 2)), batch_size=2)  # 3 steps an epoch
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")
    trainer = L.Trainer(max_steps=6, logger=False, callbacks=[bar, ckpt], num_sanity_val_steps=0,
                        enable_model_summary=False, accelerator="cpu")  # fmt: skip
    model = _Tiny()
    trainer.fit(model, data, data)
    trainer.test(model, data, verbose=False)
    return bar.stream.getvalue()


def test_a_log_gets_one_line_per_phase_with_steps_metrics_and_time(tmp_path):
    out = _run(tmp_path, StageProgress(live=False, refresh_s=3600, stream=io.StringIO()))
    lines = out.splitlines()
    assert len(lines) == 2, out  # nothing in between: the next update is an hour away
    fit, test = lines
    assert fit.split()[:3] == ["fit", "6/6", "steps"]
    assert "loss " in fit and "val/acc 51.0 (best 51.0)" in fit  # epochs 0 and 1 validated
    assert " in " in fit and fit.endswith("(3 trained parameters)")
    assert test.split()[:3] == ["test", "3/3", "batches"] and " in " in test


def test_a_terminal_gets_the_line_rewritten_in_place(tmp_path):
    out = _run(tmp_path, StageProgress(live=True, refresh_s=0, stream=io.StringIO()))
    assert out.count("\n") == 2  # one line left on screen per phase
    fit = out.split("\n")[0].split("\r")
    assert len(fit) > 6  # redrawn at every step and validation batch
    assert "[############] 6/6 steps" in fit[-1] and "validating" in "".join(fit)


def test_durations_and_counts_read_naturally():
    assert [duration(s) for s in (0.4, 42, 185, 3723)] == ["0 s", "42 s", "3:05", "1:02:03"]
    assert [count(n) for n in (950, 36400, 1_250_000)] == ["950", "36.4K", "1.25M"]


def test_lightning_start_up_lines_are_silenced():
    from meta_vqa._quiet import LOGGERS, quiet

    quiet()
    for name in LOGGERS:
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)


def test_result_files_are_readable_by_others(tmp_path, monkeypatch):
    from meta_vqa import io as mio

    mask = os.umask(0o022)  # the usual umask: new files 0o644
    try:
        monkeypatch.setattr(mio, "FILE_MODE", mio._file_mode())
    finally:
        os.umask(mask)
    mio.write_json(tmp_path / "results.json", [])
    mio.write_text(tmp_path / "results.md", "")
    for name in ("results.json", "results.md"):  # mkstemp alone would leave them 0o600
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644


def test_prepare_prints_a_short_summary_unless_asked_for_all_of_it(capsys):
    import json

    from meta_vqa.prepare import print_summary

    summary = {"out": "data/easy_vqa", "reused": True, "encoder": "easyclip-minilm", "dim": 64,
               "question_dim": 384, "counts": {"images": 5000, "tasks": 107},
               "clip": {"retrieval_accuracy": 0.982, "train_accuracy": 0.9834, "captions": 24},
               "statistics": {"random": {"meta_train": {"tasks": 75}}}, "wall_time_s": {"total": 3.2}}  # fmt: skip
    print_summary(summary, as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "data/easy_vqa: checked and reused in 3 s"
    assert "images 5000, tasks 107" in lines[1]
    assert "retrieval 98.2 % (train 98.3 %, 24 captions)" in lines[3] and len(lines) == 5
    print_summary(summary, as_json=True)
    assert json.loads(capsys.readouterr().out) == summary
