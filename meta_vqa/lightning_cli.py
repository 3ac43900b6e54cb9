"""LightningCLI wiring: ``meta-vqa fit|validate|test|predict`` and :func:`run_stage`, which runs one such
command (the pipeline runs every stage through it).

What the CLI adds to LightningCLI:

* **Config composition.** A stage YAML builds on the ``defaults.yaml`` of its parent folder (shared by every
  dataset: trainer, logger, checkpointing, seed) and of its own folder (shared by one dataset's stages:
  the data settings); both are loaded before the stage's own YAML, which, like the command line, can
  override any key. ``meta-vqa fit -c conf/easy_vqa/hnet.yaml --print_config`` shows the result.
* **Checkpointing** as two top-level groups: ``checkpoint`` (the ``ModelCheckpoint`` that writes
  ``best.ckpt``) and ``last_checkpoint`` (``last.ckpt`` after every validation, for resuming).
* **Outputs of one stage in one folder**: ``--stage_dir DIR`` puts the checkpoints, ``results.json``/``.md``
  (the model's ``results_dir``) and, for ``predict``, the adaptation dataset in ``DIR``; ``--log_dir`` and
  ``--log_name`` place the TensorBoard run.
* Sizes that follow from the dataset are linked (``data.feature_dim`` → ``model.init_args.feature_dim``).
* ``--test_after_fit true`` tests the best checkpoint right after ``fit``.
* **Checkpoints are checked before anything is created** (:mod:`meta_vqa.stages.checkpoints`):
  ``--ckpt_path`` must be a readable checkpoint of the configured stage (``fit``: with the training state to
  resume), its weights must fit the model, and every load is ``weights_only=True``, the Trainer's too.
* **Training stops at the first non-finite loss or gradient** (:class:`~meta_vqa.callbacks.StopOnNonFinite`),
  before the step is applied, so no checkpoint or result is made from it.
* Bad input is one :class:`~meta_vqa.errors.MetaVQAError` (printed by ``meta-vqa`` as one ``error:`` line).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from meta_vqa._quiet import quiet
from meta_vqa.callbacks import LastCheckpoint, StopOnNonFinite
from meta_vqa.data.datamodule import MetaVQADataModule
from meta_vqa.device import check_trainer_precision
from meta_vqa.errors import ConfigError, DataError, MetaVQAError
from meta_vqa.io import check_yaml
from meta_vqa.progress import StageProgress
from meta_vqa.stages.checkpoints import check_stage, check_weights, read_checkpoint
from meta_vqa.stages.distributed import RandomStateAfterConstruction

VERBS = ("fit", "validate", "test", "predict")
DEFAULTS = "defaults.yaml"
# the stages a YAML's model.class_path names (imported here, so `--model.help HyperLDMStage` and a short
# `class_path: HNetStage` resolve), in pipeline order
STAGE_MODULES = (
    "meta_vqa.stages.base",
    "meta_vqa.stages.hnet",
    "meta_vqa.stages.hvae",
    "meta_vqa.stages.hyperclip",
    "meta_vqa.stages.hyperldm",
)
VERB_TEXT = {
    "fit": "Train a stage (and with --test_after_fit true, test its best checkpoint)",
    "validate": "Evaluate a stage on the validation tasks",
    "test": "Zero- and few-shot evaluation of a stage on the meta-test tasks (writes results.json/.md)",
    "predict": "Run a stage's predict step (the HNet's: the adaptation dataset, conf/<dataset>/adapt.yaml)",
}


def stage_classes() -> dict[str, type]:
    """``{name: class}`` of the stages, in pipeline order."""
    import importlib

    out = {}
    for name in STAGE_MODULES:
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if attr.endswith("Stage") and isinstance(obj, type) and obj.__module__ == name:
                out[attr] = obj
    return out


def help_description(verb: str) -> str:
    """What ``meta-vqa VERB --help`` says before the options: the verb, the stage classes, examples."""
    stages = stage_classes()
    width = max(map(len, stages))
    rows = "\n".join(
        f"  {n:<{width}}  {(c.__doc__ or '').strip().splitlines()[0]}" for n, c in stages.items()
    )
    import textwrap

    head = (
        f"{VERB_TEXT[verb]}, from its YAML (-c conf/<dataset>/<stage>.yaml, which builds on the defaults.yaml "
        "files of its folder and the one above) and command-line overrides of any key."
    )
    return (
        f"{textwrap.fill(head, 100)}\n\n"
        f"Stages (model.class_path, short names accepted):\n{rows}\n\n"
        f"  meta-vqa {verb} -c conf/easy_vqa/hnet.yaml --print_config   the composed config\n"
        f"  meta-vqa {verb} --model.help HyperLDMStage                  one stage's arguments"
    )


_MODEL_ARG = re.compile(r"--model\.(?:init_args\.)?([A-Za-z_]\w*)(?:=|$)")
_WRITER = "meta_vqa.stages.adaptation_writer.AdaptationWriter"


def config_files(argv: list[str]) -> list[Path]:
    """The ``-c``/``--config`` files of a command line, in order."""
    files = []
    for i, a in enumerate(argv):
        if a in ("-c", "--config") and i + 1 < len(argv):
            files.append(Path(argv[i + 1]))
        elif a.startswith("--config="):
            files.append(Path(a.split("=", 1)[1]))
    return files


def default_files(config: str | Path) -> list[Path]:
    """The defaults a stage YAML builds on: ``../defaults.yaml`` then ``./defaults.yaml``, where they exist."""
    config = Path(config)
    chain = [config.parent.parent / DEFAULTS, config.parent / DEFAULTS]
    return [p for p in chain if p.is_file() and p.resolve() != config.resolve()]


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's, with the description's line breaks kept (the stage list)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class MetaVQACLI(LightningCLI):
    """``meta-vqa fit|validate|test|predict``: any stage (``model.class_path``) over the one DataModule."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any):
        argv = list(sys.argv[1:] if args is None else args)
        configs = config_files(argv)
        defaults = [str(p) for p in default_files(configs[0])] if configs else []
        stage_classes()  # importable by their short names
        if kwargs.get("run", True):
            parser_kwargs: dict[str, Any] = {
                verb: {
                    "default_config_files": defaults,
                    "description": help_description(verb),
                    "usage": f"meta-vqa {verb} -c CONFIG.yaml [--KEY VALUE ...] [--print_config] [-h]",
                }
                for verb in VERBS
            }
        else:  # no subcommands: one parser
            parser_kwargs = {"default_config_files": defaults}
        super().__init__(
            LightningModule,
            MetaVQADataModule,
            subclass_mode_model=True,
            args=args,
            parser_kwargs=parser_kwargs,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"inference_mode": False},
            auto_configure_optimizers=False,
            **kwargs,
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # every (sub)parser: omegaconf interpolation in YAML, errors raised so main() prints one line
        kwargs.setdefault("parser_mode", "omegaconf")
        kwargs.setdefault("prog", "meta-vqa")
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # remember which model arguments were typed on the command line (see _parse_ckpt_path)
        argv = sys.argv[1:] if args is None else args if isinstance(args, list) else []
        self._cli_model_keys = {m.group(1) for a in argv if (m := _MODEL_ARG.match(str(a)))}
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path``: checked (see :meth:`_check_ckpt_path`), then its hyper-parameters replace the
        config file's model arguments, but not those given explicitly on the command line (e.g.
        ``--model.init_args.results_dir``)."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt = self._check_ckpt_path(sub)
        if ckpt is None:
            return
        keys = getattr(self, "_cli_model_keys", set())
        init = self.config[sub].model.get("init_args")
        kept = {k: init[k] for k in keys if init is not None and k in init}
        # as LightningCLI._parse_ckpt_path, from the checkpoint already read (weights_only=True)
        hparams = dict(ckpt["hyper_parameters"])
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        if kept:
            init = self.config[sub].model.init_args
            for k, v in kept.items():
                init[k] = v

    def _check_ckpt_path(self, sub: str) -> dict | None:
        """Read ``--ckpt_path`` (a path or ``file://`` URL) with ``weights_only=True`` and check it is a
        checkpoint of the configured stage, with the training state where ``fit`` resumes from it. Keeps the
        shapes of its weights for :meth:`after_instantiate_classes`; returns the checkpoint."""
        cfg = self.config[sub]
        if cfg.get("weights_only") is False:
            raise ConfigError("--weights_only: checkpoints are only ever read with weights_only=True")
        value = cfg.get("ckpt_path")
        writer = any(getattr(cb, "class_path", None) == _WRITER for cb in cfg.trainer.get("callbacks") or [])
        if sub == "predict" and writer and not value:
            raise ConfigError("--ckpt_path: the adaptation dataset is made from a trained HNet checkpoint")
        if not value:
            return None
        path, ckpt = read_checkpoint(value, "--ckpt_path")
        model = cfg.get("model")
        expected = getattr(model, "class_path", None) if model is not None else None
        check_stage(path, ckpt, [expected] if expected else [], "--ckpt_path")
        if sub == "fit":
            missing = [k for k in ("loops", "optimizer_states") if k not in ckpt]
            if missing:
                raise DataError(
                    f"{path}: holds no training state ({missing[0]!r}) to resume from (--ckpt_path); "
                    "start a new run, or give the stage's last.ckpt"
                )
        cfg.ckpt_path = str(path)
        self._ckpt = (path, {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()})
        return ckpt

    def after_instantiate_classes(self) -> None:
        # the strict load of --ckpt_path would fail only once the run has started (logger, config.yaml)
        super().after_instantiate_classes()
        if getattr(self, "_ckpt", None) is not None:
            check_weights(*self._ckpt, self.model, "--ckpt_path")

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        kwargs["weights_only"] = True  # whatever torch's default or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says
        if subcommand in ("validate", "test"):
            kwargs["verbose"] = False  # the stages print their own results table (finish_test)
        return kwargs

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        # what every stage gets whatever its YAML's callback list holds: the one-line progress display
        # (unless the progress bar is off or another one is configured) and, when training with a logger,
        # the learning rates in TensorBoard
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        callbacks = list(callbacks)
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in given
        ):
            callbacks.append(StageProgress())
        logged = config.get("logger") is not False
        if self.subcommand == "fit" and logged and not any(isinstance(c, LearningRateMonitor) for c in given):
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        return super()._instantiate_trainer(config, callbacks)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # sizes that follow from the dataset are linked, never typed twice in YAML
        parser.link_arguments("data.feature_dim", "model.init_args.feature_dim", apply_on="instantiate")
        parser.link_arguments("data.question_dim", "model.init_args.question_dim", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.add_lightning_class_args(StopOnNonFinite, "stop_on_non_finite")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="after `fit`, run `test` on the best checkpoint (or the last weights)",
        )
        parser.add_argument(
            "--stage_dir",
            type=str | None,
            default=None,
            help="write this stage's checkpoints, results.json/.md and (predict) adaptation dataset here",
        )
        parser.add_argument("--log_dir", type=str | None, default=None, help="TensorBoard folder of the run")
        parser.add_argument("--log_name", type=str | None, default=None, help="TensorBoard run name")

    def before_instantiate_classes(self) -> None:
        """Apply ``--stage_dir``, ``--log_dir`` and ``--log_name`` to the parts that write files."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.trainer
        check_trainer_precision(trainer.get("precision"), trainer.get("accelerator"))
        logger = trainer.get("logger")
        if logger not in (None, False, True) and hasattr(logger, "init_args"):
            if cfg.get("log_dir") and "save_dir" in logger.init_args:
                logger.init_args.save_dir = cfg.log_dir
            if cfg.get("log_name") and "name" in logger.init_args:
                logger.init_args.name = cfg.log_name
        out = cfg.get("stage_dir")
        if not out:
            return
        # what is set explicitly (--checkpoint.dirpath, the writer's out) wins; results_dir may come from a
        # --ckpt_path's hyper-parameters, so only one typed on the command line does
        if cfg.checkpoint.get("dirpath") is None:
            cfg.checkpoint.dirpath = out
        if trainer.get("default_root_dir") is None:
            trainer.default_root_dir = out
        for cb in trainer.get("callbacks") or []:
            if getattr(cb, "class_path", None) == _WRITER and cb.init_args.get("out") is None:
                cb.init_args.out = out
        init = cfg.model.get("init_args")
        if init is not None and "results_dir" in init and "results_dir" not in self._cli_model_keys:
            init.results_dir = out

    def before_fit(self) -> None:
        # fail before the logger or a checkpoint folder is created
        if not any(p.requires_grad for p in self.model.parameters()):
            name = getattr(self.model, "variant", type(self.model).__name__)
            raise ConfigError(
                f"model: {name!r} has no trainable parameters; evaluate it with `meta-vqa test`"
            )
        if getattr(self.datamodule, "adaptation", None) is not None:
            _ = self.datamodule.adaptation_data  # read and checked now, not once the run's folder exists
        if self.trainer.world_size > 1:  # DDP draws what one process would (see the callback)
            self.trainer.callbacks.append(RandomStateAfterConstruction())

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        ckpt = "best" if getattr(self.trainer.checkpoint_callback, "best_model_path", "") else None
        self.trainer.test(
            self.model, datamodule=self.datamodule, ckpt_path=ckpt, weights_only=True, verbose=False
        )


def run_stage(argv: list[str]) -> int:
    """Run one ``fit|validate|test|predict`` command (``argv`` starts with the verb).

    Returns 0, or the exit code of ``--help``/``--print_config``; bad arguments and bad input raise one
    :class:`MetaVQAError` naming the key, file or task.
    """
    from jsonargparse import ArgumentError

    quiet()
    configs = config_files(argv)
    for path in [*(default_files(configs[0]) if configs else []), *configs]:
        if path.is_file():
            check_yaml(path)  # jsonargparse reports a YAML error without the file's name
    try:
        MetaVQACLI(args=list(argv))
    except ArgumentError as e:
        raise ConfigError(_compact_argument_error(str(e))) from None
    except SystemExit as e:  # --help, --print_config
        return e.code if isinstance(e.code, int) else 0
    except ValueError as e:
        # jsonargparse wraps what a model's __init__ raises (e.g. a missing upstream checkpoint)
        cause = _user_error_cause(e)
        if cause is None:
            raise
        raise cause from None
    return 0


def _user_error_cause(e: BaseException) -> MetaVQAError | None:
    """The first :class:`MetaVQAError` in an exception's cause/context chain, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, MetaVQAError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _compact_argument_error(msg: str) -> str:
    """One line from jsonargparse's nested report: the full key (``model.variant``) and the cause."""
    structural = (
        "Does not validate",
        "Subtypes:",
        "Errors:",
        "- Problem with given class_path",
        "Given value",
    )
    stack: list[tuple[int, str]] = []
    for line in msg.splitlines():
        text = line.strip()
        if not text:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        m = re.match(r'(?:- )?Parser key "([^"]+)":?\s*(.*)', text)
        if m:
            stack.append((indent, m.group(1)))
            if m.group(2):
                return f"{'.'.join(k for _, k in stack)}: {m.group(2)}"
            continue
        if stack and not text.startswith(structural) and "NoneType" not in text:
            return f"{'.'.join(k for _, k in stack)}: {text.lstrip('- ')}"
    return msg.strip().splitlines()[0] if msg.strip() else msg
