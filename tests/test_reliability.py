"""Nothing silently wrong, nothing run from a file, nothing lost on a kill (issue 13).

* non-finite features are refused when a dataset is written or loaded; a non-finite loss or gradient stops
  ``fit`` before the step is applied, with no checkpoint or result from it;
* a checkpoint holding pickled code is refused on every path that reads one, ``file://`` URLs and
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` included; every ``torch.load`` of a command is weights-only;
* a stage killed at a step and resumed from ``last.ckpt`` ends with the weights and results of a run
  never killed.
"""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from meta_vqa.callbacks import LastCheckpoint, StopOnNonFinite, random_state, set_random_state
from meta_vqa.cli import main
from meta_vqa.data.features import FeatureStore, write_features, write_manifest
from meta_vqa.data.resumable import ResumableLoader, ResumablePasses, resumable
from meta_vqa.errors import DataError, TrainingDiverged
from meta_vqa.stages.hnet import HNetStage
from meta_vqa.stages.hyperldm import HyperLDMStage

REPO = Path(__file__).resolve().parents[1]
HNET = str(REPO / "conf" / "smoke" / "hnet.yaml")
HVAE = str(REPO / "conf" / "smoke" / "hvae.yaml")
HYPERLDM = str(REPO / "conf" / "smoke" / "hyperldm.yaml")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]


def _error_line(capfd) -> str:
    err = capfd.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


# --- non-finite values: at the door -----------------------------------------------------------------------
def _poisoned_copy(root: Path, dest: Path, kind: str, rows: list[int], value: float) -> Path:
    """A copy of a dataset with ``value`` in some feature rows, its manifest rewritten (a consistent file)."""
    shutil.copytree(root, dest)
    path = dest / "features" / "synthetic" / f"{kind}.safetensors"
    tensors = load_file(path)
    tensors["features"][rows, 1] = value
    save_file(tensors, str(path))
    manifest = json.loads((dest / "dataset.json").read_text())
    manifest.pop("files")
    write_manifest(dest, manifest)
    return dest


def test_non_finite_features_are_refused_naming_file_row_and_id(synthetic_root, tmp_path, capfd, monkeypatch):
    nan = _poisoned_copy(synthetic_root, tmp_path / "nan", "images", [17, 40, 41, 99, 200], float("nan"))
    with pytest.raises(
        DataError, match=r"images\.safetensors: row 17 \(image 'img17'\) is not finite \(and 4"
    ):
        FeatureStore.load(nan, "synthetic")
    inf = _poisoned_copy(synthetic_root, tmp_path / "inf", "answers", [5], float("inf"))
    with pytest.raises(DataError, match=r"answers\.safetensors: row 5 \(answer 'a\dv\d' of question '.+'\)"):
        FeatureStore.load(inf, "synthetic")
    # through the CLI: one error line, exit 2, nothing written
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "-c", HNET, "--data.root", str(nan), "--test_after_fit", "true"]) == 2
    assert "row 17 (image 'img17') is not finite" in _error_line(capfd)
    assert not (tmp_path / "lightning_logs").exists()
    # and when a dataset is written
    with pytest.raises(DataError, match=r"questions\.safetensors: row 1 \(question 'b'\) is not finite"):
        q = torch.zeros(2, 4)
        q[1, 0] = float("-inf")
        write_features(tmp_path / "new", "enc", ["i"], torch.zeros(1, 4), ["a", "b"], q, [["x"], ["y"]],
                       [torch.zeros(1, 4), torch.zeros(1, 4)])  # fmt: skip
    assert not (tmp_path / "new").exists()


