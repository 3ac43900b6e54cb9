"""Result records: collection across batches and ranks, aggregation, rendering.

A record is one method × split × shots × seed:
``{"method", "split", "shots", "seed", "accuracy", "accuracy_pooled", "n_tasks"}`` (+ ``gamma`` and
``control`` for guided methods). ``accuracy`` is the task-averaged query accuracy (the headline metric),
``accuracy_pooled`` pools all query examples. Accuracies are percentages.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor

from meta_vqa.eval.methods import method_rank
from meta_vqa.eval.protocol import ShotResult
from meta_vqa.io import read_json, write_json, write_text

EXTRA_KEYS = ("gamma", "control", "classifier_scale")


def shots_key(s) -> tuple[int, int]:
    return (0, 0) if s == 0 else (1, 0) if s == "full" else (2, int(s))


class ResultCollector:
    """Accumulates per-task hits for (method, shots, extras) over batches; turns them into records."""

    def __init__(self) -> None:
        self._rows: dict[tuple, list[Tensor]] = defaultdict(list)

    def add(self, method: str, task: Tensor, results: dict, **extra) -> None:
        key_extra = tuple(sorted(extra.items()))
        for shots, r in results.items():
            r: ShotResult
            rows = torch.stack([task.double(), r.correct.double(), r.total.double(), r.eligible.double()], 1)
            self._rows[(method, shots, key_extra)].append(rows.detach().cpu())

    def add_evaluation(self, method: str, task: Tensor, results: dict, **extra) -> None:
        """The ``model`` rows of a :meth:`Protocol.evaluate` result under ``method``, with its ``chance``
        and ``majority`` reference rows (the same for every method of a run; reports count them once)."""
        self.add(method, task, results["model"], **extra)
        self.add("chance", task, results["chance"])
        self.add("majority", task, results["majority"])

    def records(
        self, split: str, seed: int, all_gather: Callable[[Tensor], Tensor] | None = None
    ) -> list[dict]:
        """Records for every collected key; ``all_gather`` merges the ranks' rows (duplicates dropped)."""
        out = []
        for (method, shots, extra), chunks in sorted(
            self._rows.items(), key=lambda kv: (method_rank(kv[0][0]), str(kv[0][2]), shots_key(kv[0][1]))
        ):
            rows = torch.cat(chunks)
            if all_gather is not None:
                rows = all_gather(rows).reshape(-1, 4).cpu()
            rows = _unique_tasks(rows)
            rows = rows[(rows[:, 3] > 0) & (rows[:, 2] > 0)]
            if len(rows) == 0:
                continue
            acc = (rows[:, 1] / rows[:, 2]).mean().item()
            pooled = (rows[:, 1].sum() / rows[:, 2].sum()).item()
            rec = {
                "method": method,
                "split": split,
                "shots": shots,
                "seed": seed,
                "accuracy": 100 * acc,
                "accuracy_pooled": 100 * pooled,
                "n_tasks": len(rows),
            }
            rec.update(dict(extra))
            out.append(rec)
        return out

    def reset(self) -> None:
        self._rows.clear()


def _unique_tasks(rows: Tensor) -> Tensor:
    """Keep the first row of each task id (a DistributedSampler repeats tasks to even out ranks)."""
    seen, keep = set(), []
    for i, t in enumerate(rows[:, 0].tolist()):
        if t not in seen:
            seen.add(t)
            keep.append(i)
    return rows[keep]


def _row_name(method: str, gamma=None, control=None, classifier_scale=None) -> str:
    name = method
    if gamma is not None:
        name += f" γ={gamma:g}"
    if classifier_scale is not None:
        name += f" s={classifier_scale:g}"
    if control and control != "aligned":
        name += f" ({control})"
    return name


def write_results(out_dir: str | Path, records: list[dict], title: str = "Results") -> Path:
    """Write ``results.json`` and ``results.md`` into ``out_dir``; returns the json path."""
    out_dir = Path(out_dir)
    write_json(out_dir / "results.json", records)
    write_text(out_dir / "results.md", render_markdown(records, title))
    return out_dir / "results.json"


def load_results(
    paths: Iterable[str | Path], exclude: str | Path | Iterable[str | Path] | None = None
) -> list[dict]:
    """All records of the given ``results.json`` files or folders (searched recursively).

    Files under ``exclude`` (folders, e.g. the one an aggregated report is written to) are skipped.
    """
    if exclude is None:
        exclude = []
    elif isinstance(exclude, str | Path):
        exclude = [exclude]
    skips = [Path(e).resolve() for e in exclude]
    records = []
    for p in paths:
        p = Path(p)
        files = sorted(p.rglob("results.json")) if p.is_dir() else [p]
        for f in files:
            if any(f.resolve().is_relative_to(skip) for skip in skips):
                continue
            records += read_json(f, "results file")
    return records


