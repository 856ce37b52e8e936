"""The configuration of a training run: typed dataclasses, one per concern, with defaults.

Every setting is written once, here: a field's name is its command-line flag of
``python -m car_tf.train`` (README, "Training"), its default the flag's default, and its metadata
the flag's help text and bounds (``setting``; car_tf.flags_from_config makes the flags). A run's
record (``flags.txt``) is written from the configuration itself and can be rerun as a flagfile.
A method's own settings live with the method (``car_tf/<method>/method.py``); the configuration
holds them under ``settings`` by method name.

``choices`` in a field's metadata names the registry its values come from (read where the flag is
defined): "datasets", "data_recipes", "lt_profiles", "samplers", "strategies", "schedules",
"base_losses" (with their former names) and "methods" (the base losses, the registered methods and
the former names).
"""

import dataclasses
from typing import Literal

from car_tf.data.config import DataConfig
from car_tf.losses.registry import BASE_LOSSES
from car_tf.method import setting


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Where the run lives and how it executes."""

    model_dir: str = setting(help="Run directory: flags, checkpoints, logs, final model and report.")
    seed: int = setting(0, help="Seed of weights, data order and augmentation.")
    deterministic: bool = setting(False, help="Use deterministic TensorFlow ops (slower on GPU; exact resumes).")
    strategy: str = setting("auto", choices="strategies", help="Distribution strategy (auto: all visible GPUs).")
    mixed_precision: Literal["none", "mixed_float16", "mixed_bfloat16"] = setting("none", help="Keras dtype policy.")
    jit_compile: bool = setting(False, help="Compile the train step with XLA (can help on GPUs; slow to compile).")
    eval_on_train: bool = setting(False, help="Also report per-class accuracy on the training set at the end.")
    verbose: bool = setting(
        True, help="Print metrics: a progress bar within each epoch on a terminal, one line per epoch in logs and pipes.")
    overwrite: bool = setting(False, help="Delete an existing run in --model_dir and start over.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The backbone, its head and the weights it starts from (car_tf.models.create_model)."""

    model: str = setting("resnet32", help="Backbone name (car_tf.models.list_models()).")
    head: Literal["linear", "cosine"] = setting("linear", help="Classifier head.")
    cosine_scale: float = setting(30.0, help="Scale s of the cosine head.")
    patch_size: int = setting(0, help="ViT patch size (0: the model's default of 16).")
    pretrained: str | None = setting(
        None,
        help="Weights to fine-tune from: a .weights.h5 file of the same --model; with --model=keras_hub a "
        "keras-hub preset name (resnet_50_imagenet, vit_base_patch16_224_imagenet, ...) or local preset "
        "folder; with --model=keras_resnet50 'imagenet' or keras.applications' weights file; with "
        "--model=efficientnet_lite0 'imagenet' (packaged, offline).",
    )
    frozen_backbone: bool = setting(
        False,
        help="Keep the backbone frozen for the whole run: its features are computed once (cached under "
        "$CAR_TF_CACHE_DIR/features, reused by later runs on the same weights and data) and only the "
        "head trains on them, without augmentation. model.keras is still the whole images-to-logits network.",
    )
    unfreeze_from: str | None = setting(
        None,
        help="Partial fine-tuning: train only the layers from this layer of the model (a top-level layer name, "
        "e.g. stage7_block1_expand_conv of efficientnet_lite0) to the head; the layers before it stay "
        "frozen, their batch norms in inference mode.",
    )
    # 0: off; r: LoRA adapters of rank r on the backbone's Dense/EinsumDense layers
    lora_rank: int = setting(
        0,
        help="LoRA (Hu et al., ICLR 2022) of this rank on the backbone's Dense/EinsumDense layers (vit_s16, vit_b16: "
        "all of them; --model=keras_hub: its attention query and value layers): only the adapters and the head "
        "train. 0: off. model.keras loads as the merged network; python -m export writes it as a plain one.",
    )

    def __post_init__(self):
        if not self.lora_rank >= 0:
            raise ValueError(f"--lora_rank={self.lora_rank} must be at least 0 (0 turns LoRA off; 8 is usual).")
        clashing = [f"--{name}" for name, on in [
            ("frozen_backbone", self.frozen_backbone), ("unfreeze_from", self.unfreeze_from)] if on]
        if self.lora_rank and clashing:
            raise ValueError(f"--lora_rank={self.lora_rank} itself chooses what trains (the backbone's adapters "
                             f"and the head), so it cannot be combined with {' or '.join(clashing)}; drop one of them.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Optimizer, learning-rate schedule and fine-tuning controls."""

    epochs: int = setting(200, help="Training epochs.")
    batch_size: int = setting(128, help="Global batch size (split across replicas).")
    # The optimizer updates once per N batches with their mean gradient: an effective batch of
    # N * batch_size on the memory of one batch (README, "Gradient accumulation").
    gradient_accumulation_steps: int = setting(
        1,
        help="Update the weights once per N batches with their mean gradient: an effective batch of N x --batch_size "
        "(a multi-GPU recipe's batch on one GPU; --lr is the effective batch's). Batch norm and CAR's EMA still "
        "update every batch; the learning-rate schedule still counts epochs.",
    )
    optimizer: Literal["sgd", "adamw"] = setting("sgd", help="Optimizer.")
    lr: float = setting(0.1, help="Peak learning rate.")
    momentum: float = setting(0.9, help="SGD momentum.")
    weight_decay: float = setting(2e-4, help="Weight decay (Keras applies it decoupled, as AdamW does).")
    lr_schedule: str = setting("step", choices="schedules", help="Learning-rate schedule after warm-up.")
    warmup_epochs: int = setting(5, help="Epochs of linear learning-rate warm-up.")
    # A list flag: the strings it holds become whole epochs in __post_init__ (or a sentence saying why not).
    lr_decay_epochs: tuple[int, ...] = setting((160, 180), help="Epochs at which a step schedule decays.")
    lr_decay_factor: float = setting(0.1, help="Step-decay multiplier (the LDAM code uses 0.01).")
    freeze_backbone_epochs: int = setting(
        0, lower_bound=0,
        help="Epochs at the start during which the backbone does not move (a linear probe), then full fine-tuning.",
    )
    backbone_lr_multiplier: float = setting(
        1.0, lower_bound=0.0,
        help="The backbone's learning rate (and weight decay) relative to the head's, e.g. 0.1 for fine-tuning.",
    )

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(
                f"--epochs={self.epochs} and --batch_size={self.batch_size} must both be at least 1."
            )
        if not self.gradient_accumulation_steps >= 1:
            raise ValueError(
                f"--gradient_accumulation_steps={self.gradient_accumulation_steps} must be at least 1 (1 updates "
                "the weights after every batch, N after every N batches: an effective batch of N x --batch_size)."
            )
        if self.warmup_epochs < 0 or self.freeze_backbone_epochs < 0 or self.backbone_lr_multiplier < 0:
            raise ValueError(
                "--warmup_epochs, --freeze_backbone_epochs and --backbone_lr_multiplier must not be "
                "negative."
            )
        # A wrong sign trains the wrong way (gradient ascent, weights pushed up) and still exits 0.
        if not self.lr > 0:
            raise ValueError(f"--lr={self.lr} must be above 0 (0.1 for SGD at batch 128, 1e-3 for AdamW).")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum={self.momentum} must lie in [0, 1) (0.9 is usual; 0 turns it off).")
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight_decay={self.weight_decay} must not be negative (0 turns it off).")
        if not self.lr_decay_factor > 0:
            raise ValueError(
                f"--lr_decay_factor={self.lr_decay_factor} must be above 0 (0.1 divides the rate by 10 at "
                "each of --lr_decay_epochs)."
            )
        try:
            epochs = tuple(int(e) for e in self.lr_decay_epochs)
        except (TypeError, ValueError):
            raise ValueError(
                f"--lr_decay_epochs={','.join(str(e) for e in self.lr_decay_epochs)} must be whole epoch "
                "numbers separated by commas, e.g. --lr_decay_epochs=160,180."
            ) from None
        object.__setattr__(self, "lr_decay_epochs", epochs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BaseLossConfig:
    """The base loss and its options (car_tf.losses)."""

    base_loss: str = setting("ce", choices="base_losses", help="Base loss under CAR (--method=car).")
    la_tau: float = setting(1.0, help="tau of logit adjustment (logits + tau log prior).")
    ldam_max_margin: float = setting(0.5, help="Largest LDAM margin.")
    ldam_scale: float = setting(30.0, help="LDAM logit scale.")

    def __post_init__(self):
        if self.base_loss not in BASE_LOSSES:
            raise ValueError(f"--base_loss={self.base_loss!r} is not known; use one of {', '.join(BASE_LOSSES)}.")

    def options(self, cosine_scale):
        """Keyword options of the base loss (the decoupled loss takes its margin from its method)."""
        return {
            "ldam_drw": {"max_margin": self.ldam_max_margin, "scale": self.ldam_scale},
            "logit_adjusted": {"tau": self.la_tau},
            "decoupled": {"scale": cosine_scale},
        }.get(self.base_loss, {})


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodChoice:
    """Which method trains: a base loss name, or "car" (CAR on --base_loss), "concutmix" or
    "decoupled"; ``concutmix`` adds the ConCutMix stage to any of them."""

    method: str = setting(
        "ce", choices="methods",
        help="Training method: a base loss, car (CARLoss on --base_loss), concutmix or decoupled.",
    )
    concutmix: bool = setting(False, help="Add the ConCutMix stage to the method (implied by --method=concutmix).")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything ``car_tf.training.trainer.train`` needs.

    ``settings`` maps every registered method's name (car_tf.training.methods) to its
    configuration dataclass (default: each method's defaults); ``choice`` says which of them the
    run uses. For example, CAR on logit adjustment over a folder of images::

        config = TrainConfig(
            run=RunConfig(model_dir="runs/mine"),
            data=DataConfig(dataset="folder", data_dir="my_images"),
            loss=BaseLossConfig(base_loss="logit_adjusted"),
            choice=MethodChoice(method="car"),
        )
        report = car_tf.training.trainer.train(config)
    """

    run: RunConfig
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    loss: BaseLossConfig = BaseLossConfig()
    choice: MethodChoice = MethodChoice()
    settings: dict = dataclasses.field(default_factory=lambda: _default_settings())

    def sections(self):
        """The configuration's dataclasses: its own sections, then the methods' settings."""
        return [self.run, self.data, self.model, self.optimizer, self.loss, self.choice, *self.settings.values()]

    def flag_values(self):
        """{field name: "--name=value"} over every section: the run's record, a flagfile's lines."""
        return {
            field.name: serialized
            for section in self.sections()
            for field in dataclasses.fields(section)
            if (serialized := _flag(field.name, getattr(section, field.name))) is not None
        }


def _default_settings():
    from car_tf.training.methods import default_settings

    return default_settings()


def _flag(name, value):
    if value is None:
        return None
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if isinstance(value, (tuple, list)):
        return f"--{name}={','.join(str(v) for v in value)}"
    return f"--{name}={value}"


# The run's own sections: TrainConfig's field -> its dataclass (the methods' settings come from
# car_tf.training.methods.settings_classes()).
SECTIONS = {
    "run": RunConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "loss": BaseLossConfig,
    "choice": MethodChoice,
}