# --- non-finite values: in flight -------------------------------------------------------------------------
def test_nan_loss_mid_run_stops_maml_stage_without_a_checkpoint_after_it(
    smoke_hnet, tmp_path, capfd, monkeypatch
):
    """The manual-optimisation stages: a NaN injected into the 5th step's generated weights (so its loss and
    gradient are NaN)."""
    monkeypatch.chdir(tmp_path)
    real = HNetStage.to_weights

    def poisoned(self, params):
        w = real(self, params)
        return w * float("nan") if self.training and self.trainer.global_step == 4 else w

    monkeypatch.setattr(HNetStage, "to_weights", poisoned)
    out = tmp_path / "hnet"
    args = ["fit", "-c", HNET, "--data.root", str(smoke_hnet["root"]), "--stage_dir", str(out), *QUIET]
    args += ["--trainer.check_val_every_n_epoch", "1", "--last_checkpoint.every_n_train_steps", "1"]
    assert main([*args, "--test_after_fit", "true"]) == 2
    line = _error_line(capfd)
    assert "HNetStage: the loss is nan at training step 5 (epoch 1, batch 1)" in line
    assert _step(out / "last.ckpt") == 4 and _step(out / "best.ckpt") == 3  # both from before the NaN
    assert torch.isfinite(torch.load(out / "last.ckpt", weights_only=True)["state_dict"]["z0"]).all()
    assert not (out / "results.json").exists()  # --test_after_fit did not run


def test_nan_loss_stops_automatic_stage(smoke_hnet, smoke_adaptation, tmp_path, capfd, monkeypatch):
    """The automatic-optimisation stages (HVAE, HyperCLIP, HyperLDM): a NaN in the 4th step's loss."""
    monkeypatch.chdir(tmp_path)
    real = HyperLDMStage.training_step
    monkeypatch.setattr(
        HyperLDMStage,
        "training_step",
        lambda self, b, i: real(self, b, i) * (float("nan") if self.trainer.global_step == 3 else 1.0),
    )
    out = tmp_path / "ldm"
    args = ["fit", "-c", HYPERLDM, "--data.root", str(smoke_hnet["root"]), "--stage_dir", str(out), *QUIET]
    args += [
        "--model.init_args.upstream_ckpt",
        str(smoke_hnet["ckpt"]),
        "--data.adaptation",
        str(smoke_adaptation),
    ]
    args += ["--last_checkpoint.every_n_train_steps", "1", "--test_after_fit", "true"]
    assert main(args) == 2
    assert "HyperLDMStage: the loss is nan at training step 4" in _error_line(capfd)
    assert _step(out / "last.ckpt") == 3
    assert not (out / "best.ckpt").exists() and not (out / "results.json").exists()


class _Trainer:
    """What StopOnNonFinite reads of a Trainer."""

    def __init__(self, scaler=None):
        self.precision_plugin = type("P", (), {"scaler": scaler})()
        self.global_step, self.current_epoch = 6, 2
        self.fit_loop = type("F", (), {"epoch_loop": type("E", (), {"batch_idx": 1})()})()


def test_non_finite_gradient_is_caught_before_the_step_and_bf16_is_no_false_alarm():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.ones(1, 3)).sum().backward()
    guard = StopOnNonFinite()
    guard.on_before_optimizer_step(_Trainer(), net, opt)  # finite: passes
    net[1].weight.grad[0, 1] = float("inf")
    with pytest.raises(
        TrainingDiverged, match=r"Sequential: the gradient of 1\.weight is not finite at training step 7"
    ):
        guard.on_before_optimizer_step(_Trainer(), net, opt)
    guard.on_before_optimizer_step(_Trainer(scaler=object()), net, opt)  # 16-mixed: the scaler's business
    # bf16: large but finite values are not alarms; inf and nan are
    big = torch.tensor([3.0e38, -3.0e38, 1e-40], dtype=torch.bfloat16)
    guard.check_loss(_Trainer(), net, big)
    # generated weights handed back with their gradient are no loss: under 16-mixed they arrive scaled by
    # the gradient scaler's factor, and float16 overflows (the scaler's business, not a divergence)
    guard.on_before_backward(_Trainer(), net, torch.tensor([6e4, 1.0], dtype=torch.float16) * 65536.0)
    with pytest.raises(TrainingDiverged, match="the loss is -inf"):
        guard.on_before_backward(_Trainer(), net, torch.tensor(float("-inf"), dtype=torch.bfloat16))


