"""``prepare`` over an existing dataset, killed at every file it writes and at every step of the swap:
the folder always holds the old dataset, usable, or the new one, complete; the next ``prepare`` checks
before it says "already built" and removes what the killed run left."""

import hashlib
import tempfile
from pathlib import Path

import pytest

import meta_vqa.data.features
import meta_vqa.io
import meta_vqa.prepare.staging
from meta_vqa.cli import main
from meta_vqa.data.datamodule import MetaVQADataModule
from meta_vqa.data.features import verify_manifest


class Killed(BaseException):
    """A SIGKILL: no ``except``/``finally`` of the code under test gets to clean up."""


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def _leftovers(parent: Path) -> list[Path]:
    return [p for p in parent.rglob("*") if p.name.endswith((".tmp", ".partial", ".old"))]


def _dying_writes(monkeypatch, kill_at: int | None) -> list[int]:
    """Every atomic file write counts; the ``kill_at``-th dies right after creating its temporary file (a
    zero-byte ``.*.tmp`` left behind, as a kill leaves it)."""
    real = meta_vqa.io.atomic_write
    calls = [0]

    def write(path, fn):
        calls[0] += 1
        if calls[0] == kill_at:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            raise Killed(path)
        return real(path, fn)

    monkeypatch.setattr(meta_vqa.io, "atomic_write", write)
    monkeypatch.setattr(meta_vqa.data.features, "atomic_write", write)
    return calls


def _prepare(out: Path, *extra: str) -> int:
    return main(["prepare", "synthetic", "--out", str(out), *extra])


def _usable(out: Path) -> None:
    assert verify_manifest(out) == []
    MetaVQADataModule(str(out), batch_size=4)  # loads, sha256 checked


def test_prepare_force_killed_at_every_file_leaves_the_old_dataset_or_the_new_one(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "data"
    new = tmp_path / "new"
    calls = _dying_writes(monkeypatch, None)
    assert _prepare(new, "--seed", "5") == 0
    writes, want_new = calls[0], _snapshot(new)
    assert writes >= 10  # features, ids, task files, prompts, manifest
    assert _prepare(out, "--seed", "3") == 0
    old = _snapshot(out)
    assert old != want_new
    capsys.readouterr()

    for i in range(1, writes + 1):
        _dying_writes(monkeypatch, i)
        with pytest.raises(Killed):
            _prepare(out, "--seed", "5", "--force")
        assert _snapshot(out) == old, f"killed at write {i}: the old dataset changed"
        _usable(out)
        assert _leftovers(tmp_path), "the kill left nothing behind: the test lost its point"
        _dying_writes(monkeypatch, None)
        assert _prepare(out, "--seed", "3") == 0  # the old options: kept, after every file was checked
        assert "already built, every file checked" in capsys.readouterr().out
        assert _leftovers(tmp_path) == []

    assert _prepare(out, "--seed", "5", "--force") == 0
    assert _snapshot(out) == want_new and _leftovers(tmp_path) == []


@pytest.mark.parametrize("kill", ["after parking the old", "after moving the new in"])
def test_prepare_killed_during_the_swap_keeps_a_whole_dataset(tmp_path, monkeypatch, kill):
    """The swap parks the old dataset (rename), moves the new one in (rename), deletes the parked one. Killed
    after the first, no dataset has the name until the next prepare puts the parked one back; after the
    second, the new one is there, complete, and the next prepare removes the parked one."""
    out, new = tmp_path / "data", tmp_path / "new"
    assert _prepare(new, "--seed", "5") == 0
    assert _prepare(out, "--seed", "3") == 0
    old, want_new = _snapshot(out), _snapshot(new)
    staging = meta_vqa.prepare.staging
    if kill == "after parking the old":
        real, calls = Path.rename, [0]

        def rename(self, target):
            calls[0] += 1
            if calls[0] == 2:
                raise Killed(target)
            return real(self, target)

        monkeypatch.setattr(staging.Path, "rename", rename)
    else:

        def rmtree(path, *args, **kwargs):
            raise Killed(path)

        monkeypatch.setattr(staging.shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        _prepare(out, "--seed", "5", "--force")
    monkeypatch.undo()
    if kill == "after parking the old":
        assert not out.exists()
        assert _prepare(out, "--seed", "3") == 0  # put back, checked, kept
        assert _snapshot(out) == old
    else:
        assert _snapshot(out) == want_new
        _usable(out)
        assert _prepare(out, "--seed", "5") == 0  # kept
        assert _snapshot(out) == want_new
    assert _leftovers(tmp_path) == []


def test_a_kept_dataset_is_checked_before_it_is_reused(tmp_path, capsys):
    out = tmp_path / "data"
    assert _prepare(out) == 0
    want = _snapshot(out)
    (out / "features" / "synthetic" / "images.json").write_text("[]")  # edited by hand
    capsys.readouterr()
    assert _prepare(out) == 0
    assert "synthetic dataset built" in capsys.readouterr().out and _snapshot(out) == want
    (out / "meta_test.json").unlink()
    assert _prepare(out) == 0 and _snapshot(out) == want


def test_synthetic_task_count_is_an_option_and_a_rebuild_with_another_replaces_it(tmp_path, capsys):
    import json

    root = tmp_path / "syn"
    assert main(["prepare", "synthetic", "--out", str(root), "--tasks-per-attribute", "10"]) == 0
    train = json.loads((root / "meta_train.json").read_text())
    test = json.loads((root / "meta_test.json").read_text())
    assert (len(train), len(test)) == (28, 12)  # 4 attributes x 10 tasks, 70 / 30
    capsys.readouterr()
    assert main(["prepare", "synthetic", "--out", str(root), "--tasks-per-attribute", "10"]) == 0
    assert "already built" in capsys.readouterr().out
    assert main(["prepare", "synthetic", "--out", str(root)]) == 0  # the default, 4 per attribute: rebuilt
    assert "built" in capsys.readouterr().out
    assert len(json.loads((root / "meta_test.json").read_text())) == 5
    assert main(["prepare", "synthetic", "--out", str(root), "--tasks-per-attribute", "1"]) == 2
    assert "--tasks-per-attribute must be at least 2" in capsys.readouterr().err
