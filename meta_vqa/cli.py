"""The ``meta-vqa`` command.

Verbs:
  prepare easy-vqa|meta-vqa|synthetic   build a dataset folder (tasks, prompts, features)
  fit|validate|test|predict  train / evaluate a stage from YAML (LightningCLI, omegaconf mode)
  report PATH...           aggregate results.json files into one table (mean ± std over seeds)
  bench NAME               measure a performance figure against the straightforward baseline
  generate                 adapter weights for a new task description (HyperLDM / HyperCLIP)
  pipeline                 the whole chain (prepare → every stage → report), resumable

Bad input (a malformed file, an unknown key or value) is reported as one ``error:`` line with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

LIGHTNING_VERBS = ("fit", "validate", "test", "predict")

HELP = """usage: meta-vqa VERB [options]

Meta-learning via classifier(-free) diffusion guidance: generate task-specific network weights from a
task description.

verbs:
  prepare easy-vqa|meta-vqa|synthetic [--out DIR]  build a dataset: the embedded Meta-EasyVQA, the
                                  paper's Meta-VQA (--tasks/--vqa-root, --features/--coco-root), or
                                  synthetic features (the tiny test set, or --tasks DIR: real task files)
  fit       -c CONFIG.yaml        train a stage (LightningCLI; any config key can be overridden: --model.x v)
  validate  -c CONFIG.yaml        evaluate a stage on the validation tasks
  test      -c CONFIG.yaml        zero-/few-shot evaluation on the meta-test tasks; writes results.json/.md
  predict   -c CONFIG.yaml        run a stage's predict step (e.g. the adaptation dataset)
  report    RUN [--out DIR]       tables over seeds and splits, claims, memorisation, plots (RUN/report)
  bench     maml|hnet|sample|clip [--json]  batched vs per-task throughput; DDPM vs DDIM/DPM sampling;
                                  CLIP image-encoding throughput
  generate  --run RUN --question Q --answers a,b [--image P ...]   adapter weights from a description
  pipeline  -c PIPELINE.yaml [--seeds N] [--out DIR] [--splits random family]
                                  prepare → base → hnet → adaptation → hvae → hyperclip → hyperldm → report;
                                  a re-run skips finished stages and resumes an interrupted one

`meta-vqa VERB --help` describes a verb's options; `meta-vqa --version` prints the version.
Logs go to lightning_logs/ (TensorBoard: `tensorboard --logdir lightning_logs`, or RUN/lightning_logs
for a pipeline run).
"""


def _error(msg: str) -> int:
    first = str(msg).strip().splitlines()
    print(f"error: {first[0] if first else msg}", file=sys.stderr)
    return 2


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the message (it may be swapped, e.g. by tests),
    on a line of its own (a live progress line is cleared first)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        from meta_vqa.progress import clear_line

        clear_line()
        super().emit(record)


def _setup_logging() -> None:
    # our own messages only; Lightning configures its own logger
    logger = logging.getLogger("meta_vqa")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meta-vqa report",
        description="The report of a run: results tables over seeds and splits, claims, memorisation, plots.",
    )
    p.add_argument(
        "paths", nargs="+", help="a run folder (or results.json files / folders, searched recursively)"
    )
    p.add_argument(
        "--out", default=None, help="report folder, the only place it writes to (default: RUN/report)"
    )
    p.add_argument(
        "--title", default=None, help="report title (default: the pipeline's, from RUN/pipeline.json)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="dataset folder, for the question families of the latent plots (default: the run's)",
    )
    p.add_argument("--no-plots", action="store_true", help="tables only, no figures")
    return p


def run_report(argv: list[str]) -> int:
    args = report_parser().parse_args(argv)
    from meta_vqa.errors import MetaVQAError
    from meta_vqa.eval.report import build_report
    from meta_vqa.eval.results import load_results, render_markdown, write_results

    missing = [x for x in args.paths if not os.path.exists(x)]
    if missing:
        raise MetaVQAError(f"{missing[0]}: no such file or folder")
    if len(args.paths) == 1 and os.path.isdir(args.paths[0]):
        build_report(args.paths[0], args.out, args.title, args.data, plots=not args.no_plots, echo=True)
        return 0
    records = load_results(args.paths, exclude=args.out)
    if not records:
        raise MetaVQAError(f"{args.paths[0]}: no results.json found")
    if args.out:
        write_results(args.out, records, args.title or "Meta-test results")
    print(render_markdown(records, args.title or "Meta-test results"))
    return 0


def run_bench(argv: list[str]) -> int:
    from meta_vqa.bench import main as bench_main

    return bench_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    if argv[0] in ("-V", "--version"):
        from meta_vqa import __version__

        print(f"meta-vqa {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from meta_vqa.device import reuse_freed_memory

    reuse_freed_memory()  # large freed blocks are reused, not faulted in again (META_VQA_MALLOC=system: off)
    _setup_logging()
    from meta_vqa._quiet import quiet

    quiet()
    import yaml

    from meta_vqa.errors import MetaVQAError
    from meta_vqa.io import yaml_error

    try:
        if verb in LIGHTNING_VERBS:
            from meta_vqa.lightning_cli import run_stage

            return run_stage(argv)
        if verb == "prepare":
            from meta_vqa.prepare import main as prepare_main

            return prepare_main(rest)
        if verb == "report":
            return run_report(rest)
        if verb == "bench":
            return run_bench(rest)
        if verb == "generate":
            from meta_vqa.generate import main as generate_main

            return generate_main(rest)
        if verb == "pipeline":
            from meta_vqa.pipeline import main as pipeline_main

            return pipeline_main(rest)
        return _error(f"unknown verb {verb!r}; run `meta-vqa --help` for the list")
    except MetaVQAError as e:
        return _error(str(e))
    except yaml.YAMLError as e:  # a config file (pipeline YAML, ...) read by another library
        return _error(yaml_error(None, e))
    except KeyboardInterrupt:
        return _error("interrupted")


if __name__ == "__main__":
    sys.exit(main())
