"""One rank of a DDP group the tests launch themselves (tests/test_ddp.py): runs ``meta-vqa`` commands in order.

    MASTER_ADDR=127.0.0.1 MASTER_PORT=P WORLD_SIZE=2 NODE_RANK=0 LOCAL_RANK=r python tests/ddp_worker.py PLAN

``PLAN`` is a JSON list of command lines (``fit|test|predict ...``, with ``--trainer.strategy ddp``);
Lightning sees ``LOCAL_RANK`` and joins the group instead of launching processes, so several stages run in
the same two processes. For the checks, rank 0 saves each fitted model's state before the first step
(``<stage_dir>/initial.pt``) and every rank lists the adaptation parts it writes
(``<stage_dir>/written_rank<r>.txt``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch


def main(plan: str) -> int:
    rank = int(os.environ["LOCAL_RANK"])
    torch.set_num_threads(1)

    from meta_vqa.stages import adaptation_writer

    write_part = adaptation_writer.write_part

    def recording_write_part(out, job, tensors):
        with open(Path(out) / f"written_rank{rank}.txt", "a", encoding="utf-8") as f:
            f.write(job + "\n")
        return write_part(out, job, tensors)

    adaptation_writer.write_part = recording_write_part
    fit = pl.Trainer.fit

    def recording_fit(self, model=None, *args, **kwargs):
        if rank == 0:
            Path(self.default_root_dir).mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), Path(self.default_root_dir) / "initial.pt")
        return fit(self, model, *args, **kwargs)

    pl.Trainer.fit = recording_fit
    from meta_vqa.cli import main as cli

    for argv in json.loads(Path(plan).read_text()):
        rc = cli(argv)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
