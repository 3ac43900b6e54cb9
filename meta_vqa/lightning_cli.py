"""LightningCLI wiring: omegaconf configs, data→model size links, test right after fit."""

from __future__ import annotations

import re
import sys
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from meta_vqa.data.datamodule import MetaVQADataModule
from meta_vqa.errors import ConfigError

_MODEL_ARG = re.compile(r"--model\.(?:init_args\.)?([A-Za-z_]\w*)(?:=|$)")


class MetaVQACLI(LightningCLI):
    """``meta-vqa fit|validate|test|predict``: any stage (``model.class_path``) over the one DataModule."""

    def __init__(self, args: list[str] | None = None, **kwargs: Any):
        super().__init__(
            LightningModule,
            MetaVQADataModule,
            subclass_mode_model=True,
            args=args,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"inference_mode": False},
            auto_configure_optimizers=False,
            **kwargs,
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # every (sub)parser: omegaconf interpolation in YAML, errors raised so main() prints one line
        kwargs.setdefault("parser_mode", "omegaconf")
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # remember which model arguments were typed on the command line (see _parse_ckpt_path)
        argv = sys.argv[1:] if args is None else args if isinstance(args, list) else []
        self._cli_model_keys = {m.group(1) for a in argv if (m := _MODEL_ARG.match(str(a)))}
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path``: the checkpoint's hyperparameters replace the config file's, but not the
        model arguments given explicitly on the command line (e.g. ``--model.init_args.results_dir``)."""
        sub = self.config.get("subcommand")
        keys = getattr(self, "_cli_model_keys", set())
        init = self.config[sub].model.get("init_args") if sub else None
        kept = {k: init[k] for k in keys if init is not None and k in init}
        super()._parse_ckpt_path()
        if kept:
            init = self.config[sub].model.init_args
            for k, v in kept.items():
                init[k] = v

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # sizes that follow from the dataset are linked, never typed twice in YAML
        parser.link_arguments("data.feature_dim", "model.init_args.feature_dim", apply_on="instantiate")
        parser.link_arguments("data.question_dim", "model.init_args.question_dim", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="after `fit`, run `test` on the best checkpoint (or the last weights)",
        )

    def before_fit(self) -> None:
        # fail before the logger or a checkpoint folder is created
        if not any(p.requires_grad for p in self.model.parameters()):
            name = getattr(self.model, "variant", type(self.model).__name__)
            raise ConfigError(
                f"model: {name!r} has no trainable parameters; evaluate it with `meta-vqa test`"
            )

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        ckpt = "best" if getattr(self.trainer.checkpoint_callback, "best_model_path", "") else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt, weights_only=True)