# --- nothing is unpickled ---------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling it creates the marker file


def test_crafted_pickle_is_refused_on_every_path_even_when_torch_is_told_to_unpickle(
    smoke_hnet, smoke_adaptation, tmp_path, capfd, monkeypatch
):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _Payload(marker)}, evil)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch.load(evil)  # the threat is real here: torch's default now unpickles and runs the payload
    assert marker.exists()
    marker.unlink()

    url = f"file://{evil}"
    root, hnet = str(smoke_hnet["root"]), str(smoke_hnet["ckpt"])
    up = ["--model.init_args.upstream_ckpt", hnet, "--data.adaptation", str(smoke_adaptation)]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    commands = [
        ["test", "-c", HNET, "--data.root", root, "--ckpt_path", url],
        ["fit", "-c", HNET, "--data.root", root, "--ckpt_path", url],
        ["fit", "-c", HVAE, "--data.root", root, "--model.init_args.upstream_ckpt", url, "--data.adaptation",
         str(smoke_adaptation)],
        ["fit", "-c", HYPERLDM, "--data.root", root, *up, "--model.init_args.hyperclip_ckpt", url],
        ["generate", "--ckpt", url, "--question", "is it red?", "--answers", "yes,no"],
        ["bench", "sample", "--ckpt", url],
    ]  # fmt: skip
    for argv in commands:
        assert main(argv) == 2, argv
        line = _error_line(capfd)
        assert f"{evil}: holds a pickled io.open, not plain weights; refusing to unpickle it" in line, line
        assert not marker.exists()
    assert not list(cwd.iterdir())  # nothing written either


