"""The run report (``meta-vqa report RUN``, also the pipeline's last step).

From every ``results.json`` and ``latents.safetensors`` under a run folder it writes, into ``RUN/report``:

* ``results.json`` (all records) and ``results.md``: one table per split (every method id, zero-shot,
  k = 1..5 and whole-support fine-tuning, mean ± std over seeds, the aligned / shuffled / empty controls of
  the guided methods), the method ids the run lacks, the checks of the paper's claims computed from the
  table, and the memorisation table;
* ``memorisation.json``: per guided method, seed and split, the mean distance from each generated latent to
  its nearest meta-train latent, next to the same distance for the test tasks' own support-adapted latents
  (ratio < 1: generated latents sit closer to the training set than the true ones, i.e. copying);
* plots (PNG here, and as figures in TensorBoard under ``RUN/lightning_logs/report``): accuracy vs γ,
  k-shot curves, and a 2-D PCA of the latent space coloured by question family.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path

import torch

from meta_vqa.errors import MetaVQAError
from meta_vqa.eval.methods import BASELINES, DIAGNOSTIC, GUIDED, METHOD_ORDER, method_rank
from meta_vqa.eval.results import aggregate, load_results, render_markdown, shots_key
from meta_vqa.io import write_json, write_text

log = logging.getLogger(__name__)


# --- memorisation -------------------------------------------------------------------------------------
def nearest_distances(x: torch.Tensor, ref: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """Euclidean distance from each row of ``x`` to its nearest row of ``ref``."""
    d = torch.cdist(x.double(), ref.double())
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.min(1).values


def memorisation(t: dict[str, torch.Tensor]) -> dict:
    """Distances of a latents file (see :class:`meta_vqa.stages.generator.LatentRecorder`)."""
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
        "the generated latents sit closer to the training set than the true ones (copying). Mean ± std over seeds.",
        "",
        "| split | method | generated → train | adapted test → train | ratio | train spacing |",
        "|---|---|---|---|---|---|",
    ]
    ms = lambda v: f"{statistics.fmean(v):.3g} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2g}"
    for (split, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], method_rank(kv[0][1]))):
        cols = [
            ms([r[k] for r in rs])
            for k in ("generated_to_train", "test_adapted_to_train", "ratio", "train_spacing")
        ]
        lines.append(f"| {split} | {method} | " + " | ".join(cols) + " |")
    return "\n".join(lines + [""])


# --- the paper's claims, checked on the table ---------------------------------------------------------
def _zero_shot(rows: list[dict], split: str) -> dict[tuple, dict]:
    out = {}
    for r in rows:
        if r["split"] == split and r["shots"] == 0 and r.get("control") in (None, "aligned"):
            out[(r["method"], r.get("gamma"), r.get("classifier_scale"))] = r
    return out


def claims(rows: list[dict]) -> str:
    """Sentences on the paper's claims, computed from the aggregated zero-shot rows of each split."""
    lines = ["## The paper's claims on this run", ""]
    fmt = lambda r: f"{r['mean']:.1f}"
    for split in sorted({r["split"] for r in rows}):
        zs = _zero_shot(rows, split)
        guided = {k: r for k, r in zs.items() if k[0] in GUIDED and k[1] != 0.0}  # γ = 0: unconditional
        if not guided:
            continue
        name = lambda k: (
            k[0] + (f" γ={k[1]:g}" if k[1] is not None else "") + (f" s={k[2]:g}" if k[2] is not None else "")
        )
        best_k = max(guided, key=lambda k: guided[k]["mean"])
        best = guided[best_k]
        base = {m: zs[(m, None, None)] for m in BASELINES if (m, None, None) in zs}
        beaten = [f"{m} {fmt(r)}" for m, r in base.items() if best["mean"] > r["mean"]]
        lost = [f"{m} {fmt(r)}" for m, r in base.items() if best["mean"] <= r["mean"]]
        lines.append(
            f"- **{split} split.** Best guided zero-shot: {name(best_k)} {fmt(best)} ± {best['std']:.1f}. "
            + (f"Above {', '.join(beaten)}. " if beaten else "")
            + (f"Not above {', '.join(lost)}." if lost else "")
        )
        for ldm in ("hnet_hyperldm", "hvae_hyperldm"):
            at = {k[1]: r for k, r in zs.items() if k[0] == ldm and k[2] is None}
            if 1.0 not in at:
                continue
            higher = {g: r for g, r in at.items() if g is not None and g > 1}
            comb = {k[2]: r for k, r in zs.items() if k[0] == ldm.replace("hyperldm", "combined")}
            parts = []
            if higher:
                g = max(higher, key=lambda g: higher[g]["mean"])
                verdict = "above" if higher[g]["mean"] - at[1.0]["mean"] >= 0.05 else "not above"
                parts.append(f"CFG γ={g:g} {fmt(higher[g])} is {verdict} γ=1 {fmt(at[1.0])}")
            if comb:
                s = max(comb, key=lambda s: comb[s]["mean"])
                verdict = "above" if comb[s]["mean"] - at[1.0]["mean"] >= 0.05 else "not above"  # as printed
                parts.append(f"combined s={s:g} {fmt(comb[s])} is {verdict} γ=1")
            ctrl = {
                r["control"]: r
                for r in rows
                if r["split"] == split
                and r["method"] == ldm
                and r["shots"] == 0
                and r.get("control") in ("shuffled", "empty")
            }
            if "shuffled" in ctrl and 0.0 in at:
                sh, un, aligned = ctrl["shuffled"]["mean"], at[0.0]["mean"], at[1.0]["mean"]
                head = f"shuffled description {sh:.1f} vs unconditional (γ=0) {un:.1f} and aligned {aligned:.1f}: "
                if aligned <= un:
                    verdict = "the aligned description is not above the unconditional level, so guidance does not help here"
                elif abs(sh - un) < abs(aligned - sh):
                    verdict = "falls back to the unconditional level, so the description is used"
                else:
                    verdict = "does not fall back to the unconditional level: the description is not what drives the result"
                parts.append(head + verdict)
            if parts:
                lines.append(f"- {split}, {ldm}: " + "; ".join(parts) + ".")
    return "\n".join(lines + [""]) if len(lines) > 2 else ""


