"""The DataModule: tensors per batch match the task files; bad feature stores fail with clear errors."""

import json
import shutil

import pytest
import torch

from meta_vqa.data.batch import TaskBatch
from meta_vqa.data.datamodule import MetaVQADataModule, validation_slice
from meta_vqa.data.features import feature_dir, save_tensors, write_manifest
from meta_vqa.data.tasks import load_tasks
from meta_vqa.errors import DataError


def test_batches_hold_the_task_files_examples(synthetic_root):
    dm = MetaVQADataModule(str(synthetic_root), batch_size=3, eval_batch_size=3)
    idx_batch = next(iter(dm.test_dataloader()))
    batch = dm.on_after_batch_transfer(idx_batch, 0)
    by_question = {t.question: t for t in load_tasks(synthetic_root / "meta_test.json")}
    store = dm.store
    row = {img: i for i, img in enumerate(store.image_ids)}
    for b in range(len(batch)):
        t = by_question[dm.question(int(batch.task[b]))]
        n = len(t.support)
        assert batch.support_mask[b].sum() == n and batch.support_mask[b, :n].all()
        expected_x = store.images[[row[i] for i, _ in t.support]]
        torch.testing.assert_close(batch.support_x[b, :n], expected_x)
        assert batch.support_y[b, :n].tolist() == [y for _, y in t.support]
        assert batch.query_y[b, : len(t.query)].tolist() == [y for _, y in t.query]
        assert batch.answer_mask[b].sum() == t.num_answers
        torch.testing.assert_close(batch.question[b], store.question_features[int(batch.task[b])])


def test_evaluation_batches_group_tasks_of_similar_size(synthetic_root):
    dm = MetaVQADataModule(str(synthetic_root), eval_batch_size=2)
    sizes = [int(b.support_idx.ge(0).sum(1).max()) for b in dm.test_dataloader()]
    assert sizes == sorted(sizes)
    assert sum(len(b.task) for b in dm.test_dataloader()) == len(dm.test_tasks)


def test_validation_slice_is_seeded_and_disjoint(synthetic_root):
    a = MetaVQADataModule(str(synthetic_root), val_fraction=0.3, val_seed=1)
    b = MetaVQADataModule(str(synthetic_root), val_fraction=0.3, val_seed=1)
    c = MetaVQADataModule(str(synthetic_root), val_fraction=0.3, val_seed=2)
    assert [t.question for t in a.val_tasks] == [t.question for t in b.val_tasks]
    assert {t.question for t in a.val_tasks}.isdisjoint({t.question for t in a.train_tasks})
    assert {t.question for t in a.val_tasks}.isdisjoint({t.question for t in a.test_tasks})
    assert len(a.train_tasks) + len(a.val_tasks) == len(load_tasks(synthetic_root / "meta_train.json"))
    assert validation_slice(10, 0.3, 1) != validation_slice(10, 0.3, 2) or c.val_tasks != a.val_tasks
    assert validation_slice(10, 0.0, 1) == [] and len(validation_slice(10, 0.01, 1)) == 1


def test_chunks_sort_by_size_and_trim_padding(synthetic_root):
    dm = MetaVQADataModule(str(synthetic_root), eval_batch_size=8)
    batch = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    chunks = batch.chunks(2)
    assert sum(len(c) for c in chunks) == len(batch)
    sizes = [(c.support_mask.sum(1) + c.query_mask.sum(1)).tolist() for c in chunks]
    flat = [s for c in sizes for s in c]
    assert flat == sorted(flat)
    for c in chunks:
        assert c.support_x.shape[1] == int(c.support_mask.sum(1).max())


def _sized_batch(sizes):
    n, m = len(sizes), max(sizes)
    mask = torch.arange(m).expand(n, m) < torch.tensor(sizes).unsqueeze(1)
    z = torch.zeros(n, m)
    return TaskBatch(
        task=torch.arange(n),
        question=torch.zeros(n, 2),
        answers=torch.zeros(n, 2, 2),
        answer_mask=torch.ones(n, 2, dtype=torch.bool),
        support_x=z.long(),
        support_y=z.long(),
        support_mask=mask,
        query_x=z[:, :1].long(),
        query_y=z[:, :1].long(),
        query_mask=torch.zeros(n, 1, dtype=torch.bool),
    )