def aggregate(records: list[dict]) -> list[dict]:
    """Mean and std over seeds of records sharing (method, split, shots, gamma, control); dedupes seeds."""
    groups: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in records:
        key = (r["method"], r["split"], r["shots"], *(r.get(k) for k in EXTRA_KEYS))
        groups[key].setdefault(r["seed"], r)  # identical rows (e.g. chance written by every stage) count once
    out = []
    for key, by_seed in groups.items():
        accs = [r["accuracy"] for r in by_seed.values()]
        pooled = [r["accuracy_pooled"] for r in by_seed.values()]
        row = dict(zip(("method", "split", "shots", *EXTRA_KEYS), key))
        row.update(
            mean=statistics.fmean(accs),
            std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
            pooled_mean=statistics.fmean(pooled),
            seeds=len(accs),
            n_tasks=max(r["n_tasks"] for r in by_seed.values()),
        )
        out.append(row)
    return out


def render_markdown(records: list[dict], title: str = "Results") -> str:
    """Tables (one per split) of task-averaged query accuracy, mean ± std over seeds, shots as columns."""
    rows = aggregate(records)
    lines = [
        f"# {title}",
        "",
        "Task-averaged query accuracy (%) on the meta-test tasks; mean ± std over seeds where a row has "
        "several. `0` = zero-shot, `full` = fine-tuned on the whole support set, `k` = k examples per answer.",
        "",
    ]
    for split in sorted({r["split"] for r in rows}):
        sub = [r for r in rows if r["split"] == split]
        shots = sorted({r["shots"] for r in sub}, key=shots_key)
        methods = sorted(
            {(r["method"], *(r.get(k) for k in EXTRA_KEYS)) for r in sub},
            key=lambda m: (method_rank(m[0]), *(str(x) for x in m[1:])),
        )
        cell = {(r["method"], *(r.get(k) for k in EXTRA_KEYS), r["shots"]): r for r in sub}
        seeds = max(r["seeds"] for r in sub)
        lines += [
            f"## split: {split} ({seeds} seed{'s' if seeds > 1 else ''})",
            "",
            "| method | " + " | ".join(str(s) for s in shots) + " | tasks (0 / full) |",
            "|---|" + "---|" * (len(shots) + 1),
        ]
        for m in methods:
            name = _row_name(*m)
            cells = []
            for s in shots:
                r = cell.get((*m, s))
                spread = f" ± {r['std']:.1f}" if r is not None and r["seeds"] > 1 else ""
                cells.append("" if r is None else f"{r['mean']:.1f}{spread}")
            n = [str(cell[(*m, s)]["n_tasks"]) for s in (0, "full") if (*m, s) in cell]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {' / '.join(n)} |")
        lines.append("")
    return "\n".join(lines)


def render_compact(records: list[dict], indent: str = "   ") -> str:
    """A stage's records as a plain-text table for the terminal: one row per method (γ, scale, control),
    shots as columns, the chance level in the header (the markdown table is in results.md)."""
    rows = aggregate(records)
    lines = []
    for split in sorted({r["split"] for r in rows}):
        sub = [r for r in rows if r["split"] == split]
        refs = {r["shots"]: r["mean"] for r in sub if r["method"] == "chance"}
        sub = [r for r in sub if r["method"] not in ("chance", "majority")]
        if not sub:
            continue
        shots = sorted({r["shots"] for r in sub}, key=shots_key)
        keys = sorted(
            {(r["method"], *(r.get(k) for k in EXTRA_KEYS)) for r in sub},
            key=lambda m: (method_rank(m[0]), *(str(x) for x in m[1:])),
        )
        cell = {(r["method"], *(r.get(k) for k in EXTRA_KEYS), r["shots"]): r for r in sub}
        names = [_row_name(*m) for m in keys]
        width = max(len(n) for n in [*names, "accuracy (%)"])
        seeds = max(r["seeds"] for r in sub)
        tasks = max(r["n_tasks"] for r in sub)
        note = [f"{split} split", f"{tasks} test tasks"]
        if seeds > 1:
            note.append(f"mean of {seeds} seeds")
        if 0 in refs:
            note.append(f"chance {refs[0]:.1f}")
        head = f"{indent}{'accuracy (%)':<{width}} " + " ".join(f"{str(s):>5}" for s in shots)
        lines.append(f"{head}   ({', '.join(note)})")
        for name, m in zip(names, keys):
            values = [cell.get((*m, s)) for s in shots]
            text = " ".join(f"{r['mean']:5.1f}" if r is not None else " " * 5 for r in values)
            lines.append(f"{indent}{name:<{width}} {text}".rstrip())
    return "\n".join(lines)
