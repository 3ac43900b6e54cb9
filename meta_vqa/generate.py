"""``meta-vqa generate``: the adapter weights of a new task from its description alone.

The question (any wording) and its answers are encoded by the run's CLIP (the dataset's ``clip/``
folder); a trained guidance stage turns the question into a generator latent — HyperLDM sampling with
classifier-free guidance (``hyperldm``), plus the HyperCLIP gradient (``combined``), or HyperCLIP
classifier guidance (``hyperclip``) — and the generator decodes it into adapter weights. With
``--samples N --rerank hyperclip`` it draws N latents and keeps the one HyperCLIP scores highest.

Writes a safetensors file (``weights`` [D], ``latent`` [d]; the question, answers, method, γ and the
checkpoint in its metadata) and, given images, prints each image's answer probabilities.

Works from any folder: the dataset (for its CLIP) is ``--data-root``, else the folder the checkpoint
records if it is there, else the absolute one the run's ``pipeline.json`` records, else the recorded
(relative) folder under one of the checkpoint's parent folders (a run inside the repository).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from meta_vqa.errors import MetaVQAError
from meta_vqa.eval.methods import guided_method

METHODS = {"hyperldm": "hyperldm", "combined": "hyperldm", "hyperclip": "hyperclip"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meta-vqa generate",
        description="Adapter weights for a new task from its description alone (a question and its answers), "
        "by a trained guidance stage; given images, the answer probabilities the weights give them.",
        epilog="example: meta-vqa generate --run runs/easy_vqa --question 'is there a red shape?' "
        "--answers yes,no --image img.png",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--run", help="a pipeline run (runs/easy_vqa; its first random-split seed) or one of its seed folders"
    )
    src.add_argument("--ckpt", help="a HyperLDM or HyperCLIP checkpoint (best.ckpt of its stage folder)")
    p.add_argument(
        "--method",
        choices=sorted(METHODS),
        default="hyperldm",
        help="hyperldm: classifier-free guidance; combined: plus the HyperCLIP gradient (a HyperLDM trained "
        "with hyperclip_ckpt); hyperclip: HyperCLIP classifier guidance alone (default hyperldm)",
    )
    p.add_argument(
        "--generator",
        choices=["hnet", "hvae"],
        default="hnet",
        help="with --run: whose latent space (the HNet's or the HVAE's; default hnet)",
    )
    p.add_argument("--question", required=True, help="the task's question, in any wording")
    p.add_argument("--answers", required=True, help="its possible answers, comma-separated, at least two")
    p.add_argument(
        "--prompt",
        default=None,
        help="answer template with one {} (default: the dataset's rule for the question, else '{}')",
    )
    p.add_argument("--image", nargs="*", default=[], help="images to answer with the generated weights")
    p.add_argument("--gamma", type=float, default=None, help="CFG scale (default: the checkpoint's)")
    p.add_argument(
        "--classifier-scale", type=float, default=1.0, help="HyperCLIP scale of `combined` (default 1)"
    )
    p.add_argument("--samples", type=int, default=1, help="latents to draw (hyperldm, combined; default 1)")
    p.add_argument(
        "--rerank",
        choices=["hyperclip"],
        default=None,
        help="keep the one of --samples latents whose weights HyperCLIP matches best with the question",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.add_argument(
        "--out",
        default=None,
        help="output .safetensors (default: <seed folder>/generated/<question>.safetensors)",
    )
    p.add_argument(
        "--data-root",
        default=None,
        help="the dataset folder whose CLIP encodes the question (default: the run's, found from any folder)",
    )
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    return p


def resolve_checkpoint(run: str | Path, method: str, generator: str) -> Path:
    """``<run>/[seedN/]<generator>_<stage>/best.ckpt`` (the first seed folder if there are several)."""
    run = Path(run)
    name = f"{generator}_{METHODS[method]}"
    # a stage folder's parent, a seed folder, a run with seed folders, or a pipeline run (<split>/seed<S>)
    candidates = [
        run,
        *sorted(run.glob("seed*")),
        *sorted(run.glob("random/seed*")),
        *sorted(run.glob("*/seed*")),
    ]
    for base in candidates:
        ckpt = base / name / "best.ckpt"
        if ckpt.is_file():
            return ckpt
    raise MetaVQAError(f"{run}: no {name}/best.ckpt (train it with make run, or pass --ckpt)")


def _answer_template(question: str, prompt: str | None) -> tuple[str, str]:
    """The answer template and where it came from."""
    if prompt is not None:
        if prompt.count("{}") != 1:
            raise MetaVQAError(f"--prompt {prompt!r}: needs exactly one {{}} for the answer")
        return prompt, "--prompt"
    from meta_vqa.data.easy_vqa_questions import prompt_template
    from meta_vqa.errors import DataError

    try:
        return prompt_template(question), "the dataset's rule for this wording"
    except DataError:
        return "{}", "no rule matches this wording: the answer alone; --prompt sets one"


def shown(path: str | Path) -> str:
    """A path relative to the working folder where it lies under it, else as it is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def percent(p: float) -> str:
    """A probability as a readable percentage: ``<0.1%``, ``42.3%``, ``>99.9%``."""
    if p < 0.0005:
        return "<0.1%"
    if p > 0.9995:
        return ">99.9%"
    return f"{100 * p:.1f}%"


