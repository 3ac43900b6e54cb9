"""The run report (``meta-vqa report RUN``, also the pipeline's last step).

From every ``results.json``, ``diagnostics.json`` and ``latents.safetensors`` under a run folder it writes,
into the report folder (``RUN/report``, or ``--out``) and nowhere else:

* ``results.json`` (all records) and ``results.md``: one table per split (every method id, zero-shot,
  k = 1..5 and whole-support fine-tuning, mean ± std over seeds where there are several, the aligned /
  shuffled / empty controls of the guided methods), the method ids the run lacks, what the run shows
  (each guided method against its controls, the strongest baseline and its ceiling; the paper's claims with
  the uncertainty the seeds give; stages that look broken), and the memorisation table;
* ``memorisation.json``: per guided method, seed and split, the mean distance from each generated latent to
  its nearest meta-train latent, next to the same distance for the test tasks' own support-adapted latents
  (ratio < 1: generated latents sit closer to the training set than the true ones, i.e. copying);
* plots as PNG, and as TensorBoard figures in ``tensorboard/`` (the pipeline puts them in the run's
  TensorBoard instead): accuracy vs γ, k-shot curves, and a 2-D PCA of each latent space coloured by
  question family;
* ``report.json``: what the report was made from (so a later report never reads this one's records back).
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from meta_vqa.errors import MetaVQAError
from meta_vqa.eval.claims import claims
from meta_vqa.eval.methods import DIAGNOSTIC, METHOD_ORDER, method_rank
from meta_vqa.eval.plots import families, plot_gamma, plot_kshot, plot_latents
from meta_vqa.eval.results import load_results, render_markdown
from meta_vqa.io import read_json, write_json, write_text

log = logging.getLogger(__name__)
MARKER = "report.json"
DEFAULT_TITLE = "Meta-test results"


# --- memorisation -------------------------------------------------------------------------------------
def nearest_distances(x: torch.Tensor, ref: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """Euclidean distance from each row of ``x`` to its nearest row of ``ref``."""
    d = torch.cdist(x.double(), ref.double())
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.min(1).values


def memorisation(t: dict[str, torch.Tensor]) -> dict:
    """Distances of a latents file (see :class:`meta_vqa.stages.guidance.LatentRecorder`)."""
    train = t["train"]
    gen = nearest_distances(t["generated"], train)
    ref = nearest_distances(t["test_adapted"], train)
    spacing = nearest_distances(train, train, exclude_self=True) if len(train) > 1 else torch.zeros(1)
    return {
        "generated_to_train": gen.mean().item(),
        "test_adapted_to_train": ref.mean().item(),
        "train_spacing": spacing.mean().item(),
        "ratio": (gen.mean() / ref.mean().clamp(min=1e-12)).item(),
        "n_generated": len(gen),
        "n_train": len(train),
    }


def _load_latents(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k in ("gamma", "seed"):
        if k in meta:
            meta[k] = json.loads(meta[k])
    return tensors, meta


def _latent_files(run: Path, exclude: list[Path]) -> list[Path]:
    return [
        p for p in sorted(run.rglob("latents.safetensors")) if not any(p.is_relative_to(e) for e in exclude)
    ]


def memorisation_rows(files: list[Path]) -> list[dict]:
    rows = []
    for f in files:
        tensors, meta = _load_latents(f)
        rows.append({"method": meta.get("method"), "split": meta.get("split"), "seed": meta.get("seed"),
                     "gamma": meta.get("gamma"), "file": str(f), **memorisation(tensors)})  # fmt: skip
    return rows


def render_memorisation(rows: list[dict]) -> str:
    if not rows:
        return ""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["split"], r["method"])].append(r)
    lines = [
        "## Memorisation",
        "",
        "Mean distance from each generated latent (test tasks, aligned description) to the nearest meta-train "
        "latent, against the same distance for the test tasks' own support-adapted latents; ratio < 1 means "
        "the generated latents sit closer to the training set than the true ones (copying). Mean over seeds, ± std "
        "where there are several.",
        "",
        "| split | method | generated → train | adapted test → train | ratio | train spacing |",
        "|---|---|---|---|---|---|",
    ]
    ms = lambda v: f"{statistics.fmean(v):.3g}" + (f" ± {statistics.stdev(v):.2g}" if len(v) > 1 else "")
    for (split, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], method_rank(kv[0][1]))):
        cols = [
            ms([r[k] for r in rs])
            for k in ("generated_to_train", "test_adapted_to_train", "ratio", "train_spacing")
        ]
        lines.append(f"| {split} | {method} | " + " | ".join(cols) + " |")
    return "\n".join(lines + [""])


# --- the paper's claims, checked on the table ---------------------------------------------------------
def missing_methods(records: list[dict]) -> str:
    present = {r["method"] for r in records}
    absent = [m for m in METHOD_ORDER if m not in present and m not in DIAGNOSTIC]
    return f"Method ids without results in this run: {', '.join(absent)}.\n" if absent else ""


# --- the report -----------------------------------------------------------------------------------------
def run_info(run: Path) -> dict:
    """The pipeline's record of a run (``pipeline.json``): its title and dataset folder, where known."""
    rec = run / "pipeline.json"
    if not rec.is_file():
        return {}
    info = read_json(rec, "pipeline summary")
    config = info.get("config") or {}
    return {
        "title": config.get("title"),
        "data_root": info.get("data_root") or (config.get("data") or {}).get("root"),
    }


