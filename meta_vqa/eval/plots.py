"""The report's figures: accuracy vs the CFG scale γ, k-shot curves, and a PCA of a latent space.

Every figure has a title that names the split and the number of seeds, labelled axes and a legend outside
the data; error bars are drawn only where there are several seeds.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from meta_vqa.eval.methods import DIAGNOSTIC, GUIDED, method_rank
from meta_vqa.eval.results import shots_key

REFERENCES = ("chance", "majority")
# the unguided methods a reader compares guided ones with, and their line colours (fixed across figures)
BASELINE_COLOURS = {
    "uncond_multitask": "tab:blue",
    "cond_multitask": "tab:red",
    "cond_multitask_film": "tab:pink",
    "mnet_maml": "tab:olive",
    "hnet_maml": "tab:green",
    "cond_hnet_maml": "tab:brown",
    "clip_zero_shot": "tab:gray",
}
# the generators' own rows and the guided methods (by guidance), distinct from the baselines' colours
GUIDED_COLOURS = {
    "hvae": "tab:blue",
    "hyperclip": "tab:orange",
    "hyperldm": "tab:purple",
    "combined": "tab:cyan",
}
SPARE_COLOURS = ("tab:brown", "tab:pink", "tab:olive", "tab:gray", "tab:red", "black")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _colour(method: str, used: set[str]) -> str:
    """A line's colour: fixed per method where it can be, never one already used in the panel."""
    want = (
        BASELINE_COLOURS.get(method)
        or GUIDED_COLOURS.get(method)
        or GUIDED_COLOURS.get(method.split("_")[-1])
    )
    if want and want not in used:
        return want
    return next((c for c in (*GUIDED_COLOURS.values(), *SPARE_COLOURS) if c not in used), "black")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _zero_shot(rows: list[dict], split: str) -> dict[tuple, dict]:
    return {
        (r["method"], r.get("gamma"), r.get("classifier_scale")): r
        for r in rows
        if r["split"] == split and r["shots"] == 0 and r.get("control") in (None, "aligned")
    }


def _series(ax, xs, rows, label, **style):
    """A line with error bars only where there is a spread (several seeds)."""
    ys = [r["mean"] for r in rows]
    if any(r["seeds"] > 1 for r in rows):
        ax.errorbar(xs, ys, [r["std"] for r in rows], capsize=3, label=label, **style)
    else:
        ax.plot(xs, ys, label=label, **style)


def _seeds(rows: list[dict]) -> str:
    n = max((r["seeds"] for r in rows), default=1)
    return f"{n} seed{'s' if n != 1 else ''}"


