"""The adaptation dataset (the authors' precomputed adaptations): subsets, the file contract, resuming without duplicates."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import meta_vqa.stages.adaptation_writer as writer_module
from meta_vqa.cli import main
from meta_vqa.data.adaptation import AdaptationRecipe, plan_jobs, subset_item, subset_of
from meta_vqa.data.datamodule import MetaVQADataModule
from meta_vqa.data.latents import AdaptationData
from meta_vqa.meta.maml import InnerLoop
from meta_vqa.stages.hnet import HNetStage

REPO = Path(__file__).resolve().parents[1]
ADAPT = str(REPO / "conf" / "smoke" / "adapt.yaml")
EPOCHS = 3


def test_subsets_keep_ceil_n_f_examples_with_f_in_range():
    recipe = AdaptationRecipe(epochs=5, seed=3)
    fs = []
    for task in range(40):
        for epoch in range(5):
            n = 5 + task
            f, keep = subset_of(n, task, epoch, recipe)
            fs.append(f)
            assert 2 / 3 <= f < 1
            assert len(keep) == math.ceil(n * f) and len(set(keep)) == len(keep)
            assert all(0 <= i < n for i in keep)
            assert subset_of(n, task, epoch, recipe) == (f, keep)  # depends only on (seed, epoch, task)
    assert max(fs) - min(fs) > 0.2  # really drawn, not constant
    item = {"task": 7, "support": [10, 11, 12], "support_y": [0, 1, 0], "query": [13, 14], "query_y": [1, 1]}
    sub, f = subset_item(item, 2, recipe)
    pairs = set(zip(item["support"] + item["query"], item["support_y"] + item["query_y"]))
    assert set(zip(sub["support"], sub["support_y"])) <= pairs and sub["query"] == []


def test_plan_lists_support_jobs_then_epochs():
    jobs = plan_jobs({"train": 4, "val": 2, "test": 3}, AdaptationRecipe(epochs=2))
    assert [j.name for j in jobs] == [
        "support_train",
        "support_val",
        "support_test",
        "epoch_00000",
        "epoch_00001",
    ]
    assert [len(j.items) for j in jobs] == [4, 2, 3, 4, 4]


def _predict(hnet, out, *extra) -> int:
    """``meta-vqa predict`` of the adaptation dataset into ``out`` (run from ``out``'s parent folder)."""
    os.chdir(Path(out).parent)
    args = ["predict", "-c", ADAPT, "--data.root", str(hnet["root"]), "--ckpt_path", str(hnet["ckpt"])]
    args += ["--data.adapt_epochs", str(EPOCHS), "--trainer.enable_progress_bar", "false"]
    args += ["--stage_dir", str(out), *extra]
    return main(args)


@pytest.fixture(autouse=True, scope="module")
def _restore_cwd():
    cwd = os.getcwd()
    yield
    os.chdir(cwd)


@pytest.fixture(scope="module")
def uninterrupted(smoke_hnet, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapt") / "full"
    assert _predict(smoke_hnet, out) == 0
    return out


def test_file_contract_and_values(smoke_hnet, uninterrupted):
    data = AdaptationData.load(uninterrupted)
    t = data.tensors
    dm = MetaVQADataModule(str(smoke_hnet["root"]), val_fraction=0.2, eval_batch_size=4)
    stage = HNetStage.load_from_checkpoint(smoke_hnet["ckpt"], map_location="cpu")
    d, T = stage.latent_dim, len(dm.train_tasks)
    assert t["latents"].shape == (EPOCHS, T, d) and t["fractions"].shape == (EPOCHS, T)
    assert ((t["fractions"] >= 2 / 3) & (t["fractions"] < 1)).all()
    assert t["task_ids"].tolist() == dm.adaptation_task_ids("train")
    torch.testing.assert_close(t["questions"], dm.store.question_features[t["task_ids"]])
    torch.testing.assert_close(t["z0"], stage.z0.detach())
    for s in ("train", "val", "test"):
        lat, ids, q = data.support(s)
        assert lat.shape == (len(dm.tasks(s)), d) and ids.tolist() == dm.adaptation_task_ids(s)
        assert q.shape == (len(ids), dm.question_dim)
    # the stored support-test latents are the HNet's latents adapted on the support split
    batch = dm.to_batch(next(iter(dm.loader("test", batch_size=100))))
    with torch.enable_grad():
        z = stage.support_latents(batch, InnerLoop(5, 0.1))
    stored, ids = data.support("test")[:2]
    row = {t: i for i, t in enumerate(ids.tolist())}
    stored = stored[[row[t] for t in batch.task.tolist()]]  # the loader may order tasks differently
    torch.testing.assert_close(stored, z, rtol=1e-4, atol=1e-5)
    # different epochs saw different subsets
    assert not torch.allclose(t["latents"][0], t["latents"][1])
    meta = json.loads((uninterrupted / "adaptation.json").read_text())
    assert meta["upstream"]["sha256"] == data.upstream_sha256 and len(data.upstream_sha256) == 64
    assert meta["config"]["recipe"]["epochs"] == EPOCHS
    assert not (uninterrupted / "parts").exists()


def test_interrupted_run_resumes_without_duplicates(smoke_hnet, uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    written = []
    real = writer_module.write_part

    def crash_after_two_epochs(o, job, tensors):
        if job == "epoch_00002":
            raise RuntimeError("simulated crash")
        written.append(job)
        return real(o, job, tensors)

    monkeypatch.setattr(writer_module, "write_part", crash_after_two_epochs)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _predict(smoke_hnet, out)
    assert written == ["support_train", "support_val", "support_test", "epoch_00000", "epoch_00001"]
    assert not (out / "adaptation.safetensors").exists()
    with pytest.raises(Exception, match="unfinished run"):
        AdaptationData.load(out)

    written.clear()
    monkeypatch.setattr(writer_module, "write_part", lambda o, job, t: written.append(job) or real(o, job, t))
    assert _predict(smoke_hnet, out) == 0
    assert written == ["epoch_00002"]  # only what was missing
    a, b = (
        load_file(str(out / "adaptation.safetensors")),
        load_file(str(uninterrupted / "adaptation.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)

    # a finished dataset is left alone; other settings are refused
    written.clear()
    assert _predict(smoke_hnet, out) == 0 and written == []
    assert _predict(smoke_hnet, out, "--data.adapt_min_fraction", "0.5") == 2
    assert (
        _predict(
            smoke_hnet,
            out,
            "--data.adapt_min_fraction",
            "0.5",
            "--trainer.callbacks.init_args.overwrite",
            "true",
        )
        == 0
    )
    assert ((load_file(str(out / "adaptation.safetensors"))["fractions"]) < 2 / 3).any()


def test_writer_needs_the_adaptation_mode_and_a_checkpoint(smoke_hnet, tmp_path, capfd):
    assert _predict(smoke_hnet, tmp_path / "x", "--data.predict_split", "test") == 2
    assert "data.predict_split" in capfd.readouterr().err
    args = ["predict", "-c", ADAPT, "--data.root", str(smoke_hnet["root"])]
    args += ["--stage_dir", str(tmp_path / "y"), "--trainer.enable_progress_bar", "false"]
    assert main(args) == 2
    assert "--ckpt_path" in capfd.readouterr().err


def test_latent_batches_take_one_random_epoch_per_pass_and_drop_leftovers():
    from meta_vqa.data.latents import EpochBatches

    sampler = EpochBatches(epochs=5, tasks=10, batch_size=3, seed=1)
    seen_epochs = set()
    for p in range(8):
        sampler.set_epoch(p)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 3  # 10 // 3, the leftover task dropped
        flat = [i for b in batches for i in b]
        epochs = {i // 10 for i in flat}
        assert len(epochs) == 1 and len(set(flat)) == 9  # one adaptation epoch, distinct tasks
        seen_epochs |= epochs
        sampler.set_epoch(p)
        assert list(sampler) == batches  # depends only on (seed, pass)
    assert len(seen_epochs) > 1


def test_latent_batch_larger_than_the_tasks_takes_all_of_them(caplog):
    from meta_vqa.data.latents import EpochBatches

    sampler = EpochBatches(epochs=2, tasks=5, batch_size=8, seed=0)  # e.g. the family split's fewer tasks
    batches = list(sampler)
    assert len(batches) == 1 and sorted(i % 5 for i in batches[0]) == [0, 1, 2, 3, 4]
    assert "exceeds the 5 tasks" in caplog.text
