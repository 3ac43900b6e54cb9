"""What a run shows: each guided method against its controls, the strongest baseline and its ceiling; the
paper's claims checked with the uncertainty the run has; stages whose results look broken.

Comparisons are paired by seed: for two rows of the table, the difference is taken seed by seed (the two
methods of one seed share their upstream stages) and reported as its mean ± std over seeds. A difference
counts as above or below only when it exceeds that spread; with one seed there is no spread, and the text
says so instead of calling 75.5 "above" 75.3.

A guided method's *floor* is what it produces without the description (HyperLDM: γ = 0, unconditional
sampling; HyperCLIP: the empty description, i.e. the generator's start latent), and its *ceiling* is the
accuracy of the latents it learns to imitate: the support-adapted latents of its generator (HNet: the
``hnet_maml`` whole-support row; HVAE: ``hvae_recon``, the VAE's reconstruction of those weights).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from meta_vqa.eval.methods import BASELINES, DIAGNOSTIC, GENERATORS, GUIDED, HNET_MAML, HVAE_RECON

Key = tuple  # (method, shots, gamma, control, classifier_scale)
UNGUIDED_EXCLUDED = ("chance", "majority", *GUIDED, *DIAGNOSTIC)
CEILING = {"hnet": (HNET_MAML, "full", None, None, None), "hvae": (HVAE_RECON, "full", None, None, None)}
SAME = 0.05  # accuracies closer than this (in points) count as identical


def per_seed(records: list[dict], split: str) -> dict[Key, dict[int, float]]:
    """Accuracy by seed of every row of one split (the first record of a seed counts)."""
    out: dict[Key, dict[int, float]] = defaultdict(dict)
    for r in records:
        if r["split"] != split:
            continue
        control = r.get("control")
        key = (r["method"], r["shots"], r.get("gamma"), None if control == "aligned" else control,
               r.get("classifier_scale"))  # fmt: skip
        out[key].setdefault(r["seed"], r["accuracy"])
    return out


@dataclass
class Diff:
    """A paired difference a − b over the seeds both have."""

    mean: float
    std: float | None  # None with one seed
    seeds: int

    def text(self) -> str:
        spread = "" if self.std is None else f" ± {self.std:.1f}"
        return f"{self.mean:+.1f}{spread}"

    def verdict(self, above: str = "above", below: str = "below") -> str:
        """``above``/``below`` only when the difference exceeds the seed spread."""
        if abs(self.mean) < SAME:
            return "level with"
        if self.std is None:
            return f"{above if self.mean > 0 else below} (one seed, no spread)"
        if abs(self.mean) > self.std:
            return f"{above if self.mean > 0 else below}, beyond the seed spread,"
        return "within the seed spread of"


def diff(a: dict[int, float], b: dict[int, float]) -> Diff | None:
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    return Diff(statistics.fmean(d), statistics.stdev(d) if len(d) > 1 else None, len(d))


def value(v: dict[int, float]) -> str:
    vals = list(v.values())
    m = statistics.fmean(vals)
    return f"{m:.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{m:.1f}"


def mean(v: dict[int, float]) -> float:
    return statistics.fmean(v.values())


def _name(key: Key) -> str:
    method, _, gamma, control, scale = key
    name = (
        method
        + (f" γ={gamma:g}" if gamma is not None else "")
        + (f" s={scale:g}" if scale is not None else "")
    )
    return name + (f" ({control})" if control else "")


def guided_settings(table: dict[Key, dict[int, float]]) -> list[Key]:
    """The zero-shot aligned row of each guided method at its main setting: HyperLDM at the γ its controls
    were run at (else γ = 1), combined guidance at each classifier scale, HyperCLIP as is."""
    keys = []
    for method in GUIDED:
        rows = [k for k in table if k[0] == method and k[1] == 0 and k[3] is None]
        if not rows:
            continue
        if method.endswith("_hyperldm"):
            controlled = {k[2] for k in table if k[0] == method and k[3] is not None}
            gammas = sorted({k[2] for k in rows if k[2]})
            main = next(iter(controlled), 1.0 if 1.0 in gammas else (gammas[-1] if gammas else None))
            keys += [k for k in rows if k[2] == main]
        else:
            keys += rows
    return keys


def floor_key(key: Key) -> tuple[Key, str]:
    method, _, gamma, _, _ = key
    if method.endswith("_hyperclip"):
        return (method, 0, None, "empty", None), "empty description"
    base = method.replace("_combined", "_hyperldm")
    return (base, 0, 0.0, None, None), "γ=0"


def strongest_baseline(table: dict[Key, dict[int, float]]) -> Key | None:
    rows = [k for k in table if k[1] == 0 and k[3] is None and k[0] not in UNGUIDED_EXCLUDED and k[2] is None]
    return max(rows, key=lambda k: mean(table[k]), default=None)


def guided_table(table: dict[Key, dict[int, float]]) -> list[str]:
    """One row per guided method: zero-shot; differences to its controls and the strongest baseline; the
    fraction of the way from its floor to its ceiling."""
    best = strongest_baseline(table)
    head = best[0] if best else "—"
    lines = [
        f"| guided method | zero-shot | − empty | − shuffled | − {head} | floor → ceiling | of the way |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in guided_settings(table):
        acc = table[key]
        method, _, gamma, _, scale = key
        controls = []
        for control in ("empty", "shuffled"):
            c = table.get((method, 0, gamma, control, scale)) or table.get((method, 0, gamma, control, None))
            d = diff(acc, c) if c else None
            controls.append(d.text() if d else "")
        d_best = diff(acc, table[best]).text() if best else ""
        fkey, fname = floor_key(key)
        gen = method.split("_")[0]
        ceiling = table.get(CEILING[gen]) if gen in GENERATORS else None
        floor = table.get(fkey)
        way = ""
        span = ""
        if floor and ceiling:
            span = f"{value(floor)} ({fname}) → {value(ceiling)} ({CEILING[gen][0]}, whole support)"
            if mean(ceiling) - mean(floor) > SAME:
                way = f"{100 * (mean(acc) - mean(floor)) / (mean(ceiling) - mean(floor)):.0f} %"
        lines.append(
            f"| {_name(key)} | {value(acc)} | {controls[0]} | {controls[1]} | {d_best} | {span} | {way} |"
        )
    return lines


def paper_claims(table: dict[Key, dict[int, float]]) -> list[str]:
    """The paper's claims as sentences: guided zero-shot above the multitask and meta-learning baselines;
    classifier-free guidance with γ > 1 above γ = 1; the description is what the guided method uses."""
    out = []
    guided = guided_settings(table)
    if guided:
        top = max(guided, key=lambda k: mean(table[k]))
        parts = []
        for m in BASELINES:
            b = table.get((m, 0, None, None, None))
            if b:
                d = diff(table[top], b)
                parts.append(f"{d.verdict()} {m} {value(b)} ({d.text()})")
        best = strongest_baseline(table)
        if best and best[0] not in BASELINES:
            d = diff(table[top], table[best])
            parts.append(
                f"{d.verdict()} the strongest baseline of the table, {best[0]} {value(table[best])} ({d.text()})"
            )
        out.append(
            f"- Guided methods vs the baselines, zero-shot: the best guided method here, {_name(top)} "
            f"{value(table[top])}, is " + "; ".join(parts) + "."
        )
    for ldm in (m for m in GUIDED if m.endswith("_hyperldm")):
        at = {
            k[2]: v for k, v in table.items() if k[0] == ldm and k[1] == 0 and k[3] is None and k[4] is None
        }
        if 1.0 not in at:
            continue
        higher = {g: v for g, v in at.items() if g is not None and g > 1}
        if higher:
            g = max(higher, key=lambda g: mean(higher[g]))
            d = diff(higher[g], at[1.0])
            out.append(
                f"- {ldm}: classifier-free guidance γ={g:g} {value(higher[g])} is {d.verdict()} γ=1 "
                f"{value(at[1.0])} ({d.text()})."
            )
        comb = {
            k[4]: v for k, v in table.items() if k[0] == ldm.replace("hyperldm", "combined") and k[1] == 0
        }
        if comb:
            s = max(comb, key=lambda s: mean(comb[s]))
            d = diff(comb[s], at[1.0])
            out.append(
                f"- {ldm}: combined guidance s={s:g} {value(comb[s])} is {d.verdict()} CFG alone "
                f"{value(at[1.0])} ({d.text()})."
            )
        main = next((k for k in guided if k[0] == ldm), None)
        shuffled = table.get((ldm, 0, main[2], "shuffled", None)) if main else None
        if main and shuffled and 0.0 in at:
            aligned, uncond = table[main], at[0.0]
            d_a, d_s = diff(aligned, uncond), diff(shuffled, uncond)
            lost = (d_a.mean - d_s.mean) / d_a.mean if d_a.mean > SAME else 0.0  # of the gain over γ=0
            if d_a.mean <= SAME:
                why = (
                    "the aligned description is not above unconditional sampling: guidance does not help here"
                )
            elif lost >= 0.5:
                why = (
                    f"another task's description loses {lost:.0%} of the gain over unconditional sampling, "
                    "falling back towards the unconditional level, so the description is used"
                )
            elif lost > 0.2:
                why = (
                    f"another task's description keeps {1 - lost:.0%} of the gain over unconditional "
                    "sampling: the description drives only part of the result"
                )
            elif lost >= -0.2:
                why = "another task's description does as well as the task's own: the description is not what drives the result"
            else:
                why = "another task's description does better than the task's own: the description is not what drives the result"
            out.append(
                f"- {ldm}: aligned {value(aligned)}, shuffled {value(shuffled)}, unconditional (γ=0) "
                f"{value(uncond)}: {why}."
            )
    return out


def broken(table: dict[Key, dict[int, float]], diagnostics: list[dict]) -> list[str]:
    """Warnings for guided stages whose results look broken: identical to what they start from in every
    column, or a HyperCLIP whose retrieval of the task's own question is at chance."""
    out = []
    for key in guided_settings(table):
        method, _, gamma, _, scale = key
        gen = {"hnet": HNET_MAML, "hvae": "hvae"}.get(method.split("_")[0])
        cols = {
            k[1]: v
            for k, v in table.items()
            if k[0] == method and k[2] == gamma and k[3] is None and k[4] == scale
        }
        ref = {k[1]: v for k, v in table.items() if k[0] == gen and k[2] is None and k[3] is None}
        shared = [s for s in cols if s in ref]
        if shared and all(abs(diff(cols[s], ref[s]).mean) < SAME for s in shared):
            out.append(
                f"- **{_name(key)} equals its generator {gen} in every column** ({', '.join(map(str, shared))} "
                "shots): the guidance changed nothing."
            )
    for d in diagnostics:
        acc, chance = d.get("retrieval_acc"), d.get("retrieval_chance")
        if acc is not None and chance is not None and acc < 1.5 * chance:
            head = (
                f"- **{d.get('method')} (seed {d.get('seed')})**: retrieval of the task's own question "
                f"{acc:.1f} % against chance {chance:.1f} %"
            )
            val = d.get("val_retrieval_acc")
            if val is not None and val >= 1.5 * chance:
                out.append(
                    f"{head} on the test tasks, {val:.1f} % on the validation tasks: its weight encoder tells "
                    "apart the tasks it was trained and chosen on, not these (their questions lie outside what "
                    "it learnt, e.g. a held-out question family)."
                )
            else:
                out.append(f"{head}: its weight encoder does not tell the tasks apart.")
    return out


def claims(records: list[dict], diagnostics: list[dict] = ()) -> str:
    """The "what this run shows" section of the report (markdown)."""
    lines = ["## What this run shows", ""]
    for split in sorted({r["split"] for r in records}):
        table = per_seed(records, split)
        seeds = len({s for v in table.values() for s in v})
        diags = [d for d in diagnostics if d.get("split") == split]
        lines += [
            f"### {split} split ({seeds} seed{'s' if seeds != 1 else ''})",
            "",
            "Differences are paired by seed (mean ± std over seeds)"
            + ("; with one seed there is no spread, so no difference is significant." if seeds == 1 else "."),
            "",
        ]
        if guided_settings(table):
            lines += [*guided_table(table), ""]
        lines += paper_claims(table)
        flags = broken(table, diags)
        if flags:
            lines += ["", "Stages that look broken:", *flags]
        lines.append("")
    return "\n".join(lines) if len(lines) > 2 else ""