def test_chunks_keep_long_tailed_tasks_from_padding_the_rest():
    # a meta-batch shaped like Meta-VQA's: most tasks small, two 30x larger
    sizes = [40, 20, 14, 13, 80, 142, 38, 55, 32, 180, 81, 12, 97, 14, 55, 18, 1184, 845]
    chunks = _sized_batch(sizes).chunks(8)
    assert sorted(t for c in chunks for t in c.task.tolist()) == list(range(len(sizes)))
    padded = real = 0
    for c in chunks:
        n = c.support_mask.sum(1)
        assert len(c) <= 8 and c.support_mask.shape[1] == int(n.max())
        assert len(c) == 1 or len(c) * int(n.max()) <= 1.5 * int(n.sum())
        padded, real = padded + c.support_mask.numel(), real + int(n.sum())
    assert sorted(chunks[-1].support_mask.sum(1).tolist()) == [845, 1184]  # the large tasks run together
    assert padded <= 1.5 * real  # count-only chunks of 8 would pad to 3x here


def _copy(synthetic_root, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(synthetic_root, root)
    return root


def test_feature_file_of_another_dimension_is_named(synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    fdir = feature_dir(root, "synthetic")
    n = len(json.loads((fdir / "images.json").read_text()))
    save_tensors(fdir / "images.safetensors", {"features": torch.randn(n, 7)})
    manifest = json.loads((root / "dataset.json").read_text())
    write_manifest(root, {k: v for k, v in manifest.items() if k != "files"})
    with pytest.raises(
        DataError, match=r"images\.safetensors: feature dimension 7, the dataset manifest says 32"
    ):
        MetaVQADataModule(str(root))


def test_image_without_features_names_task_and_image(synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    raw = json.loads((root / "meta_train.json").read_text())
    q = next(iter(raw))
    raw[q]["train"][0][0] = "ghost-image"
    (root / "meta_train.json").write_text(json.dumps(raw))
    manifest = json.loads((root / "dataset.json").read_text())
    write_manifest(root, {k: v for k, v in manifest.items() if k != "files"})
    with pytest.raises(DataError) as e:
        MetaVQADataModule(str(root))
    assert "'ghost-image' has no features" in str(e.value) and repr(q) in str(e.value)


def test_changed_file_is_detected_by_the_manifest(synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    with open(root / "meta_test.json", "a") as f:
        f.write(" ")
    with pytest.raises(DataError, match="meta_test.json: missing or changed"):
        MetaVQADataModule(str(root))
    MetaVQADataModule(str(root), verify=False)  # the user may opt out


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="dataset.json: dataset manifest not found"):
        MetaVQADataModule(str(tmp_path))


def test_subsample_keeps_random_valid_examples(synthetic_root):
    dm = MetaVQADataModule(str(synthetic_root), eval_batch_size=4)
    batch = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)
    sub = batch.subsample(5, 3, torch.Generator().manual_seed(0))
    assert sub.support_x.shape[1] == 5 and sub.query_x.shape[1] == 3
    assert sub.support_mask.all() and sub.query_mask.all()
    for b in range(len(batch)):
        full = {tuple(r) for r in batch.support_x[b][batch.support_mask[b]].tolist()}
        rows = [tuple(r) for r in sub.support_x[b].tolist()]
        assert len(set(rows)) == 5 and set(rows) <= full
        # labels travel with their features
        for r, y in zip(rows, sub.support_y[b].tolist()):
            i = batch.support_x[b].tolist().index(list(r))
            assert batch.support_y[b, i].item() == y
    assert (
        batch.subsample(None, None) is not None
        and batch.subsample(10_000, None).support_x.shape == batch.support_x.shape
    )
