"""The `meta-vqa` command: help lists every verb; bad input is one error line with exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from meta_vqa.cli import main
from meta_vqa.lightning_cli import _compact_argument_error

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "conf" / "smoke" / "base.yaml")


def test_help_lists_every_verb(capfd):
    assert main(["--help"]) == 0
    out = capfd.readouterr().out
    for verb in ("prepare", "fit", "validate", "test", "predict", "report", "bench", "pipeline", "generate"):
        assert f"\n  {verb}" in out


def test_console_script_runs_as_a_module():
    r = subprocess.run(
        [sys.executable, "-m", "meta_vqa", "--help"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "fit" in r.stdout


def _one_error_line(capfd):
    err = capfd.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in "\n".join(err)
    return errors[0]


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["fit", "-c", SMOKE, "--model.init_args.variant", "bogus"],
            "model.variant: Expected a typing.Literal",
        ),
        (["fit", "-c", SMOKE, "--data.batch_size", "many"], "data.batch_size"),
        (["fit", "-c", "/no/such/config.yaml"], "does not exist"),
        (["pipeline", "-c", "/no/such/pipeline.yaml"], "no such pipeline config"),
        (["pipeline", "-c", str(REPO / "conf/smoke/pipeline.yaml"), "splits=[bogus]"], "splits"),
        (["frobnicate"], "unknown verb"),
        (["bench", "nothing"], "unknown bench"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle, capfd, synthetic_root, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    args = [a.replace("--data.batch_size", "--data.batch_size") for a in args]
    if args[0] == "fit" and "/no/such" not in args[2]:
        args += ["--data.root", str(synthetic_root)]
    assert main(args) == 2
    assert needle in _one_error_line(capfd)
    assert not (tmp_path / "lightning_logs").exists()  # nothing written half-way


def test_missing_dataset_and_untrainable_variant(capfd, synthetic_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "-c", SMOKE, "--data.root", str(tmp_path / "none")]) == 2
    assert "dataset.json: dataset manifest not found" in _one_error_line(capfd)
    assert (
        main(
            [
                "fit",
                "-c",
                SMOKE,
                "--data.root",
                str(synthetic_root),
                "--model.init_args.variant",
                "clip_zero_shot",
            ]
        )
        == 2
    )
    assert "no trainable parameters" in _one_error_line(capfd)
    assert not (tmp_path / "lightning_logs").exists()


def test_report_aggregates_result_files(tmp_path, capfd):
    import json

    for seed, acc in ((0, 40.0), (1, 60.0)):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        (d / "results.json").write_text(
            json.dumps(
                [
                    {
                        "method": "mnet_maml",
                        "split": "random",
                        "shots": 0,
                        "seed": seed,
                        "accuracy": acc,
                        "accuracy_pooled": acc,
                        "n_tasks": 4,
                    }
                ]
            )
        )
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "all")]) == 0
    assert "| mnet_maml | 50.0 ± 14.1 |" in capfd.readouterr().out
    assert (tmp_path / "all" / "results.md").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_compact_error_names_the_nested_key():
    msg = (
        'Parser key "model":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
        "    - Problem with given class_path 'x.Y':\n        Parser key \"variant\":\n"
        "          Expected a Literal['a']. Got value: b\n    - Expected a <class 'NoneType'>"
    )
    assert _compact_argument_error(msg) == "model.variant: Expected a Literal['a']. Got value: b"


def test_version(capfd):
    import tomllib

    from meta_vqa import __version__

    assert main(["--version"]) == 0
    want = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert capfd.readouterr().out.strip() == f"meta-vqa {want}" == f"meta-vqa {__version__}"


def test_stage_help_names_the_stage_classes(capfd):
    assert main(["fit", "--help"]) == 0
    out = capfd.readouterr().out
    assert out.startswith("usage: meta-vqa fit -c CONFIG.yaml")
    for stage in ("BaseStage", "HNetStage", "HVAEStage", "HyperCLIPStage", "HyperLDMStage"):
        assert f"\n  {stage} " in out  # one line each, before the options
    assert main(["fit", "--model.help", "HyperLDMStage"]) == 0  # the short name resolves
    assert "--model.p_uncond P_UNCOND" in capfd.readouterr().out


def test_bench_help_lists_each_bench_with_a_line(capfd):
    from meta_vqa.bench import BENCHES

    assert main(["bench", "--help"]) == 0
    out = capfd.readouterr().out
    for name in BENCHES:
        line = next(ln for ln in out.splitlines() if ln.startswith(f"  {name} "))
        assert len(line.split()) > 3


def test_every_generate_and_report_option_is_described():
    from meta_vqa.cli import report_parser
    from meta_vqa.generate import build_parser

    for parser in (build_parser(), report_parser()):
        undocumented = [a.dest for a in parser._actions if not a.help]
        assert not undocumented, f"{parser.prog}: {undocumented}"
