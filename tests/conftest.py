import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

# Lightning binds its log handlers to sys.stderr at import: import it once here, outside any one
# test's captured stream, so later tests never log into a closed capture.
import lightning.pytorch  # noqa: E402, F401
import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "meta_vqa"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic dataset folder with learnable task structure (built once per session)."""
    from meta_vqa.prepare.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synthetic") / "data")


@pytest.fixture
def meta_vqa_files() -> Path:
    """The authors' Meta-VQA task files, beside the repository (tests skip where they are absent)."""
    if not (SHARED_DATA / "meta_train.json").is_file():
        pytest.skip("../shared/data/meta_vqa is not available")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smoke_hnet(synthetic_root, tmp_path_factory) -> dict:
    """A tiny HNet-MAML trained and tested on the synthetic dataset (conf/smoke/hnet.yaml), once per session.

    Returns ``{"root", "dir", "ckpt", "results"}``: the working folder, the best checkpoint and the
    test records.
    """
    import json

    from meta_vqa.cli import main

    work = tmp_path_factory.mktemp("smoke_hnet")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        args = ["fit", "-c", str(REPO / "conf" / "smoke" / "hnet.yaml"), "--data.root", str(synthetic_root)]
        args += [
            "--model.init_args.results_dir",
            str(work / "results"),
            "--trainer.enable_progress_bar",
            "false",
        ]
        assert main([*args, "--test_after_fit", "true"]) == 0
    finally:
        os.chdir(cwd)
    ckpt = next((work / "lightning_logs").rglob("best.ckpt"))
    records = json.loads((work / "results" / "results.json").read_text())
    return {"root": synthetic_root, "dir": work, "ckpt": ckpt, "results": records}


@pytest.fixture(scope="session")
def smoke_adaptation(smoke_hnet, tmp_path_factory) -> Path:
    """The adaptation dataset of the session's HNet (conf/smoke/adapt.yaml), made once per session."""
    from meta_vqa.cli import main

    out = tmp_path_factory.mktemp("smoke_adaptation") / "adaptation"
    args = [
        "predict",
        "-c",
        str(REPO / "conf" / "smoke" / "adapt.yaml"),
        "--data.root",
        str(smoke_hnet["root"]),
    ]
    assert main([*args, "--ckpt_path", str(smoke_hnet["ckpt"]), "--stage_dir", str(out)]) == 0
    return out
