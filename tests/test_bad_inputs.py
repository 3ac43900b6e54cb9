"""Bad input across the CLI verbs: each is one ``error:`` line naming the file, key or task, exit code 2,
no traceback, and nothing written (no logger folder, config.yaml, checkpoint, parts, weights file).

``scripts/bad_inputs.py`` runs this module and prints the table of inputs and the errors they give.
"""

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from meta_vqa.cli import main
from meta_vqa.data.features import write_manifest
from meta_vqa.io import sha256_file

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "conf" / "smoke"
HNET, BASE, ADAPT = f"{SMOKE}/hnet.yaml", f"{SMOKE}/base.yaml", f"{SMOKE}/adapt.yaml"
HVAE, HYPERLDM, PIPELINE = f"{SMOKE}/hvae.yaml", f"{SMOKE}/hyperldm.yaml", f"{SMOKE}/pipeline.yaml"
STAGES = "meta_vqa.stages"

# (id, command with {placeholders} for the files of the `files` fixture, what the error line must contain)
CASES = [
    # --- checkpoints given to fit / validate / test / predict --------------------------------------------
    ("ckpt_path missing", ["test", "-c", HNET, "--data.root", "{root}", "--ckpt_path", "{d}/none.ckpt"],
     "none.ckpt: checkpoint not found (--ckpt_path)"),
    ("ckpt_path truncated (test)", ["test", "-c", HNET, "--data.root", "{root}", "--ckpt_path", "{truncated}"],
     "truncated.ckpt: not a readable checkpoint (PytorchStreamReader failed reading zip archive"),
    ("ckpt_path truncated (fit)", ["fit", "-c", HNET, "--data.root", "{root}", "--ckpt_path", "{truncated}"],
     "truncated.ckpt: not a readable checkpoint"),
    ("ckpt_path truncated (predict)", ["predict", "-c", ADAPT, "--data.root", "{root}", "--ckpt_path", "{truncated}"],
     "truncated.ckpt: not a readable checkpoint"),
    ("ckpt_path empty file", ["test", "-c", HNET, "--data.root", "{root}", "--ckpt_path", "{empty}"],
     "empty.ckpt: an empty file, not a checkpoint"),
    ("ckpt_path text file", ["validate", "-c", HNET, "--data.root", "{root}", "--ckpt_path", "{text}"],
     "text.ckpt: not a readable checkpoint"),
    ("ckpt_path random bytes", ["test", "-c", HNET, "--data.root", "{root}", "--ckpt_path", "{random}"],
     "random.ckpt: not a readable checkpoint (Unsupported operand"),
    ("ckpt_path a folder", ["test", "-c", HNET, "--data.root", "{root}", "--ckpt_path", "{d}"],
     ": not a checkpoint file (--ckpt_path)"),
    ("ckpt_path a bare tensor", ["test", "-c", HNET, "--data.root", "{root}", "--ckpt_path", "{tensor}"],
     "tensor.ckpt: not a Lightning checkpoint of a stage (a Tensor)"),
    ("ckpt_path of another stage (mnet_maml to hnet)",
     ["test", "-c", HNET, "--data.root", "{root}", "--ckpt_path", "{base}"],
     f"a {STAGES}.base.BaseStage checkpoint, but this command expects {STAGES}.hnet.HNetStage"),
    ("HVAE checkpoint to the adaptation predict",
     ["predict", "-c", ADAPT, "--data.root", "{root}", "--ckpt_path", "{hvae}"],
     f"a {STAGES}.hvae.HVAEStage checkpoint, but this command expects {STAGES}.hnet.HNetStage"),
    ("adaptation predict without ckpt_path", ["predict", "-c", ADAPT, "--data.root", "{root}"],
     "--ckpt_path: the adaptation dataset is made from a trained HNet checkpoint"),
    ("fit resumed from weights only", ["fit", "-c", HNET, "--data.root", "{root}", "--ckpt_path", "{weights}"],
     "weights.ckpt: holds no training state ('loops') to resume from"),
    ("ckpt_path whose weights do not fit the model",
     ["fit", "-c", HNET, "--data.root", "{root}", "--ckpt_path", "{hnet}", "--model.init_args.latent_dim", "4"],
     "its weights do not fit HNetStage ('z0' has shape [8], the model [4]"),
    ("crafted pickle via file:// (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1)",
     ["test", "-c", HNET, "--data.root", "{root}", "--ckpt_path", "file://{evil}"],
     "evil.ckpt: holds a pickled io.open, not plain weights; refusing to unpickle it"),
    ("ckpt_path http URL", ["test", "-c", HNET, "--data.root", "{root}", "--ckpt_path", "http://example.org/x.ckpt"],
     "only local checkpoint files are read"),
    ("ckpt_path file:// URL of another host",
     ["test", "-c", HNET, "--data.root", "{root}", "--ckpt_path", "file://host/x.ckpt"],
     "a file:// URL of another host"),
    ("--weights_only false", ["test", "-c", HNET, "--data.root", "{root}", "--ckpt_path", "{hnet}",
                              "--weights_only", "false"],
     "--weights_only: checkpoints are only ever read with weights_only=True"),
    # --- upstream checkpoints of the downstream stages ---------------------------------------------------
    ("upstream_ckpt missing", ["fit", "-c", HVAE, "--data.root", "{root}", "--data.adaptation", "{adapt}",
                               "--model.init_args.upstream_ckpt", "{d}/none.ckpt"],
     "none.ckpt: checkpoint not found (model.upstream_ckpt)"),
    ("upstream_ckpt truncated", ["fit", "-c", HVAE, "--data.root", "{root}", "--data.adaptation", "{adapt}",
                                 "--model.init_args.upstream_ckpt", "{truncated}"],
     "truncated.ckpt: not a readable checkpoint"),
    ("upstream_ckpt of another stage", ["fit", "-c", HVAE, "--data.root", "{root}", "--data.adaptation",
                                        "{adapt}", "--model.init_args.upstream_ckpt", "{base}"],
     f"a {STAGES}.base.BaseStage checkpoint, expected {STAGES}.hnet.HNetStage"),
    ("upstream_ckpt crafted pickle via file://",
     ["fit", "-c", HVAE, "--data.root", "{root}", "--data.adaptation", "{adapt}",
      "--model.init_args.upstream_ckpt", "file://{evil}"],
     "refusing to unpickle it (model.upstream_ckpt)"),
    ("upstream_ckpt not given", ["fit", "-c", HYPERLDM, "--data.root", "{root}", "--data.adaptation", "{adapt}"],
     "model.upstream_ckpt: required"),
    ("hyperclip_ckpt of another stage",
     ["fit", "-c", HYPERLDM, "--data.root", "{root}", "--data.adaptation", "{adapt}",
      "--model.init_args.upstream_ckpt", "{hnet}", "--model.init_args.hyperclip_ckpt", "{hnet}"],
     f"expected {STAGES}.hyperclip.HyperCLIPStage"),
    # --- data --------------------------------------------------------------------------------------------
    ("NaN image features", ["fit", "-c", HNET, "--data.root", "{nan}", "--test_after_fit", "true"],
     "images.safetensors: row 17 (image 'img17') is not finite (and 4 more rows)"),
    ("NaN image features, verify off", ["fit", "-c", HNET, "--data.root", "{nan}", "--data.verify", "false"],
     "row 17 (image 'img17') is not finite"),
    ("Inf answer-prompt features (mnet_maml)", ["fit", "-c", BASE, "--data.root", "{inf}"],
     "answers.safetensors: row 5 (answer"),
    ("-Inf question features (test)", ["test", "-c", HNET, "--data.root", "{ninf}", "--ckpt_path", "{hnet}"],
     "questions.safetensors: row 2 (question"),
    ("NaN latents in the adaptation dataset",
     ["fit", "-c", HVAE, "--data.root", "{root}", "--data.adaptation", "{nan_adapt}",
      "--model.init_args.upstream_ckpt", "{hnet}"],
     "adaptation.safetensors: 'latents' is not finite at index [1, 2, 0]"),
    ("task file not JSON", ["fit", "-c", HNET, "--data.root", "{bad_json}"], "meta_train.json: not valid JSON"),
    ("task naming an image without features", ["fit", "-c", HNET, "--data.root", "{bad_image}"],
     "has no features in"),
    ("dataset file changed after the build", ["fit", "-c", HNET, "--data.root", "{changed}"],
     "prompts.json: missing or changed since the dataset was built"),
    ("no dataset", ["fit", "-c", HNET, "--data.root", "{d}/nothing"], "dataset.json: dataset manifest not found"),
    # --- configs -----------------------------------------------------------------------------------------
    ("stage YAML syntax error", ["fit", "-c", "{bad_yaml}", "--data.root", "{root}"],
     "bad.yaml: not valid YAML (line 3, column 7"),
    ("override YAML syntax error", ["fit", "-c", HNET, "-c", "{bad_yaml}", "--data.root", "{root}"],
     "bad.yaml: not valid YAML"),
    ("pipeline YAML syntax error", ["pipeline", "-c", "{bad_yaml}"], "bad.yaml: not valid YAML (line 3, column 7"),
    ("pipeline unknown key", ["pipeline", "-c", PIPELINE, "colour=blue"], "colour"),
    ("unknown model argument", ["fit", "-c", HNET, "--data.root", "{root}", "--model.init_args.bogus", "1"],
     "bogus"),
    ("wrong type", ["fit", "-c", HNET, "--data.root", "{root}", "--data.batch_size", "many"], "data.batch_size"),
    # --- generate ----------------------------------------------------------------------------------------
    ("generate empty question", ["generate", "--ckpt", "{hnet}", "--question", "", "--answers", "yes,no"],
     "--question: empty"),
    ("generate blank question", ["generate", "--ckpt", "{hnet}", "--question", "  ", "--answers", "yes,no"],
     "--question: empty"),
    ("generate repeated answer", ["generate", "--ckpt", "{hnet}", "--question", "q?", "--answers", "yes,yes"],
     "'yes' is given twice"),
    ("generate answers differing in case", ["generate", "--ckpt", "{hnet}", "--question", "q?", "--answers",
                                            "Yes,yes"], "'yes' is given twice (as 'Yes')"),
    ("generate empty answer", ["generate", "--ckpt", "{hnet}", "--question", "q?", "--answers", "yes,,no"],
     "an empty answer"),
    ("generate one answer", ["generate", "--ckpt", "{hnet}", "--question", "q?", "--answers", "yes"],
     "give at least two"),
    ("generate NaN gamma", ["generate", "--ckpt", "{hnet}", "--question", "q?", "--answers", "a,b", "--gamma",
                            "nan"], "--gamma nan: must be a finite number"),
    ("generate zero samples", ["generate", "--ckpt", "{hnet}", "--question", "q?", "--answers", "a,b",
                               "--samples", "0"], "--samples must be at least 1"),
    ("generate missing image", ["generate", "--ckpt", "{hnet}", "--question", "q?", "--answers", "a,b",
                                "--image", "{d}/none.png"], "none.png: no such file"),
    ("generate truncated ckpt", ["generate", "--ckpt", "{truncated}", "--question", "q?", "--answers", "a,b"],
     "truncated.ckpt: not a readable checkpoint"),
    ("generate ckpt of another stage", ["generate", "--ckpt", "{hnet}", "--question", "q?", "--answers", "a,b"],
     f"a {STAGES}.hnet.HNetStage checkpoint, but this command expects {STAGES}.hyperldm.HyperLDMStage"),
    ("generate run without the stage", ["generate", "--run", "{d}", "--question", "q?", "--answers", "a,b"],
     "no hnet_hyperldm/best.ckpt"),
    # --- bench, prepare, report --------------------------------------------------------------------------
    ("bench sample truncated ckpt", ["bench", "sample", "--ckpt", "{truncated}"], "not a readable checkpoint"),
    ("bench sample ckpt of another stage", ["bench", "sample", "--ckpt", "{hnet}"],
     f"but this command expects {STAGES}.hyperldm.HyperLDMStage"),
    ("prepare over a file", ["prepare", "synthetic", "--out", "{text}"], "exists and is not a folder"),
    ("prepare easy-vqa: a float16 CLIP on a CPU", ["prepare", "easy-vqa", "--out", "ev", "--clip-precision",
     "16-mixed"], "--clip-precision: 16-mixed (float16) needs a CUDA GPU"),
    ("prepare easy-vqa: a CLIP batch that does not split", ["prepare", "easy-vqa", "--out", "ev",
     "--clip-devices", "3"], "--clip-devices: a batch of 64 does not split over 3 processes"),
    ("prepare over another builder's dataset", ["prepare", "synthetic", "--out", "{foreign}"],
     "holds a 'easy-vqa' dataset, not 'synthetic'"),
    ("prepare over a folder without manifest", ["prepare", "synthetic", "--out", "{d}"],
     "folder exists but holds no dataset.json"),
    ("prepare over an unreadable manifest", ["prepare", "synthetic", "--out", "{bad_manifest}"],
     "dataset.json: not valid JSON"),
    ("report of nothing", ["report", "{d}/none"], "none: no such file or folder"),
]  # fmt: skip


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _rewrite_manifest(root: Path) -> None:
    manifest = json.loads((root / "dataset.json").read_text())
    manifest.pop("files")
    write_manifest(root, manifest)