def _excluded(run: Path, out: Path) -> list[Path]:
    """Folders whose files are not the run's results: this report, earlier reports, stale stages."""
    earlier = [p.parent for p in run.rglob(MARKER)]
    return [out, run / "_stale", *earlier]


def load_diagnostics(run: Path, exclude: list[Path]) -> list[dict]:
    files = [
        p for p in sorted(run.rglob("diagnostics.json")) if not any(p.is_relative_to(e) for e in exclude)
    ]
    return [read_json(p, "stage diagnostics") for p in files]


def _tensorboard(folder: str | Path, figures: list, records: list[dict], md: str) -> None:
    """The report's figures and text, and the chance and majority accuracy of each split (the same for
    every stage, so logged here once per run: ``reference/<split>/<chance|majority>/acc_<shots>``)."""
    from torch.utils.tensorboard import SummaryWriter

    from meta_vqa.eval.results import aggregate

    writer = SummaryWriter(str(folder))
    for name, fig in figures:
        writer.add_figure(name, fig)
    for r in aggregate([r for r in records if r["method"] in ("chance", "majority")]):
        writer.add_scalar(f"reference/{r['split']}/{r['method']}/acc_{r['shots']}", r["mean"], 0)
    writer.add_text("results", md)
    writer.close()


def build_report(
    run: str | Path,
    out: str | Path | None = None,
    title: str | None = None,
    data_root: str | Path | None = None,
    tensorboard_dir: str | Path | None = None,
    echo: bool | str = False,
    plots: bool = True,
) -> dict:
    """Write the report of a run folder (or of any folder of results.json files) into ``out`` (default
    ``RUN/report``); TensorBoard figures, the chance and majority levels (once per run) and the report's
    text go to ``tensorboard_dir`` (default ``OUT/tensorboard``). ``echo``: print the report (True) or
    only what the run shows (``"claims"``). Returns the paths written."""
    run = Path(run)
    out = Path(out) if out is not None else run / "report"
    info = run_info(run)
    title = title or info.get("title") or DEFAULT_TITLE
    exclude = _excluded(run, out)
    records = load_results([run], exclude=exclude)
    if not records:
        raise MetaVQAError(f"{run}: no results.json found")
    diagnostics = load_diagnostics(run, exclude)
    mem = memorisation_rows(_latent_files(run, exclude))
    shows = claims(records, diagnostics)
    md = "\n".join(
        s
        for s in (render_markdown(records, title), missing_methods(records), shows, render_memorisation(mem))
        if s
    )
    write_json(out / "results.json", records)
    write_json(out / "memorisation.json", mem)
    written = {"results": out / "results.json", "markdown": out / "results.md", "plots": []}
    figures = []
    if plots:
        from meta_vqa.eval.results import aggregate

        rows = aggregate(records)
        figures = [("accuracy_vs_gamma", plot_gamma(rows)), ("kshot", plot_kshot(rows))]
        root = Path(data_root) if data_root else Path(info["data_root"]) if info.get("data_root") else None
        fams = families(root)
        if root is not None and not fams:
            log.info("%s has no families.json: the latent plots use one colour", root)
        firsts: dict[tuple, tuple[int, Path]] = {}
        for f in _latent_files(run, exclude):  # one latent plot per method and split (the lowest seed)
            _, meta = _load_latents(f)
            key = (meta.get("method"), meta.get("split"))
            if key not in firsts or (meta.get("seed") or 0) < firsts[key][0]:
                firsts[key] = (meta.get("seed") or 0, f)
        for (method, split), (_, f) in sorted(firsts.items()):
            figures.append((f"latents_{method}_{split}", plot_latents(*_load_latents(f), fams)))
        for name, fig in figures:
            path = out / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=110, bbox_inches="tight")
            written["plots"].append(path)
        md += "\n## Plots\n\n" + "\n".join(f"![{n}]({n}.png)" for n, _ in figures) + "\n"
    write_text(out / "results.md", md)
    write_json(out / MARKER, {"run": str(run), "title": title, "records": len(records)})
    _tensorboard(tensorboard_dir or out / "tensorboard", figures, records, md)
    if figures:
        import matplotlib.pyplot as plt

        plt.close("all")
    if echo == "claims":
        print(shows, flush=True)
    elif echo:
        print(md, flush=True)
    if echo != "claims":  # the pipeline names it in its footer
        log.info("report: %s", out / "results.md")
    return written