def plot_gamma(rows: list[dict]):
    """Zero-shot accuracy vs CFG scale γ for each HyperLDM, the baselines as labelled horizontal lines."""
    plt = _plt()
    splits = sorted({r["split"] for r in rows})
    fig, axes = plt.subplots(1, len(splits), figsize=(7 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        zs = _zero_shot(rows, split)
        gammas: set[float] = set()
        for m, colour in (("hnet_hyperldm", "tab:purple"), ("hvae_hyperldm", "tab:orange")):
            pts = sorted((k[1], r) for k, r in zs.items() if k[0] == m and k[1] is not None and k[2] is None)
            if pts:
                _series(ax, [g for g, _ in pts], [r for _, r in pts], m, marker="o", color=colour)
                gammas |= {g for g, _ in pts}
        if gammas:
            ax.set_xticks(sorted(gammas))
        for m, colour in [*BASELINE_COLOURS.items(), ("chance", "black")]:
            if (m, None, None) in zs:
                ax.axhline(zs[(m, None, None)]["mean"], ls="--", lw=1, color=colour, label=f"{m} (zero-shot)")
        ax.set(
            title=f"Zero-shot accuracy vs CFG scale γ ({split} split, {_seeds(list(zs.values()))})",
            xlabel="CFG scale γ (0 = unconditional, 1 = conditional)",
            ylabel="zero-shot query accuracy (%)",
        )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def _kshot_groups() -> list[tuple[str, tuple[str, ...]]]:
    unguided = tuple(BASELINE_COLOURS)
    return [
        ("baselines", unguided),
        ("HNet generator", ("hnet_maml", *(m for m in GUIDED if m.startswith("hnet_")))),
        ("HVAE generator", ("hvae", *(m for m in GUIDED if m.startswith("hvae_")))),
    ]


def plot_kshot(rows: list[dict]):
    """Accuracy vs examples per answer (0..5, then the whole support set): one panel per group of methods
    (baselines, the HNet's guided methods, the HVAE's) and one row per split; within a panel every line has
    its own colour and marker, and the legend sits beside the panel, so no line or point is hidden."""
    plt = _plt()
    splits = sorted({r["split"] for r in rows})
    groups = _kshot_groups()
    fig, axes = plt.subplots(
        len(splits), len(groups), figsize=(7.5 * len(groups), 4.2 * len(splits)), squeeze=False,
        layout="constrained",
    )  # fmt: skip
    for row_axes, split in zip(axes, splits):
        sub = [r for r in rows if r["split"] == split and r.get("control") in (None, "aligned")]
        by_method: dict[tuple, dict] = defaultdict(dict)
        for r in sub:
            if r.get("classifier_scale") is None and r["method"] not in DIAGNOSTIC:
                by_method[(r["method"], r.get("gamma"))][r["shots"]] = r
        order = sorted({s for d in by_method.values() for s in d}, key=lambda s: (s == "full", shots_key(s)))
        xs = {s: i for i, s in enumerate(order)}
        for ax, (title, members) in zip(row_axes, groups):
            lines = [(k, d) for k, d in by_method.items() if k[0] in members and len(d) > 1]
            lines.sort(key=lambda kv: (method_rank(kv[0][0]), str(kv[0][1])))
            used: set[str] = set()
            for i, ((m, g), d) in enumerate(lines):
                pts = sorted(d.items(), key=lambda kv: xs[kv[0]])
                label = m + (f" γ={g:g}" if g is not None else "")
                colour = _colour(m, used)
                used.add(colour)
                _series(ax, [xs[s] for s, _ in pts], [r for _, r in pts], label,
                        marker=MARKERS[i % len(MARKERS)], ms=5, color=colour, alpha=0.9)  # fmt: skip
            for ref, style in zip(REFERENCES, ("--", ":")):
                if (ref, None) in by_method:
                    pts = sorted(by_method[(ref, None)].items(), key=lambda kv: xs[kv[0]])
                    ax.plot(
                        [xs[s] for s, _ in pts], [r["mean"] for _, r in pts], ls=style, color="0.4", label=ref
                    )
            ax.set_xticks(range(len(order)), [str(s) for s in order])
            ax.set(
                title=f"{title} ({split} split, {_seeds(sub)})",
                xlabel="support examples per answer (full = the whole support set)",
                ylabel="query accuracy (%)",
            )
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return fig


def families(root: Path | None) -> dict[str, str]:
    """``{question: family}`` of a dataset folder (its ``families.json``), empty where there is none."""
    if root is not None and (root / "families.json").is_file():
        return json.loads((root / "families.json").read_text(encoding="utf-8"))
    return {}


def plot_latents(tensors: dict[str, torch.Tensor], meta: dict, families: dict[str, str]):
    """PCA of the meta-train latents (dots), the test tasks' adapted latents (circles) and the generated
    ones (crosses), coloured by question family (one colour when the dataset has no families)."""
    plt = _plt()
    questions = json.loads(meta["questions"])
    fam = lambda ids: [families.get(questions[i], "all tasks") for i in ids.tolist()]
    groups = {
        "meta-train (adapted)": (tensors["train"], fam(tensors["train_task"]), "o", True),
        "meta-test (adapted)": (tensors["test_adapted"], fam(tensors["test_task"]), "o", False),
        "meta-test (generated)": (tensors["generated"], fam(tensors["generated_task"]), "x", True),
    }
    x = tensors["train"].double()
    centre = x.mean(0)
    _, _, v = torch.pca_lowrank(x - centre, q=min(2, *x.shape), center=False)
    names = sorted({f for _, fs, _, _ in groups.values() for f in fs})
    colour = {f: f"C{i % 10}" for i, f in enumerate(names)}
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for z, fs, marker, filled in groups.values():
        p = ((z.double() - centre) @ v).numpy()
        if p.shape[1] < 2:
            p = torch.cat([torch.as_tensor(p), torch.zeros(len(p), 1, dtype=torch.double)], 1).numpy()
        cs = [colour[f] for f in fs]
        kw = {"c": cs} if filled else {"facecolors": "none", "edgecolors": cs}
        ax.scatter(p[:, 0], p[:, 1], marker=marker, s=28 if marker == "x" else 18, alpha=0.8, **kw)
    for f in names:
        ax.scatter([], [], c=colour[f], marker="s", label=f)
    for label, (_, _, marker, filled) in groups.items():
        kw = {"c": "k"} if filled else {"facecolors": "none", "edgecolors": "k"}
        ax.scatter([], [], marker=marker, label=label, **kw)
    ax.set(
        title=f"{meta.get('method')} latents, PCA ({meta.get('split')} split, seed {meta.get('seed')})",
        xlabel="principal component 1",
        ylabel="principal component 2",
    )
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig
