"""The feature store: safetensors matrices plus id lists, described by a ``dataset.json`` manifest.

Layout of ``<root>/features/<encoder>/``:

* ``images.safetensors`` (``features`` [N, d]) and ``images.json`` (the N image ids, in row order);
* ``questions.safetensors`` (``features`` [Q, d_q]) and ``questions.json`` (the Q question strings);
* ``answers.safetensors`` (``features`` [M, d], ``offsets`` [Q + 1] int64) and ``answers.json``
  (``[[question, [answer, ...]], ...]``): the answer prompts of question ``i`` are rows
  ``offsets[i]:offsets[i+1]``, in the order of the task's ``"answers"``.

``<root>/dataset.json`` records the encoder, the dimensions, the counts, the builder version and the
sha256 of every file, so a consumer can tell a complete, valid dataset from a half-written one.
Features are stored un-normalised in float32, as the authors stored them, and are finite: a NaN or infinite
value is refused when a dataset is written and when it is loaded (:func:`check_finite`). Never pickles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from meta_vqa.errors import DataError
from meta_vqa.io import atomic_write, read_json, sha256_file, write_json

MANIFEST = "dataset.json"
KINDS = ("images", "questions", "answers")


def feature_dir(root: str | Path, encoder: str) -> Path:
    return Path(root) / "features" / encoder


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save contiguous tensors to a safetensors file atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def check_finite(path: Path, matrix: torch.Tensor, row_name: Callable[[int], str]) -> None:
    """Raise one :class:`DataError` naming the file, the first row with a NaN or infinite value and what
    that row is (``row_name(row)``, e.g. "image 'img17'")."""
    rows = torch.isfinite(matrix.reshape(matrix.shape[0], -1)).all(dim=1)
    if bool(rows.all()):
        return
    bad = (~rows).nonzero().flatten()
    more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
    r = int(bad[0])
    raise DataError(f"{path}: row {r} ({row_name(r)}) is not finite{more}")


def _answer_row_name(questions: Sequence[str], answers: Sequence[Sequence[str]], offsets: torch.Tensor):
    def name(row: int) -> str:
        q = int(torch.searchsorted(offsets, torch.tensor(row), right=True)) - 1
        return f"answer {answers[q][row - int(offsets[q])]!r} of question {questions[q]!r}"

    return name


def write_features(
    root: str | Path,
    encoder: str,
    image_ids: Sequence[str],
    image_features: torch.Tensor,
    questions: Sequence[str],
    question_features: torch.Tensor,
    answers: Sequence[Sequence[str]],
    answer_features: Sequence[torch.Tensor],
) -> list[Path]:
    """Write the three feature files of one encoder; returns the paths written.

    ``answers[i]`` and ``answer_features[i]`` ([K_i, d]) belong to ``questions[i]``.
    """
    out = feature_dir(root, encoder)
    if len(image_ids) != image_features.shape[0]:
        raise DataError(f"{out}: {len(image_ids)} image ids but {image_features.shape[0]} feature rows")
    if len(questions) != question_features.shape[0] or len(questions) != len(answers):
        raise DataError(f"{out}: question ids, question features and answer lists differ in length")
    lengths = [len(a) for a in answers]
    for q, a, f in zip(questions, answers, answer_features):
        if f.shape[0] != len(a):
            raise DataError(f"{out}: task {q!r}: {len(a)} answers but {f.shape[0]} answer feature rows")
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    answer_matrix = torch.cat(list(answer_features)).float()
    check_finite(out / "images.safetensors", image_features, lambda r: f"image {image_ids[r]!r}")
    check_finite(out / "questions.safetensors", question_features, lambda r: f"question {questions[r]!r}")
    check_finite(out / "answers.safetensors", answer_matrix, _answer_row_name(questions, answers, offsets))
    save_tensors(out / "images.safetensors", {"features": image_features.float()})
    write_json(out / "images.json", list(image_ids), indent=None)
    save_tensors(out / "questions.safetensors", {"features": question_features.float()})
    write_json(out / "questions.json", list(questions), indent=None)
    save_tensors(out / "answers.safetensors", {"features": answer_matrix, "offsets": offsets})
    write_json(out / "answers.json", [[q, list(a)] for q, a in zip(questions, answers)], indent=None)
    return [out / f"{kind}.{ext}" for kind in KINDS for ext in ("safetensors", "json")]


def write_manifest(root: str | Path, info: dict) -> dict:
    """Write ``dataset.json``: ``info`` plus the sha256 of every file under ``root`` (except itself)."""
    root = Path(root)
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    )
    manifest = dict(info)
    manifest["files"] = {str(p.relative_to(root)): sha256_file(p) for p in files}
    write_json(root / MANIFEST, manifest)
    return manifest


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: dataset manifest not found (build the dataset with `meta-vqa prepare`)")
    return read_json(path, "dataset manifest")


def verify_manifest(root: str | Path, manifest: dict | None = None) -> list[str]:
    """Return the files listed in the manifest that are missing or whose sha256 differs."""
    root = Path(root)
    manifest = manifest if manifest is not None else read_manifest(root)
    bad = []
    for rel, digest in manifest.get("files", {}).items():
        p = root / rel
        if not p.is_file() or sha256_file(p) != digest:
            bad.append(rel)
    return bad


def _load_matrix(path: Path, key: str = "features") -> torch.Tensor:
    if not path.is_file():
        raise DataError(f"{path}: feature file not found")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise DataError(f"{path}: not a readable safetensors file ({e})") from None
    if key not in tensors:
        raise DataError(f"{path}: missing tensor {key!r}")
    return tensors[key] if key != "features" else tensors[key].float()


def _load_ids(path: Path) -> list:
    return read_json(path, "id list")


@dataclass
class FeatureStore:
    """All features of one encoder, in memory (a few MB for the embedded set, ~0.4 GB for Meta-VQA)."""

    encoder: str
    image_ids: list[str]
    images: torch.Tensor  # [N, d]
    questions: list[str]
    question_features: torch.Tensor  # [Q, d_q]
    answers: list[list[str]]  # per question
    answer_features: torch.Tensor  # [M, d]
    answer_offsets: torch.Tensor  # [Q + 1]

    @property
    def dim(self) -> int:
        return self.images.shape[1]

    @property
    def question_dim(self) -> int:
        return self.question_features.shape[1]

    @classmethod
    def load(cls, root: str | Path, encoder: str, dim: int | None = None) -> FeatureStore:
        """Load and cross-check the three feature files; ``dim`` is the expected feature width."""
        d = feature_dir(root, encoder)
        images = _load_matrix(d / "images.safetensors")
        image_ids = _load_ids(d / "images.json")
        qf = _load_matrix(d / "questions.safetensors")
        questions = _load_ids(d / "questions.json")
        af = _load_matrix(d / "answers.safetensors")
        offsets = _load_matrix(d / "answers.safetensors", "offsets").long()
        answers = _load_ids(d / "answers.json")
        if images.ndim != 2 or len(image_ids) != images.shape[0]:
            raise DataError(
                f"{d / 'images.safetensors'}: {tuple(images.shape)} rows do not match "
                f"{len(image_ids)} ids in images.json"
            )
        if len(set(image_ids)) != len(image_ids):
            raise DataError(f"{d / 'images.json'}: duplicate image ids")
        if qf.ndim != 2 or len(questions) != qf.shape[0]:
            raise DataError(
                f"{d / 'questions.safetensors'}: {tuple(qf.shape)} rows do not match "
                f"{len(questions)} questions in questions.json"
            )
        if (
            len(answers) != len(questions)
            or offsets.numel() != len(questions) + 1
            or offsets[-1] != af.shape[0]
        ):
            raise DataError(
                f"{d / 'answers.safetensors'}: offsets do not match answers.json and questions.json"
            )
        for i, (entry, q) in enumerate(zip(answers, questions)):
            if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == q):
                raise DataError(f"{d / 'answers.json'}: entry {i} is not [{q!r}, [answers...]]")
            if offsets[i + 1] - offsets[i] != len(entry[1]):
                raise DataError(
                    f"{d / 'answers.json'}: task {q!r}: {len(entry[1])} answers but "
                    f"{int(offsets[i + 1] - offsets[i])} answer feature rows"
                )
        for name, mat in (("images", images), ("answers", af)):
            if dim is not None and mat.shape[1] != dim:
                raise DataError(
                    f"{d / (name + '.safetensors')}: feature dimension {mat.shape[1]}, "
                    f"the dataset manifest says {dim}"
                )
        if af.shape[1] != images.shape[1]:
            raise DataError(
                f"{d / 'answers.safetensors'}: feature dimension {af.shape[1]} differs from the "
                f"image features' {images.shape[1]}"
            )
        texts = [a for _, a in answers]
        check_finite(d / "images.safetensors", images, lambda r: f"image {image_ids[r]!r}")
        check_finite(d / "questions.safetensors", qf, lambda r: f"question {questions[r]!r}")
        check_finite(d / "answers.safetensors", af, _answer_row_name(questions, texts, offsets))
        return cls(encoder, image_ids, images, questions, qf, [a for _, a in answers], af, offsets)
