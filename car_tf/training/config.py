"""The configuration of a training run: typed dataclasses, one per concern, with defaults.

Field names are the command-line flags of ``python -m car_tf.train`` (README, "Training"), so a
run's record (``flags.txt``) is written from the configuration itself and can be rerun as a
flagfile. A method's own settings live with the method (``car_tf/<method>/method.py``); the
configuration holds them under ``methods`` by method name.
"""

import dataclasses

from car_tf.data import longtail, sampling
from car_tf.losses.registry import ALIASES, BASE_LOSSES


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Where the run lives and how it executes."""

    model_dir: str
    seed: int = 0
    deterministic: bool = False
    strategy: str = "auto"
    mixed_precision: str = "none"
    jit_compile: bool = False
    eval_on_train: bool = False
    verbose: bool = True
    overwrite: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The data set and its pipeline (car_tf.data.loading.load_datasets)."""

    dataset: str = "cifar10"
    data_dir: str | None = None
    train_list: str | None = None
    test_list: str | None = None
    imbalance_factor: float | None = None
    lt_profile: str = "exp"
    image_size: int = 0
    data_recipe: str = "auto"
    skip_corrupt: bool = False
    randaugment: bool = False
    validation_fraction: float | None = None
    sampler: str = "instance"  # car_tf.data.sampling.SAMPLERS: which training samples an epoch draws
    # Groups of the per-class report: many > many_threshold training images, few < few_threshold.
    many_threshold: int = longtail.MANY_ABOVE
    few_threshold: int = longtail.FEW_BELOW

    def __post_init__(self):
        if self.validation_fraction is not None and not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                f"--validation_fraction={self.validation_fraction} must lie strictly between 0 and 1 "
                "(0.2 holds out a fifth of each class); leave it unset to evaluate on the test split."
            )
        if self.sampler not in sampling.SAMPLERS:
            raise ValueError(f"--sampler={self.sampler!r} is not known; use one of {', '.join(sampling.SAMPLERS)}.")
        longtail.check_group_thresholds(self.many_threshold, self.few_threshold)

    def group_thresholds(self):
        """{"many_threshold", "few_threshold"}: the keyword arguments of the per-class report's groups."""
        return {"many_threshold": self.many_threshold, "few_threshold": self.few_threshold}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The backbone, its head and the weights it starts from (car_tf.models.create_model)."""

    model: str = "resnet32"
    head: str = "linear"
    cosine_scale: float = 30.0
    patch_size: int = 0
    pretrained: str | None = None
    frozen_backbone: bool = False
    unfreeze_from: str | None = None
    lora_rank: int = 0  # 0: off; r: LoRA adapters of rank r on the backbone's Dense/EinsumDense layers

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

    epochs: int = 200
    batch_size: int = 128
    # The optimizer updates once per N batches with their mean gradient: an effective batch of
    # N * batch_size on the memory of one batch (README, "Gradient accumulation").
    gradient_accumulation_steps: int = 1
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    lr_schedule: str = "step"
    warmup_epochs: int = 5
    lr_decay_epochs: tuple = (160, 180)
    lr_decay_factor: float = 0.1
    freeze_backbone_epochs: int = 0
    backbone_lr_multiplier: float = 1.0

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

    base_loss: str = "ce"
    la_tau: float = 1.0
    ldam_max_margin: float = 0.5
    ldam_scale: float = 30.0

    def __post_init__(self):
        name = ALIASES.get(self.base_loss, self.base_loss)
        if name not in BASE_LOSSES:
            raise ValueError(f"--base_loss={self.base_loss!r} is not known; use one of {', '.join(BASE_LOSSES)}.")
        object.__setattr__(self, "base_loss", name)

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
    "decoupled" (alias "decoupled_reg"); ``concutmix`` adds the ConCutMix stage to any of them."""

    method: str = "ce"
    concutmix: bool = False

    def __post_init__(self):
        object.__setattr__(self, "method", ALIASES.get(self.method, self.method))


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


def section_from(cls, values):
    """``cls`` built from the attributes of ``values`` named like its fields (absl FLAGS, say)."""
    fields = {f.name: getattr(values, f.name) for f in dataclasses.fields(cls) if hasattr(values, f.name)}
    return cls(**fields)