def missing_methods(records: list[dict]) -> str:
    present = {r["method"] for r in records}
    absent = [m for m in METHOD_ORDER if m not in present and m not in DIAGNOSTIC]
    return f"Method ids without results in this run: {', '.join(absent)}.\n" if absent else ""


# --- plots ----------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_gamma(rows: list[dict]):
    """Zero-shot accuracy vs CFG scale γ per HyperLDM, with the baselines as horizontal lines."""
    plt = _plt()
    splits = sorted({r["split"] for r in rows})
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.6), squeeze=False)
    for ax, split in zip(axes[0], splits):
        zs = _zero_shot(rows, split)
        for m in ("hnet_hyperldm", "hvae_hyperldm"):
            pts = sorted((k[1], r) for k, r in zs.items() if k[0] == m and k[1] is not None and k[2] is None)
            if pts:
                ax.errorbar([g for g, _ in pts], [r["mean"] for _, r in pts], [r["std"] for _, r in pts],
                            marker="o", capsize=3, label=m)  # fmt: skip
        for i, m in enumerate(("uncond_multitask", "mnet_maml", "hnet_maml", "cond_multitask", "chance")):
            if (m, None, None) in zs:
                ax.axhline(zs[(m, None, None)]["mean"], ls="--", lw=1, color=f"C{i + 2}", label=m)
        ax.set(title=f"{split} split", xlabel="CFG scale γ", ylabel="zero-shot accuracy (%)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_kshot(rows: list[dict]):
    """Accuracy vs examples per answer (0..5, then the whole support set) for every method."""
    plt = _plt()
    splits = sorted({r["split"] for r in rows})
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        sub = [r for r in rows if r["split"] == split and r.get("control") in (None, "aligned")]
        by_method = defaultdict(dict)
        for r in sub:
            if r.get("classifier_scale") is not None or r["method"] in DIAGNOSTIC:
                continue
            by_method[(r["method"], r.get("gamma"))][r["shots"]] = r
        shots_all = sorted({s for d in by_method.values() for s in d}, key=shots_key)
        order = sorted(shots_all, key=lambda s: (s == "full", 0 if s == "full" else int(s)))
        xs = {s: i for i, s in enumerate(order)}
        lines = [(k, d) for k, d in by_method.items() if len(d) > 1]  # not the zero-shot-only rows (other γ)
        lines.sort(key=lambda kv: (method_rank(kv[0][0]), str(kv[0][1])))
        colours = plt.get_cmap("tab20")
        for i, ((m, g), d) in enumerate(lines):
            pts = sorted(d.items(), key=lambda kv: xs[kv[0]])
            style = (
                {"ls": "--", "color": "0.5"} if m in ("chance", "majority") else {"color": colours(i % 20)}
            )
            ax.errorbar([xs[s] for s, _ in pts], [r["mean"] for _, r in pts], [r["std"] for _, r in pts],
                        marker="o", ms=3, capsize=2, label=m + (f" γ={g:g}" if g is not None else ""), **style)  # fmt: skip
        ax.set_xticks(range(len(order)), [str(s) for s in order])
        ax.set(title=f"{split} split", xlabel="examples per answer", ylabel="query accuracy (%)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def _families(root: Path | None) -> dict[str, str]:
    if root is not None and (root / "families.json").is_file():
        return json.loads((root / "families.json").read_text(encoding="utf-8"))
    return {}


def plot_latents(path: Path, families: dict[str, str]):
    """PCA of the meta-train latents (dots), the test tasks' adapted latents (circles) and the generated
    ones (crosses), coloured by question family."""
    plt = _plt()
    t, meta = _load_latents(path)
    questions = json.loads(meta["questions"])
    fam = lambda ids: [families.get(questions[i], "all") for i in ids.tolist()]
    groups = {
        "meta-train (adapted)": (t["train"], fam(t["train_task"]), "o", True),
        "meta-test (adapted)": (t["test_adapted"], fam(t["test_task"]), "o", False),
        "meta-test (generated)": (t["generated"], fam(t["generated_task"]), "x", True),
    }
    x = t["train"].double()
    mean = x.mean(0)
    _, _, v = torch.pca_lowrank(x - mean, q=min(2, *x.shape), center=False)
    names = sorted({f for _, fs, _, _ in groups.values() for f in fs})
    colour = {f: f"C{i % 10}" for i, f in enumerate(names)}
    fig, ax = plt.subplots(figsize=(6.4, 5))
    for z, fs, marker, filled in groups.values():
        p = ((z.double() - mean) @ v).numpy()
        if p.shape[1] < 2:
            p = torch.cat([torch.as_tensor(p), torch.zeros(len(p), 1, dtype=torch.double)], 1).numpy()
        cs = [colour[f] for f in fs]
        kw = {"c": cs} if filled else {"facecolors": "none", "edgecolors": cs}
        ax.scatter(p[:, 0], p[:, 1], marker=marker, s=28 if marker == "x" else 18, alpha=0.8, **kw)
    for f in names:
        ax.scatter([], [], c=colour[f], marker="s", label=f)
    for label, (_, _, marker, filled) in groups.items():
        ax.scatter(
            [],
            [],
            marker=marker,
            label=label,
            **({"c": "k"} if filled else {"facecolors": "none", "edgecolors": "k"}),
        )
    ax.set(title=f"{meta.get('method')} ({meta.get('split')} split, seed {meta.get('seed')}): latents, PCA",
           xlabel="PC 1", ylabel="PC 2")  # fmt: skip
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return fig


# --- the report -----------------------------------------------------------------------------------------
def _data_root(run: Path) -> Path | None:
    """The dataset folder of a pipeline run (from its pipeline.json), if known."""
    rec = run / "pipeline.json"
    if rec.is_file():
        try:
            root = json.loads(rec.read_text(encoding="utf-8"))["config"]["data"]["root"]
            return Path(root)
        except (KeyError, json.JSONDecodeError, TypeError):
            return None
    return None


def build_report(
    run: str | Path,
    out: str | Path | None = None,
    title: str = "Meta-VQA meta-test results",
    data_root: str | Path | None = None,
    tensorboard: bool = True,
    echo: bool = False,
    plots: bool = True,
) -> dict:
    """Write the report of a run folder (or of any folder of results.json files); returns what it wrote."""
    run = Path(run)
    out = Path(out) if out is not None else run / "report"
    exclude = [out, run / "_stale"]
    records = load_results([run], exclude=exclude)
    if not records:
        raise MetaVQAError(f"{run}: no results.json found")
    rows = aggregate(records)
    mem = memorisation_rows(_latent_files(run, exclude))
    md = "\n".join(
        s
        for s in (
            render_markdown(records, title),
            missing_methods(records),
            claims(rows),
            render_memorisation(mem),
        )
        if s
    )
    write_json(out / "results.json", records)
    write_json(out / "memorisation.json", mem)
    written = {"results": out / "results.json", "markdown": out / "results.md", "plots": []}
    figures = []
    if plots:
        figures = [("accuracy_vs_gamma", plot_gamma(rows)), ("kshot", plot_kshot(rows))]
        families = _families(Path(data_root) if data_root else _data_root(run))
        firsts = {}
        for f in _latent_files(run, exclude):  # one latent plot per method and split (the lowest seed)
            _, meta = _load_latents(f)
            key = (meta.get("method"), meta.get("split"))
            if key not in firsts or (meta.get("seed") or 0) < firsts[key][0]:
                firsts[key] = (meta.get("seed") or 0, f)
        for (method, split), (_, f) in sorted(firsts.items()):
            figures.append((f"latents_{method}_{split}", plot_latents(f, families)))
        for name, fig in figures:
            path = out / f"{name}.png"
            fig.savefig(path, dpi=110)
            written["plots"].append(path)
        md += "\n## Plots\n\n" + "\n".join(f"![{n}]({n}.png)" for n, _ in figures) + "\n"
    write_text(out / "results.md", md)
    if figures and tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run / "lightning_logs" / "report"))
        for name, fig in figures:
            writer.add_figure(name, fig)
        writer.add_text("results", md)
        writer.close()
    if figures:
        _plt().close("all")
    if echo:
        print(md)
    log.info("report: %s", out / "results.md")
    return written
