"""environment.yml and the Dockerfile against pyproject.toml: the same dependencies, the package from the
checkout, the entry point. (Building them needs the conda and Docker registries; these checks do not.)"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    """The normalised project name of a requirement (PEP 503): extras and versions dropped."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~;\s]", req.strip(), maxsplit=1)[0]).lower()


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_environment_yml_installs_the_checkout_with_pyprojects_dependencies(project):
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    python = next(d for d in conda if d.startswith("python"))
    minimum = tuple(
        int(x) for x in re.search(r">=\s*([\d.]+)", project["requires-python"]).group(1).split(".")
    )
    assert tuple(int(x) for x in python.split("=")[-1].split(".")) >= minimum
    assert "pip" in conda
    assert "-e ." in pip  # the package itself, from this checkout
    assert any(
        p.startswith("--extra-index-url https://download.pytorch.org/whl/cu") for p in pip
    )  # CUDA torch
    reqs = [p for p in pip if not p.startswith("-")]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    assert sorted(reqs) == sorted(wanted)  # the same names and the same version bounds
    assert len({_name(r) for r in reqs}) == len(reqs)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".") if x.isdigit())


def test_dockerfile_builds_the_package_with_its_entry_point_offline_as_a_user(project):
    text = (REPO / "Dockerfile").read_text()
    lines = [
        ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.startswith("#")
    ]
    image = next(ln.split()[1] for ln in lines if ln.startswith("FROM "))
    assert "cuda" in image and "runtime" in image
    if image.startswith("pytorch/pytorch:"):  # the image's torch is kept: it must meet pyproject's bound
        torch_req = next(d for d in project["dependencies"] if _name(d) == "torch")
        bound = re.search(r">=\s*([\d.]+)", torch_req)
        version = image.split(":")[1].split("-")[0]
        if bound:
            assert _version(version) >= _version(bound.group(1)), (image, torch_req)
    env = " ".join(ln for ln in lines if ln.startswith("ENV "))
    assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env
    copies = [ln.split()[1:-1] for ln in lines if ln.startswith("COPY ")]
    assert ["pyproject.toml", "README.md"] in copies  # readme: pyproject.toml names it
    assert ["meta_vqa"] in copies and ["conf"] in copies
    runs = " ".join(ln for ln in lines if ln.startswith("RUN "))
    assert "tomllib.load(open('pyproject.toml'" in runs and "pip install -r" in runs  # deps from pyproject
    assert "pip install --no-deps ." in runs  # then the package from the checkout
    (entry,) = [json.loads(ln.removeprefix("ENTRYPOINT ")) for ln in lines if ln.startswith("ENTRYPOINT ")]
    assert entry == ["meta-vqa"] and "meta-vqa" in project["scripts"]
    user = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert user and user[-1] not in ("root", "0") and "useradd" in runs
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"data", "runs", ".venv", ".git"} <= set(ignored)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def test_the_base_images_torch_meets_pyprojects_floor(project):
    """The image's torch is kept only if it satisfies pyproject's bound; else `pip install -r` would pull
    another torch from PyPI over the image's CUDA build (a second multi-GB layer)."""
    text = (REPO / "Dockerfile").read_text()
    image = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    repo, tag = image.split(":")
    assert repo == "pytorch/pytorch"
    image_torch = re.match(r"(\d+\.\d+\.\d+)-cuda", tag).group(1)
    (torch_req,) = [r for r in project["dependencies"] if _name(r) == "torch"]
    floor = re.search(r">=\s*([\d.]+)", torch_req).group(1)
    assert _version(image_torch) >= _version(floor), (image, torch_req)


def test_the_dockerfiles_requirement_list_is_pyprojects(project):
    """Run the Dockerfile's own extraction command here: it lists exactly pyproject's dependencies."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    cmd = re.search(r'python -c ("[^"]+")', text).group(1)
    out = subprocess.run(
        [sys.executable, "-c", shlex.split(cmd)[0]], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == project["dependencies"]
