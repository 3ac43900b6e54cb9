"""Build a dataset folder beside its destination and swap it in only when complete.

A builder writes into ``.<name>.partial`` next to ``out`` (:func:`fresh_staging`); :func:`publish` moves
the finished folder onto ``out`` with two renames, so a kill at any moment leaves either the old complete
dataset, the new one, or (between the renames) the old one parked as ``.<name>.old``, which
:func:`recover` puts back. A reader therefore never sees a half-written dataset under ``out``.

A dataset is reused only after every file's sha256 was checked against its manifest (:func:`reusable`);
then what killed runs left behind (the build folder, ``.*.tmp`` files of interrupted atomic writes) is
removed.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from meta_vqa.data.features import MANIFEST, read_manifest, verify_manifest
from meta_vqa.errors import DataError

log = logging.getLogger(__name__)


def staging_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def _parked_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.old"


def recover(out: str | Path) -> None:
    """Finish or undo a swap a kill interrupted (the dataset was parked but the new one not moved in)."""
    out = Path(out)
    parked = _parked_dir(out)
    if parked.is_dir() and not out.exists():
        log.warning("%s: restoring the dataset parked by an interrupted swap", out)
        parked.rename(out)
    elif parked.is_dir():
        shutil.rmtree(parked)


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Delete the ``.*.tmp`` files interrupted atomic writes left under ``folder``; returns them."""
    folder = Path(folder)
    found = [p for p in folder.rglob(".*.tmp") if p.is_file()] if folder.is_dir() else []
    for p in found:
        p.unlink()
    if found:
        log.info("%s: removed %d unfinished temporary files", folder, len(found))
    return found


def fresh_staging(out: str | Path, keep: tuple[str, ...] = ()) -> Path:
    """An empty build folder for ``out``, but for the entries named in ``keep`` that an interrupted build
    left there (work that checks itself, e.g. a trained CLIP or encoded image shards)."""
    staging = staging_dir(out)
    if staging.is_dir():
        for entry in staging.iterdir():
            if entry.name in keep:
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        remove_leftovers(staging)
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def publish(staging: Path, out: str | Path) -> None:
    """Swap the finished ``staging`` folder in as ``out`` (the old dataset, if any, is removed)."""
    out = Path(out)
    parked = _parked_dir(out)
    if parked.exists():
        shutil.rmtree(parked)
    if out.exists():
        out.rename(parked)
    staging.rename(out)
    if parked.exists():
        shutil.rmtree(parked)


def normalise(options: dict) -> dict:
    """Options as a manifest stores them (tuples become lists), so a rerun's options compare equal."""
    return json.loads(json.dumps(options, default=str))


def reusable(out: str | Path, builder: str, version: int, options: dict, force: bool) -> dict | None:
    """The manifest of ``out`` if it is a complete, unchanged dataset of this builder and these options.

    Raises if ``out`` holds another builder's dataset (unless ``force``), so a typo never overwrites it.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    recover(out)
    if not (out / MANIFEST).is_file():
        if out.exists() and any(out.iterdir()) and not force:
            raise DataError(
                f"{out}: folder exists but holds no dataset.json; choose another --out or --force"
            )
        return None
    if force:
        return None
    manifest = read_manifest(out)
    if manifest.get("builder") != builder:
        raise DataError(
            f"{out / MANIFEST}: the folder holds a {manifest.get('builder')!r} dataset, not {builder!r}; "
            "choose another --out or --force"
        )
    if manifest.get("builder_version") != version or manifest.get("options") != normalise(options):
        log.info("%s: built with other options; rebuilding", out)
        return None
    bad = verify_manifest(out, manifest)
    if bad:
        log.warning("%s: %s is missing or changed since it was built; rebuilding", out, bad[0])
        return None
    # verified and kept: what interrupted builds left behind goes
    remove_leftovers(out)
    if staging_dir(out).exists():
        shutil.rmtree(staging_dir(out))
    return manifest
