"""scripts/run_easy_vqa.sh (make run): the commands it chains and its skipping of finished stages."""

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run_easy_vqa.sh"


def _commands(tmp_path, seeds="1"):
    env = {**os.environ, "MV": "echo", "RUNS": str(tmp_path / "runs"), "DATA": str(tmp_path / "data")}
    out = subprocess.run(["bash", str(SCRIPT), seeds], env=env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line and not line.startswith(("==", "[time]"))]


def test_every_stage_hands_its_checkpoint_to_the_next(tmp_path):
    cmds = _commands(tmp_path)
    r = tmp_path / "runs" / "seed0"
    find = lambda *words: [c for c in cmds if all(w in c for w in words)]
    assert cmds[0].startswith("prepare easy-vqa")
    assert (
        len(find("fit -c conf/easy_vqa/base.yaml")) == 4 and len(find("test -c conf/easy_vqa/base.yaml")) == 1
    )
    assert find("fit -c conf/easy_vqa/hnet.yaml", f"--trainer.callbacks.init_args.dirpath {r}/hnet")
    assert find("predict -c conf/easy_vqa/adapt.yaml", f"--ckpt_path {r}/hnet/best.ckpt")
    assert find("fit -c conf/easy_vqa/hvae.yaml", f"upstream_ckpt {r}/hnet/best.ckpt", f"{r}/adaptation")
    for gen in ("hnet", "hvae"):
        assert find("conf/easy_vqa/hyperclip.yaml", f"upstream_ckpt {r}/{gen}/best.ckpt")
        assert find(
            "conf/easy_vqa/hyperldm.yaml",
            f"upstream_ckpt {r}/{gen}/best.ckpt",
            f"hyperclip_ckpt {r}/{gen}_hyperclip/best.ckpt",
        )
    assert cmds[-1].startswith("report")


def test_finished_stages_are_skipped(tmp_path):
    r = tmp_path / "runs" / "seed0"
    for stage in ("base/uncond_multitask", "hnet", "hvae_hyperldm"):
        (r / stage).mkdir(parents=True)
        (r / stage / "results.json").write_text("[]")
    cmds = _commands(tmp_path)
    assert not [c for c in cmds if "base_uncond_multitask" in c]
    assert not [c for c in cmds if "conf/easy_vqa/hnet.yaml" in c]
    assert not [c for c in cmds if "hyperldm.yaml" in c and "hvae/best.ckpt" in c]
    assert [c for c in cmds if "hyperldm.yaml" in c and "hnet/best.ckpt" in c]