def dataset_root(ckpt: Path, recorded: str | None, data_root: str | None) -> Path:
    """The dataset folder whose ``clip/`` encodes the question (see the module docstring)."""
    if data_root is not None:
        if not (Path(data_root) / "clip").is_dir():
            raise MetaVQAError(f"--data-root {data_root}: no clip/ folder there to encode the question")
        return Path(data_root)
    candidates = [Path(recorded)] if recorded else []
    for parent in ckpt.resolve().parents:
        info = parent / "pipeline.json"
        if info.is_file():
            try:
                root = json.loads(info.read_text(encoding="utf-8")).get("data_root")
            except (OSError, ValueError):
                root = None
            if root:
                candidates.append(Path(root))
            break
    if recorded and not Path(recorded).is_absolute():
        candidates += [parent / recorded for parent in ckpt.resolve().parents]
    for root in candidates:
        if (root / "clip").is_dir():
            return root
    raise MetaVQAError(
        f"{ckpt}: its dataset's CLIP ({recorded}/clip) is not there to encode the question; "
        "give the dataset folder with --data-root"
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "task"


def _load_stage(ckpt: Path, method: str, device: torch.device):
    from meta_vqa.stages.checkpoints import check_stage, read_checkpoint
    from meta_vqa.stages.handoff import class_path
    from meta_vqa.stages.hyperclip import HyperCLIPStage
    from meta_vqa.stages.hyperldm import HyperLDMStage

    cls = HyperLDMStage if METHODS[method] == "hyperldm" else HyperCLIPStage
    ckpt, state = read_checkpoint(ckpt, "--ckpt")
    check_stage(ckpt, state, [class_path(cls)], f"--ckpt (--method {method})")
    model = cls.load_from_checkpoint(ckpt, map_location=device, weights_only=True).eval()
    root = state.get("datamodule_hyper_parameters", {}).get("root")
    return ckpt, model, root


def check_request(args: argparse.Namespace) -> list[str]:
    """The answers of a request, after refusing what cannot be answered: an empty question, fewer than two
    answers, an empty or repeated answer, images that are not there, a non-finite scale."""
    if not args.question.strip():
        raise MetaVQAError("--question: empty; describe the task")
    answers = [a.strip() for a in args.answers.split(",")]
    if any(not a for a in answers):
        raise MetaVQAError(f"--answers {args.answers!r}: an empty answer; give comma-separated answers")
    if len(answers) < 2:
        raise MetaVQAError(f"--answers {args.answers!r}: give at least two, comma-separated")
    seen: dict[str, str] = {}
    for a in answers:
        if a.lower() in seen:
            also = f" (as {seen[a.lower()]!r})" if seen[a.lower()] != a else ""
            raise MetaVQAError(f"--answers {args.answers!r}: {a!r} is given twice{also}")
        seen[a.lower()] = a
    if args.samples < 1:
        raise MetaVQAError("--samples must be at least 1")
    for flag, value in (("--gamma", args.gamma), ("--classifier-scale", args.classifier_scale)):
        if value is not None and not math.isfinite(value):
            raise MetaVQAError(f"{flag} {value}: must be a finite number")
    for p in args.image:
        if not Path(p).is_file():
            raise MetaVQAError(f"--image {p}: no such file")
    return answers


def generate(args: argparse.Namespace) -> dict:
    answers = check_request(args)  # before anything is loaded or written
    device = torch.device(args.device)
    ckpt = args.ckpt if args.ckpt else resolve_checkpoint(args.run, args.method, args.generator)
    ckpt, model, recorded = _load_stage(ckpt, args.method, device)
    root = dataset_root(Path(ckpt), recorded, args.data_root)

    from meta_vqa.data.encode import encode_images, encode_texts, load_images
    from meta_vqa.data.tasks import fill_prompt
    from meta_vqa.nets.clip import load_clip

    clip = load_clip(root)
    clip.model.to(device)
    template, template_source = _answer_template(args.question, args.prompt)
    q = encode_texts(clip.model, clip.tokenizer, [args.question], progress=False).to(device)
    prompts = [fill_prompt(template, a) for a in answers]
    answer_feats = encode_texts(clip.model, clip.tokenizer, prompts, progress=False).to(device)

    gen = model.generator
    questions = q.expand(args.samples, -1)
    gamma = args.gamma
    with torch.enable_grad():
        if METHODS[args.method] == "hyperldm":
            gamma = model.hparams.gamma if gamma is None else gamma
            scale = args.classifier_scale if args.method == "combined" else 0.0
            if scale and model.classifier is None:
                raise MetaVQAError(f"{ckpt}: combined guidance needs a HyperLDM trained with hyperclip_ckpt")
            z = model.sample_latents(questions, gamma, args.seed, classifier_scale=scale)
        else:
            z = model.guided_latents(torch.zeros(args.samples, dtype=torch.long, device=device), questions)
    with torch.no_grad():
        w = gen.weights(z)
        score = None
        if args.rerank:
            scorer = model if METHODS[args.method] == "hyperclip" else model.classifier
            if scorer is None:
                raise MetaVQAError(f"{ckpt}: --rerank hyperclip needs a HyperLDM trained with hyperclip_ckpt")
            scorer = getattr(scorer, "module", scorer)
            score = scorer.similarity(w, questions)
            best = int(score.argmax())
        else:
            best = 0
        w, z = w[best], z[best]

    out = (
        Path(args.out)
        if args.out
        else ckpt.parent.parent / "generated" / f"{_slug(args.question)}.safetensors"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "question": args.question,
        "answers": ",".join(answers),
        "answer_template": template,
        "method": guided_method(gen.kind, args.method),
        "gamma": "" if gamma is None else str(gamma),
        "checkpoint": str(ckpt),
        "seed": str(args.seed),
        "samples": str(args.samples),
    }
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({"weights": w.contiguous().cpu(), "latent": z.contiguous().cpu()}, str(tmp), metadata=meta)
    tmp.replace(out)

    result = {"out": str(out), "meta": meta, "images": {}, "template_source": template_source}
    result["data_root"] = str(root)
    if args.image:
        paths = {str(p): p for p in args.image}
        pixels = load_images(paths, clip.config.image_size, progress=False)
        x = encode_images(clip.model, pixels, clip.config.image_mean, clip.config.image_std, progress=False)
        with torch.no_grad():
            logits = gen.adapter(w.unsqueeze(0), x.to(device).unsqueeze(0), answer_feats.unsqueeze(0))[0]
        probs = logits.softmax(-1).cpu()
        for p, row in zip(paths, probs):
            result["images"][p] = {a: float(v) for a, v in zip(answers, row)}
    return result


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    res = generate(args)
    m = res["meta"]
    print(f"{m['method']} weights for {m['question']!r} (γ={m['gamma'] or '-'}) -> {shown(res['out'])}")
    print(f"answer template: {m['answer_template']!r} ({res['template_source']})")
    for path, probs in res["images"].items():
        ranked = sorted(probs.items(), key=lambda kv: -kv[1])
        print(f"{shown(path)}: " + ", ".join(f"{a} {percent(v)}" for a, v in ranked))
    return 0
