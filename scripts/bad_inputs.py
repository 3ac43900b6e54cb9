"""The table of bad inputs and what each gives: runs tests/test_bad_inputs.py and prints it as Markdown.

    python scripts/bad_inputs.py [--out TABLE.md]

Each row: the input, the command (``<name>``: a file the test makes: a truncated checkpoint, a dataset with
NaN rows, ...), the exit code and the error line (temporary paths shortened). The test asserts for every
row: exit code 2, one ``error:`` line naming the file or key, no traceback, nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "rows.jsonl"
        env = {**os.environ, "BAD_INPUTS_TABLE": str(table), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_bad_inputs.py"]
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        rows = [json.loads(line) for line in table.read_text().splitlines()] if table.is_file() else []
    lines = [
        "| # | bad input | command | exit | error line |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        error = re.sub(r"/tmp/\S*?/(bad_inputs|smoke_\w+|synthetic)\d*(/|:)", r"<tmp>\2", r["error"])
        error = error.replace(f"{REPO}/", "")
        cells = [str(i), r["case"], f"`{r['command']}`", str(r["rc"]), error.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    print(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:])
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