def _poisoned(src: Path, dest: Path, kind: str, rows: list[int], value: float) -> Path:
    shutil.copytree(src, dest)
    path = dest / "features" / "synthetic" / f"{kind}.safetensors"
    tensors = load_file(path)
    tensors["features"][rows, 0] = value
    save_file(tensors, str(path))
    _rewrite_manifest(dest)
    return dest


@pytest.fixture(scope="module")
def files(smoke_hnet, smoke_adaptation, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("bad_inputs")
    root, hnet = Path(smoke_hnet["root"]), Path(smoke_hnet["ckpt"])
    f = {"d": d, "root": root, "hnet": hnet, "adapt": smoke_adaptation}
    raw = hnet.read_bytes()
    for name, data in (
        ("truncated", raw[: len(raw) // 2]),
        ("empty", b""),
        ("random", bytes(range(256)) * 8),
    ):
        f[name] = d / f"{name}.ckpt"
        f[name].write_bytes(data)
    f["text"] = d / "text.ckpt"
    f["text"].write_text("not a checkpoint\n")
    f["tensor"] = d / "tensor.ckpt"
    torch.save(torch.zeros(3), f["tensor"])
    f["evil"] = d / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _Payload(d / "PWNED")}, f["evil"])
    ckpt = torch.load(hnet, map_location="cpu", weights_only=True)
    f["hvae"] = d / "hvae.ckpt"  # an HNet checkpoint relabelled: the check reads the stage it names
    torch.save({**ckpt, "hyper_parameters": {**ckpt["hyper_parameters"], "_class_path": f"{STAGES}.hvae.HVAEStage"}},
               f["hvae"])  # fmt: skip
    f["weights"] = d / "weights.ckpt"
    torch.save({k: ckpt[k] for k in ("state_dict", "hyper_parameters")}, f["weights"])
    # a real mnet_maml checkpoint (3 steps)
    cwd = os.getcwd()
    os.chdir(d)
    try:
        args = ["fit", "-c", BASE, "--data.root", str(root), "--stage_dir", str(d / "base_run")]
        args += [
            "--trainer.max_steps",
            "3",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
        ]
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    f["base"] = d / "base_run" / "best.ckpt"
    # datasets
    f["nan"] = _poisoned(root, d / "nan", "images", [17, 40, 41, 99, 200], float("nan"))
    f["inf"] = _poisoned(root, d / "inf", "answers", [5], float("inf"))
    f["ninf"] = _poisoned(root, d / "ninf", "questions", [2], float("-inf"))
    f["bad_json"] = d / "bad_json"
    shutil.copytree(root, f["bad_json"])
    (f["bad_json"] / "meta_train.json").write_text('{"what is it?": {"answers": [')
    _rewrite_manifest(f["bad_json"])
    f["bad_image"] = d / "bad_image"
    shutil.copytree(root, f["bad_image"])
    tasks = json.loads((f["bad_image"] / "meta_train.json").read_text())
    first = next(iter(tasks.values()))
    first["train"][0][0] = "img_missing"
    (f["bad_image"] / "meta_train.json").write_text(json.dumps(tasks))
    _rewrite_manifest(f["bad_image"])
    f["changed"] = d / "changed"
    shutil.copytree(root, f["changed"])
    (f["changed"] / "prompts.json").write_text("{}")
    f["nan_adapt"] = d / "nan_adapt"
    shutil.copytree(smoke_adaptation, f["nan_adapt"])
    data = f["nan_adapt"] / "adaptation.safetensors"
    tensors = load_file(data)
    tensors["latents"][1, 2, 0] = float("nan")
    save_file(tensors, str(data), metadata={"format": "meta_vqa.adaptation/1"})
    sidecar = json.loads((f["nan_adapt"] / "adaptation.json").read_text())
    sidecar["sha256"]["adaptation.safetensors"] = sha256_file(data)
    (f["nan_adapt"] / "adaptation.json").write_text(json.dumps(sidecar))
    f["bad_yaml"] = d / "bad.yaml"
    f["bad_yaml"].write_text("model:\n  class_path: x\n   bad: [\n")
    f["foreign"] = d / "foreign"
    f["foreign"].mkdir()
    (f["foreign"] / "dataset.json").write_text(json.dumps({"builder": "easy-vqa"}))
    f["bad_manifest"] = d / "bad_manifest"
    f["bad_manifest"].mkdir()
    (f["bad_manifest"] / "dataset.json").write_text("{not json")
    return f


def _fill(argv: list[str], f: dict) -> list[str]:
    return [a.format(**{k: str(v) for k, v in f.items()}) for a in argv]


@pytest.mark.parametrize("name, argv, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_exit_2_nothing_written(
    name, argv, needle, files, tmp_path, monkeypatch, capfd
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    before = {p: p.stat().st_mtime_ns for p in files["d"].rglob("*")}
    command = " ".join(
        shlex.quote(a.replace(f"{REPO}/", "").replace("{", "<").replace("}", ">")) for a in argv
    )
    argv = _fill(argv, files)
    if argv[0] == "generate":
        argv += ["--out", str(tmp_path / "w.safetensors")]
    rc = main(argv)
    err = capfd.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("error:")]
    table = os.environ.get("BAD_INPUTS_TABLE")
    if table:  # scripts/bad_inputs.py collects the table
        with open(table, "a", encoding="utf-8") as out:
            line = errors[0] if errors else (err or [""])[-1]
            out.write(json.dumps({"case": name, "command": command, "rc": rc, "error": line}) + "\n")
    assert rc == 2 and len(errors) == 1 and "Traceback" not in "\n".join(err), err
    assert needle in errors[0], errors[0]
    assert list(tmp_path.iterdir()) == []  # no logger folder, config.yaml, checkpoint or weights file
    assert not (files["d"] / "PWNED").exists()
    after = {p: p.stat().st_mtime_ns for p in files["d"].rglob("*")}
    assert after == before  # nothing created or changed beside the inputs either