def test_every_load_of_a_command_is_weights_only(smoke_hnet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    seen = []
    real = torch.load

    def load(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    url = f"file://{smoke_hnet['ckpt']}"
    args = ["validate", "-c", HNET, "--data.root", str(smoke_hnet["root"]), "--ckpt_path", url, *QUIET]
    assert main([*args, "--model.init_args.eval_steps", "1"]) == 0
    assert len(seen) >= 2 and all(w is True for w in seen), seen  # ours and the Trainer's


# --- resuming reproduces ----------------------------------------------------------------------------------
class _Killed(Exception):
    """Stands for a SIGKILL right after last.ckpt was written at a given step: what a run killed at any
    later moment before the next save resumes from."""


def _fit(args: list[str], monkeypatch, kill_at: int | None = None) -> None:
    if kill_at is not None:
        real = LastCheckpoint._save

        def save(self, trainer):
            real(self, trainer)
            if trainer.global_step == kill_at:
                raise _Killed(kill_at)

        monkeypatch.setattr(LastCheckpoint, "_save", save)
        with pytest.raises(_Killed):
            main(args)
        monkeypatch.setattr(LastCheckpoint, "_save", real)
        return
    assert main(args) == 0


def _assert_same_run(ref: Path, out: Path) -> None:
    a = torch.load(ref / "last.ckpt", weights_only=True)
    b = torch.load(out / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"]
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert json.loads((out / "results.json").read_text()) == json.loads((ref / "results.json").read_text())


def _resume_runs(args: list[str], kills: list[int], tmp_path: Path, monkeypatch) -> None:
    ref = tmp_path / "uninterrupted"
    _fit([*args, "--stage_dir", str(ref)], monkeypatch)
    for k in kills:
        out = tmp_path / f"killed_at_{k}"
        _fit([*args, "--stage_dir", str(out)], monkeypatch, kill_at=k)
        assert _step(out / "last.ckpt") == k and not (out / "results.json").exists()
        _fit([*args, "--stage_dir", str(out), "--ckpt_path", str(out / "last.ckpt")], monkeypatch)
        _assert_same_run(ref, out)


@pytest.mark.slow
def test_killed_hnet_resumes_to_the_uninterrupted_weights_and_results(smoke_hnet, tmp_path, monkeypatch):
    """Shuffled task batches (3 per epoch), validation every 2 epochs: killed inside an epoch (step 4) and
    right after a validation that ends an epoch (step 6)."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "-c", HNET, "--data.root", str(smoke_hnet["root"]), *QUIET, "--trainer.max_steps", "8"]
    args += ["--trainer.check_val_every_n_epoch", "2", "--last_checkpoint.every_n_train_steps", "1"]
    args += ["--model.init_args.max_shots", "1", "--model.init_args.eval_steps", "2"]  # a cheaper test
    _resume_runs([*args, "--test_after_fit", "true"], [4, 6], tmp_path, monkeypatch)


@pytest.mark.slow
def test_killed_hyperldm_resumes_to_the_uninterrupted_weights_and_results(
    smoke_hnet, smoke_adaptation, tmp_path, monkeypatch
):
    """Adaptation epochs (2 batches per epoch), diffusion noise, classifier-free dropout, EMA: killed inside
    an epoch (step 3) and at an epoch's end (step 4)."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "-c", HYPERLDM, "--data.root", str(smoke_hnet["root"]), *QUIET, "--trainer.max_steps", "6"]
    args += [
        "--model.init_args.upstream_ckpt",
        str(smoke_hnet["ckpt"]),
        "--data.adaptation",
        str(smoke_adaptation),
    ]
    args += ["--data.batch_size", "4", "--trainer.check_val_every_n_epoch", "3"]
    args += ["--model.init_args.sample_steps", "10", "--model.init_args.gammas", "[1.0]"]  # a cheaper test
    args += ["--model.init_args.max_shots", "1", "--model.init_args.controls", "[aligned, shuffled]"]
    args += ["--model.init_args.val_steps", "5"]
    args += ["--last_checkpoint.every_n_train_steps", "1", "--test_after_fit", "true"]
    _resume_runs(args, [3, 4], tmp_path, monkeypatch)


def test_resumable_loader_draws_as_the_plain_one_and_continues_a_pass():
    items = list(range(10))
    plain = DataLoader(items, batch_size=4, shuffle=True)
    torch.manual_seed(3)
    want = [[b.tolist() for b in plain] for _ in range(3)]
    after = torch.rand(1)
    torch.manual_seed(3)
    loader = resumable(DataLoader(items, batch_size=4, shuffle=True))
    assert isinstance(loader, ResumableLoader) and isinstance(loader.batch_sampler, ResumablePasses)
    state = torch.get_rng_state()
    iter(loader)  # set up, nothing taken: nothing drawn
    assert torch.equal(torch.get_rng_state(), state)
    assert [[b.tolist() for b in loader] for _ in range(3)] == want and torch.equal(torch.rand(1), after)

    torch.manual_seed(5)
    it = iter(loader)
    first = [next(it).tolist(), next(it).tolist()]
    saved = loader.state_dict()
    rest = [b.tolist() for b in it]
    torch.rand(7)  # training draws after the checkpoint
    again = resumable(DataLoader(items, batch_size=4, shuffle=True))
    again.load_state_dict(saved)
    state = torch.get_rng_state()
    assert [b.tolist() for b in again] == rest and sorted(sum(first + rest, [])) == items
    assert torch.equal(torch.get_rng_state(), state)  # the continued pass drew nothing
    # a finished pass is not continued: the next starts afresh
    again.load_state_dict(loader.state_dict())
    assert sorted(sum((b.tolist() for b in again), [])) == items
    assert isinstance(resumable(DataLoader(items, batch_sampler=BatchSampler(RandomSampler(items), 3, True))),
                      ResumableLoader)  # fmt: skip


def test_random_state_survives_a_weights_only_checkpoint(tmp_path):
    class Stage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.noise = torch.Generator().manual_seed(1)

    def seed(s: int) -> None:
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        stage.noise.manual_seed(s)

    def draws() -> tuple:
        return random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=stage.noise)

    stage = Stage()
    seed(1)
    torch.save(random_state(stage), tmp_path / "state.pt")
    want = draws()
    seed(9)
    set_random_state(torch.load(tmp_path / "state.pt", weights_only=True), stage)
    got = draws()
    assert got[:2] == want[:2] and torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
