"""A small synthetic Meta-VQA-shaped dataset with learnable structure, for tests and smoke runs.

Images carry one value of each of ``n_attributes`` attributes (feature = sum of value embeddings +
noise). A task asks for one attribute; its answer prompts are that attribute's value embeddings, and in
"negated" tasks the prompts are a fixed permutation of them, so the right weights depend on the task
(and on the question, which encodes the attribute and the negation).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from meta_vqa.data.features import write_features, write_manifest
from meta_vqa.data.tasks import Task, save_tasks, split_support_query, task_statistics
from meta_vqa.io import write_json

BUILDER = "synthetic"
BUILDER_VERSION = 1


def make_synthetic(
    root: str | Path,
    dim: int = 32,
    n_images: int = 240,
    n_attributes: int = 4,
    n_values: int = 3,
    tasks_per_attribute: int = 4,
    noise: float = 0.3,
    seed: int = 0,
) -> Path:
    """Write a complete dataset folder (tasks, prompts, features, manifest) under ``root``; its manifest
    records the arguments (``options``), so a rebuild with others is told apart."""
    root = Path(root)
    used = options(
        dim=dim, n_images=n_images, n_attributes=n_attributes, n_values=n_values,
        tasks_per_attribute=tasks_per_attribute, noise=noise, seed=seed,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n_attributes, n_values, dim, generator=g)
    attr_of_image = torch.randint(0, n_values, (n_images, n_attributes), generator=g)
    images = values[torch.arange(n_attributes), attr_of_image].sum(1) + noise * torch.randn(
        n_images, dim, generator=g
    )
    image_ids = [f"img{i}" for i in range(n_images)]
    q_base = torch.randn(n_attributes, 2, dim, generator=g)
    tasks, q_feats, a_feats = [], [], []
    for a in range(n_attributes):
        for j in range(tasks_per_attribute):
            negated = j % 2 == 1
            question = f"{'which is not' if negated else 'what is'} attribute {a}? (variant {j})"
            answers = [f"a{a}v{v}" for v in range(n_values)]
            perm = torch.roll(torch.arange(n_values), 1) if negated else torch.arange(n_values)
            # a random subset of images per task, grouped by answer
            chosen = torch.randperm(n_images, generator=g)[: n_images // 2].tolist()
            by_answer = {
                ans: [image_ids[i] for i in chosen if int(attr_of_image[i, a]) == v]
                for v, ans in enumerate(answers)
            }
            support, query = split_support_query(by_answer, seed=seed)
            idx = {ans: k for k, ans in enumerate(answers)}
            tasks.append(
                Task(
                    question,
                    tuple(answers),
                    tuple((i, idx[x]) for i, x in support),
                    tuple((i, idx[x]) for i, x in query),
                )
            )
            q_feats.append(q_base[a, int(negated)] + 0.1 * torch.randn(dim, generator=g))
            a_feats.append(values[a][perm] + 0.05 * torch.randn(n_values, dim, generator=g))
    order = torch.randperm(len(tasks), generator=g).tolist()
    n_train = round(0.7 * len(tasks))
    train = [tasks[i] for i in order[:n_train]]
    test = [tasks[i] for i in order[n_train:]]
    save_tasks(root / "meta_train.json", train)
    save_tasks(root / "meta_test.json", test)
    negated_q = [t for t in tasks if t.question.startswith("which is not")]
    plain_q = [t for t in tasks if not t.question.startswith("which is not")]
    save_tasks(root / "family" / "meta_train.json", plain_q)
    save_tasks(root / "family" / "meta_test.json", negated_q)
    write_json(root / "prompts.json", {t.question: "the answer is {}" for t in tasks})
    encoder = "synthetic"
    write_features(
        root,
        encoder,
        image_ids,
        images,
        [t.question for t in tasks],
        torch.stack(q_feats),
        [list(t.answers) for t in tasks],
        a_feats,
    )
    write_manifest(
        root,
        {
            "builder": BUILDER,
            "builder_version": BUILDER_VERSION,
            "options": used,
            "encoder": encoder,
            "dim": dim,
            "question_dim": dim,
            "seed": seed,
            "statistics": {"meta_train": task_statistics(train), "meta_test": task_statistics(test)},
        },
    )
    return root


def options(**given) -> dict:
    """The arguments of :func:`make_synthetic`: its defaults, overridden by ``given``."""
    params = inspect.signature(make_synthetic).parameters
    unknown = set(given) - set(params)
    if unknown:
        raise TypeError(f"make_synthetic has no argument {sorted(unknown)[0]!r}")
    return {k: given.get(k, p.default) for k, p in params.items() if k != "root"}
