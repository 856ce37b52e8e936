"""Every setting is written once, as a dataclass field: train's flags are made from the fields,
the configuration is built from the flags by field name, and what users type still parses."""

import dataclasses
import typing

import pytest
from absl import flags

from car_tf import flags_from_config
from car_tf import train as train_cli
from car_tf.car.method import CARSettings
from car_tf.concutmix.method import ConCutMixSettings
from car_tf.data import flags as data_flags
from car_tf.data import loading
from car_tf.decoupled.method import DecoupledSettings
from car_tf.training import config as run_config
from car_tf.training import methods, trainer
from car_tf.method import Method, setting

# Train's flags before they were made from the fields: name -> (kind, default, choices, lower bound).
FLAGS_USERS_TYPE = {
    "arc_margin": ("float", 0.2, None, None),
    "backbone_lr_multiplier": ("float", 1.0, None, 0.0),
    "base_loss": ("enum", 'ce', ('ce', 'ldam_drw', 'logit_adjusted', 'balanced_softmax', 'decoupled'), None),
    "batch_size": ("int", 128, None, None),
    "ccm_alpha": ("float", 2.0, None, None),
    "ccm_beta": ("float", 0.6, None, None),
    "ccm_cutmix_prob": ("float", 0.5, None, None),
    "ccm_l_d_warm": ("int", 100, None, None),
    "ccm_omega": ("float", 0.0784313725490196, None, None),
    "ccm_projection_dim": ("int", 128, None, None),
    "ccm_temperature": ("float", 0.1, None, None),
    "ccm_top_k": ("int", 30, None, None),
    "concutmix": ("bool", False, None, None),
    "cosine_scale": ("float", 30.0, None, None),
    "data_dir": ("str", None, None, None),
    "data_recipe": ("enum", 'auto', ('auto', 'cifar', 'imagenet'), None),
    "dataset": ("enum", 'cifar10', ('cifar10', 'cifar100', 'imagenet_lt', 'places_lt', 'inat2018', 'folder', 'list'), None),
    "deterministic": ("bool", False, None, None),
    "epochs": ("int", 200, None, None),
    "eval_on_train": ("bool", False, None, None),
    "feature_norm": ("enum", 'hinge', ('hinge', 'ring'), None),
    "feature_norm_weight": ("float", 0.01, None, None),
    "few_threshold": ("int", 20, None, 0),
    "freeze_backbone_epochs": ("int", 0, None, 0),
    "frozen_backbone": ("bool", False, None, None),
    "gradient_accumulation_steps": ("int", 1, None, None),
    "head": ("enum", 'linear', ('linear', 'cosine'), None),
    "image_size": ("int", 0, None, 0),
    "imbalance_factor": ("float", None, None, 1.0),
    "jit_compile": ("bool", False, None, None),
    "la_tau": ("float", 1.0, None, None),
    "lambda_warmup_epochs": ("int", 0, None, None),
    "ldam_max_margin": ("float", 0.5, None, None),
    "ldam_scale": ("float", 30.0, None, None),
    "lora_rank": ("int", 0, None, None),
    "lr": ("float", 0.1, None, None),
    "lr_decay_epochs": ("list", ['160', '180'], None, None),
    "lr_decay_factor": ("float", 0.1, None, None),
    "lr_schedule": ("enum", 'step', ('step', 'cosine', 'constant'), None),
    "lt_profile": ("enum", 'exp', ('exp', 'step'), None),
    "many_threshold": ("int", 100, None, 0),
    "method": ("enum", 'ce', ('ce', 'ldam_drw', 'logit_adjusted', 'balanced_softmax', 'decoupled', 'car', 'concutmix'), None),
    "mixed_precision": ("enum", 'none', ('none', 'mixed_float16', 'mixed_bfloat16'), None),
    "model": ("str", 'resnet32', None, None),
    "model_dir": ("str", None, None, None),
    "momentum": ("float", 0.9, None, None),
    "optimizer": ("enum", 'sgd', ('sgd', 'adamw'), None),
    "overwrite": ("bool", False, None, None),
    "patch_size": ("int", 0, None, None),
    "power_iterations": ("int", 20, None, None),
    "power_tolerance": ("float", 3e-06, None, None),
    "pretrained": ("str", None, None, None),
    "randaugment": ("bool", False, None, None),
    "sampler": ("enum", 'instance', ('instance', 'class_balanced', 'square_root', 'progressive'), None),
    "seed": ("int", 0, None, None),
    "skip_corrupt": ("bool", False, None, None),
    "spec_beta": ("float", 0.9, None, None),
    "spec_count_weights": ("bool", False, None, None),
    "spec_differentiable_gate": ("bool", False, None, None),
    "spec_ema_init": ("enum", 'first_batch', ('first_batch', 'zeros'), None),
    "spec_lambda": ("float", 0.3, None, None),
    "spec_margin": ("float", 0.0, None, None),
    "spec_r0": ("float", 0.2, None, None),
    "spec_sparse_ema_entries": ("int", None, None, None),
    "spec_temp": ("float", 1.0, None, None),
    "spectral_method": ("enum", 'auto', ('auto', 'svd', 'power'), None),
    "strategy": ("enum", 'auto', ('auto', 'mirrored', 'multi_worker', 'one_device'), None),
    "target_norm": ("float", 10.0, None, None),
    "test_list": ("str", None, None, None),
    "train_list": ("str", None, None, None),
    "unfreeze_from": ("str", None, None, None),
    "uniformity": ("enum", 'mhe', ('mhe', 'gaussian'), None),
    "uniformity_weight": ("float", 0.1, None, None),
    "validation_fraction": ("float", None, None, None),
    "verbose": ("bool", True, None, None),
    "warmup_epochs": ("int", 5, None, None),
    "weight_decay": ("float", 0.0002, None, None),
}

# A flags.txt as car_tf.train wrote it before the flags were made from the fields (every setting
# away from its default; --overwrite is never recorded).
RECORD_BEFORE = """\
--arc_margin=0.3
--backbone_lr_multiplier=0.1
--base_loss=decoupled
--batch_size=256
--ccm_alpha=1.0
--ccm_beta=0.5
--ccm_cutmix_prob=0.3
--ccm_l_d_warm=50
--ccm_omega=0.1
--ccm_projection_dim=64
--ccm_temperature=0.2
--ccm_top_k=10
--concutmix
--cosine_scale=16.0
--data_dir=data/mine
--data_recipe=imagenet
--dataset=folder
--deterministic
--epochs=90
--eval_on_train
--feature_norm=ring
--feature_norm_weight=0.02
--few_threshold=10
--freeze_backbone_epochs=2
--nofrozen_backbone
--gradient_accumulation_steps=2
--head=cosine
--image_size=48
--imbalance_factor=50.0
--jit_compile
--la_tau=1.5
--lambda_warmup_epochs=5
--ldam_max_margin=0.4
--ldam_scale=20.0
--lora_rank=0
--lr=0.001
--lr_decay_epochs=30,60,80
--lr_decay_factor=0.2
--lr_schedule=cosine
--lt_profile=step
--many_threshold=80
--method=car
--mixed_precision=mixed_bfloat16
--model=vit_s16
--model_dir=runs/record
--momentum=0.8
--optimizer=adamw
--patch_size=8
--power_iterations=10
--power_tolerance=1e-05
--pretrained=w.weights.h5
--randaugment
--sampler=square_root
--seed=3
--skip_corrupt
--spec_beta=0.5
--spec_count_weights
--spec_differentiable_gate
--spec_ema_init=zeros
--spec_lambda=1.0
--spec_margin=0.05
--spec_r0=0.1
--spec_sparse_ema_entries=4
--spec_temp=2.0
--spectral_method=power
--strategy=mirrored
--target_norm=12.0
--test_list=test.txt
--train_list=train.txt
--unfreeze_from=block3
--uniformity=gaussian
--uniformity_weight=0.2
--validation_fraction=0.25
--noverbose
--warmup_epochs=3
--weight_decay=0.05
"""


# The flags of the post-hoc and comparison commands before they were made from the fields:
# command -> name -> (kind, default, choices, lower bound).
COMMAND_FLAGS_USERS_TYPE = {
    "car_tf.evaluate": {
        "model": ("str", None, None, None),
        "train_counts": ("str", None, None, None),
        "on_train": ("bool", False, None, None),
        "output_dir": ("str", None, None, None),
        "batch_size": ("int", 128, None, None),
    },
    "export": {
        "model_dir": ("str", None, None, None),
        "format": ("enum", "both", ("saved_model", "onnx", "both"), None),
        "opset": ("int", 17, None, None),
        "output_dir": ("str", None, None, None),
        "parity_images": ("str", None, None, None),
        "recipe": ("enum", None, ("cifar", "imagenet"), None),
        "top_k": ("int", 5, None, None),
        "atol": ("float", 0.0001, None, None),
    },
    "car_tf.dlsa": {
        "model_dir": ("str", None, None, None),
        "output_dir": ("str", None, None, None),
        "depth": ("int", 1, None, None),
        "keep_fraction": ("float", 0.3, None, None),
        "num_components": ("int", 500, None, None),
        "prior_stddev": ("float", 0.05, None, None),
        "flow_blocks": ("int", 2, None, None),
        "flow_epochs": ("int", 50, None, None),
        "flow_batch_size": ("int", 1024, None, None),
        "flow_learning_rate": ("float", 0.2, None, None),
        "flow_momentum": ("float", 0.0, None, None),
        "contrast_weight": ("float", 0.025, None, None),
        "balance_weight": ("float", 1.5, None, None),
        "balance_momentum": ("float", 0.7, None, None),
        "likelihood_weight_power": ("float", 2.0, None, None),
        "classifier_epochs": ("int", 150, None, None),
        "classifier_batch_size": ("int", 128, None, None),
        "classifier_learning_rate": ("float", 0.05, None, None),
        "classifier_momentum": ("float", 0.9, None, None),
        "classifier_weight_decay": ("float", 0.0005, None, None),
        "validation_fraction": ("float", 0.1, None, None),
        "seed": ("int", 0, None, None),
        "progress": ("bool", True, None, None),
    },
    "car_tf.rebalance": {
        "model_dir": ("str", None, None, None),
        "method": ("enum", None, ("crt", "tau_norm", "posthoc_la"), None),
        "output_dir": ("str", None, None, None),
        "validation_fraction": ("float", 0.2, None, 0.01),
        "crt_epochs": ("int", 10, None, 1),
        "crt_lr": ("float", 0.1, None, 1e-08),
        "batch_size": ("int", 128, None, 1),
        "seed": ("int", 0, None, None),
        "progress": ("bool", True, None, None),
    },
    "car_tf.compare": {
        "methods": ("list", ["ce", "car"], None, None),
        "seeds": ("list", ["0", "1", "2"], None, None),
        "output_dir": ("str", None, None, None),
        "method_flags": ("multi", [], None, None),
        "dlsa_flags": ("list", [], None, None),
    },
    "car_tf.search": {
        "vary": ("multi", [], None, None),
        "seeds": ("list", ["0"], None, None),
        "select_on": ("enum", "mean_class", ("mean_class", "worst3"), None),
        "baseline": ("enum", "ce", ("ce", "ldam_drw", "logit_adjusted", "balanced_softmax", "decoupled", "car", "car_ldam_drw", "car_logit_adjusted", "car_balanced_softmax", "car_decoupled", "car_concutmix"), None),
        "confirm_seeds": ("list", [], None, None),
        "output_dir": ("str", None, None, None),
    },
}


def _command_flags(command):
    """{name: flag} of ``command``'s flags, defined afresh from its dataclasses, without the data
    flags (DataConfig's, walked by the tests above), and the dataclasses they come from."""
    from car_tf import compare, rebalance, search
    from car_tf import evaluate as evaluate_cli
    from car_tf.dlsa import __main__ as dlsa_cli
    from car_tf.dlsa.fit import DLSAConfig
    from export import __main__ as export_cli

    module, classes = {
        "car_tf.evaluate": (evaluate_cli, (evaluate_cli.EvaluateCommand,)),
        "export": (export_cli, (export_cli.ExportConfig,)),
        "car_tf.dlsa": (dlsa_cli, (data_flags.PostHocRun, DLSAConfig)),
        "car_tf.rebalance": (rebalance, (data_flags.PostHocRun, rebalance.RebalanceConfig)),
        "car_tf.compare": (compare, (compare.CompareConfig,)),
        "car_tf.search": (search, (search.SearchConfig,)),
    }[command]
    values = flags.FlagValues()
    names = module.define_flags(values)
    own = {name: values[name] for name in values if name not in data_flags.DATA_FLAGS + data_flags.GROUP_FLAGS}
    return names, own, classes, values


@pytest.mark.parametrize("command", sorted(COMMAND_FLAGS_USERS_TYPE))
def test_every_commands_flags_are_its_fields_and_keep_the_names_users_type(command):
    names, own, classes, values = _command_flags(command)
    # One flag per field (nested sections' fields included), nothing else.
    assert sorted(names) == sorted(own) == sorted(flags_from_config.flag_names(*classes))
    kinds = {flags.BooleanParser: "bool", flags.IntegerParser: "int", flags.FloatParser: "float",
             flags.ArgumentParser: "str", flags.EnumParser: "enum", flags.ListParser: "list"}
    assert set(own) == set(COMMAND_FLAGS_USERS_TYPE[command])
    for name, (kind, default, choices, lower) in COMMAND_FLAGS_USERS_TYPE[command].items():
        flag = own[name]
        found = "multi" if isinstance(flag, flags.MultiFlag) else kinds[type(flag.parser)]
        assert (found, flag.default) == (kind, default), name
        assert tuple(getattr(flag.parser, "enum_values", None) or ()) == tuple(choices or ()), name
        if lower is not None:
            assert flag.parser.lower_bound == lower, name
    # The configuration is built from the flags: every default is the field's own.
    required = {name: own[name].parser.enum_values[0] if isinstance(own[name].parser, flags.EnumParser) else "x"
                for name in ("model_dir", "model", "method") if name in own}
    values(["prog", *(f"--{k}={v}" for k, v in required.items())])
    for cls in classes:
        built = flags_from_config.section_from_flags(cls, values)
        by_flag = {flags_from_config.flag_name(f): f.name for f in dataclasses.fields(cls)}
        assert built == cls(**{by_flag[k]: v for k, v in required.items() if k in by_flag})


def test_dlsa_flags_fill_the_nested_sections_and_share_one_seed():
    _, _, (command_cls, dlsa_cls), values = _command_flags("car_tf.dlsa")
    values(["prog", "--model_dir=runs/x", "--flow_epochs=7", "--classifier_learning_rate=0.01",
            "--contrast_weight=0.03", "--flow_blocks=3", "--seed=4"])
    config = flags_from_config.section_from_flags(dlsa_cls, values)
    assert (config.flow.epochs, config.flow.contrast_weight, config.classifier.learning_rate) == (7, 0.03, 0.01)
    assert (config.num_blocks, config.seed) == (3, 4)
    assert flags_from_config.section_from_flags(command_cls, values).model_dir == "runs/x"
    with pytest.raises(flags.IllegalFlagValueError):
        values(["prog", "--flow_epochs=0"])


def _record_config():
    """The configuration RECORD_BEFORE was written from."""
    c = run_config
    return c.TrainConfig(
        run=c.RunConfig(model_dir="runs/record", seed=3, deterministic=True, strategy="mirrored",
                        mixed_precision="mixed_bfloat16", jit_compile=True, eval_on_train=True, verbose=False),
        data=c.DataConfig(dataset="folder", data_dir="data/mine", train_list="train.txt", test_list="test.txt",
                          imbalance_factor=50.0, lt_profile="step", image_size=48, data_recipe="imagenet",
                          skip_corrupt=True, randaugment=True, validation_fraction=0.25, sampler="square_root",
                          many_threshold=80, few_threshold=10),
        model=c.ModelConfig(model="vit_s16", head="cosine", cosine_scale=16.0, patch_size=8, pretrained="w.weights.h5",
                            unfreeze_from="block3"),
        optimizer=c.OptimizerConfig(epochs=90, batch_size=256, gradient_accumulation_steps=2, optimizer="adamw",
                                    lr=0.001, momentum=0.8, weight_decay=0.05, lr_schedule="cosine", warmup_epochs=3,
                                    lr_decay_epochs=(30, 60, 80), lr_decay_factor=0.2, freeze_backbone_epochs=2,
                                    backbone_lr_multiplier=0.1),
        loss=c.BaseLossConfig(base_loss="decoupled", la_tau=1.5, ldam_max_margin=0.4, ldam_scale=20.0),
        choice=c.MethodChoice(method="car", concutmix=True),
        settings={
            "decoupled": DecoupledSettings(arc_margin=0.3, uniformity_weight=0.2, uniformity="gaussian",
                                           feature_norm_weight=0.02, target_norm=12.0, feature_norm="ring"),
            "car": CARSettings(spec_lambda=1.0, spec_beta=0.5, spec_r0=0.1, spec_temp=2.0, spec_margin=0.05,
                               spec_count_weights=True, spec_differentiable_gate=True, spec_ema_init="zeros",
                               spectral_method="power", power_iterations=10, power_tolerance=1e-5,
                               lambda_warmup_epochs=5, spec_sparse_ema_entries=4),
            "concutmix": ConCutMixSettings(ccm_alpha=1.0, ccm_beta=0.5, ccm_temperature=0.2, ccm_top_k=10,
                                           ccm_omega=0.1, ccm_l_d_warm=50, ccm_projection_dim=64, ccm_cutmix_prob=0.3),
        },
    )


def _train_flags(*argv):
    """Train's flags, made afresh from the dataclasses and parsed from ``argv``."""
    values = flags.FlagValues()
    train_cli.define_flags(values)
    values(["train", *argv])
    return values


def test_every_field_has_a_flag_and_every_flag_a_field():
    values = flags.FlagValues()
    names = train_cli.define_flags(values)
    sections = train_cli.sections()
    fields = {f.name: (cls, f) for cls in sections.values() for f in dataclasses.fields(cls)}
    assert set(sections) == {*run_config.SECTIONS, *methods.registry()}
    assert sorted(names) == sorted(fields) == sorted(values)  # one flag per field, nothing else
    assert len(names) == len(set(names))
    for name, (cls, field) in fields.items():
        flag = values[name]
        assert flag.help.endswith(field.metadata["help"]), name  # the help text is the field's (enums: after
        # absl's "<a|b>: ")
        default = None if field.default is dataclasses.MISSING else field.default
        assert flag.default == (list(map(str, default)) if isinstance(default, tuple) else default), name
    # The command itself: every flag car_tf.train files under its name is a field, and every field a flag.
    own = {flag.name for flag in flags.FLAGS.get_flags_for_module(train_cli.__name__)}
    assert own <= set(fields) and set(fields) <= set(flags.FLAGS)
    # The configuration is built from the flags by field name: every section, every field.
    values(["train", "--model_dir=runs/x", "--spec_lambda=0.7", "--nodeterministic", "--sampler=progressive"])
    config = train_cli.config_from_flags(values)
    for name, section in zip([*run_config.SECTIONS, "settings"], [*config.sections()[:6], config.settings]):
        if name == "settings":
            assert set(section) == set(methods.registry())
            continue
        assert type(section) is run_config.SECTIONS[name]
    built = {f.name: getattr(s, f.name) for s in config.sections() for f in dataclasses.fields(s)}
    assert sorted(built) == sorted(fields)
    assert (config.settings["car"].spec_lambda, config.data.sampler) == (0.7, "progressive")


def test_a_field_without_its_flag_or_a_flag_not_made_from_a_field_is_an_error():
    values = flags.FlagValues()
    data_flags.define_data_flags(values)  # the data flags alone: no --validation_fraction among them
    values(["prog"])
    with pytest.raises(ValueError, match=r"^--randaugment is not a flag made from DataConfig.randaugment; define "
                                         r"this command's flags with car_tf.flags_from_config.define_flags\(DataConfig\)\.$"):
        flags_from_config.section_from_flags(run_config.DataConfig, values)
    assert data_flags.data_config(values) == run_config.DataConfig()  # the data fields alone: fine
    hand_made = flags.FlagValues()
    flags.DEFINE_float("validation_fraction", 0.1, "A command's own flag.", flag_values=hand_made)
    hand_made(["prog"])
    with pytest.raises(ValueError, match=r"--validation_fraction is not a flag made from DataConfig"):
        flags_from_config.section_from_flags(run_config.DataConfig, hand_made, only=["validation_fraction"])
    with pytest.raises(ValueError, match=r"--validation_fraction is already a flag of .*rename the field"):
        flags_from_config.define_flags(run_config.DataConfig, flag_values=hand_made)


def test_the_flags_users_type_keep_their_names_defaults_and_values():
    values = flags.FlagValues()
    train_cli.define_flags(values)
    kinds = {flags.BooleanParser: "bool", flags.IntegerParser: "int", flags.FloatParser: "float",
             flags.ArgumentParser: "str", flags.EnumParser: "enum", flags.ListParser: "list"}
    for name, (kind, default, choices, lower) in FLAGS_USERS_TYPE.items():
        flag = values[name]
        assert kinds[type(flag.parser)] == kind and flag.default == default, name
        assert getattr(flag.parser, "enum_values", None) == (list(choices) if choices else None), name
        assert getattr(flag.parser, "lower_bound", None) == lower, name
    with pytest.raises(flags.IllegalFlagValueError):
        _train_flags("--image_size=-1")
    with pytest.raises(ValueError, match="--model_dir is required"):
        train_cli.config_from_flags(_train_flags())


def test_a_flags_txt_written_before_the_flags_were_generated_parses_back_equal(tmp_path):
    record = tmp_path / "flags.txt"
    record.write_text(RECORD_BEFORE)
    config = train_cli.config_from_flags(_train_flags(f"--flagfile={record}"))
    assert config == _record_config()
    written = {k: v for k, v in config.flag_values().items() if k != "overwrite"}
    assert "".join(f"{written[k]}\n" for k in sorted(written)) == RECORD_BEFORE  # and is written back alike


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Example:
    name: str = setting(help="A required string.")
    count: int = setting(3, lower_bound=1, help="A bounded integer.")
    scale: float | None = setting(None, help="An optional float.")
    form: typing.Literal["a", "b"] = setting("a", help="A Literal: an enum flag.")
    sampler: str = setting("instance", choices="samplers", help="A registry's values: an enum flag.")
    steps: tuple[int, ...] = setting((1, 2), help="A list flag.")
    on: bool = setting(True, help="A bool flag.")


def test_the_kinds_of_flag_fields_make():
    values = flags.FlagValues()
    assert flags_from_config.define_flags(_Example, flag_values=values) == [f.name for f in dataclasses.fields(_Example)]
    assert values["form"].parser.enum_values == ["a", "b"]
    assert values["sampler"].parser.enum_values == ["instance", "class_balanced", "square_root", "progressive"]
    assert values["steps"].default == ["1", "2"] and values["count"].parser.lower_bound == 1
    flags_from_config.define_flags(_Example, flag_values=values)  # again: a no-op
    values(["prog", "--name=x", "--scale=0.5", "--form=b", "--steps=4,5,6", "--noon"])
    example = flags_from_config.section_from_flags(_Example, values)
    assert example == _Example(name="x", scale=0.5, form="b", steps=("4", "5", "6"), on=False)
    values.unparse_flags()
    values(["prog"])
    with pytest.raises(ValueError, match=r"--name is required \(A required string\); give it\."):
        flags_from_config.section_from_flags(_Example, values)

    @dataclasses.dataclass
    class NoHelp:
        lost: int = 1

    @dataclasses.dataclass
    class Clashing:
        count: int = setting(1, help="Clashes with _Example.count.")

    with pytest.raises(TypeError, match="NoHelp.lost has no help text"):
        flags_from_config.define_flags(NoHelp, flag_values=flags.FlagValues())
    with pytest.raises(ValueError, match="--count would be a flag of both _Example and Clashing"):
        flags_from_config.define_flags(_Example, Clashing, flag_values=flags.FlagValues())


def test_load_datasets_takes_a_data_config_and_the_post_hoc_commands_build_one(tmp_path):
    values = flags.FlagValues()
    data_flags.define_data_flags(values)
    values(["prog", "--dataset=folder"])
    with pytest.raises(TypeError, match="load_datasets takes a DataConfig"):
        loading.load_datasets(values)
    (tmp_path / "flags.txt").write_text(RECORD_BEFORE)
    given = flags.FlagValues()
    data_flags.define_data_flags(given)
    given(["prog", "--image_size=64"])
    config = data_flags.base_run_data_flags(tmp_path, given)
    record = _record_config().data
    assert config == dataclasses.replace(run_config.DataConfig(), image_size=64, **{
        name: getattr(record, name) for name in data_flags.DATA_FLAGS if name != "image_size"})


class _Answering(Method):
    """A method answering every hook that composes, with ``answers``."""

    settings_class = CARSettings

    def __init__(self, name, head=None, options=None, metrics=None, hook=None, report=None):
        self.name, self.head, self.options = name, head, options or {}
        self.metrics, self.hook, self.entries = metrics, hook, report or {}

    def classifier_head(self, config):
        return self.head

    def base_loss_options(self, settings):
        return self.options

    def compile_metrics(self, settings):
        return self.metrics

    def batch_hook(self, settings, train, stream):
        return self.hook

    def report(self, settings, predictor, test_dataset, counts):
        return self.entries


def test_the_hooks_composition_rules_are_enforced_in_one_sentence():
    config = run_config.TrainConfig(run=run_config.RunConfig(model_dir="x"))
    settings = CARSettings()
    one, two = _Answering("one", head=("cosine", 16.0)), _Answering("two", head=("linear", 30.0))
    with pytest.raises(ValueError, match=r"^one needs a cosine head \(scale 16.0\) but two a linear head \(scale "
                                         r"30.0\), so they cannot train together; drop one of them\.$"):
        trainer.classifier_head(config, [(one, settings), (two, settings)], "ce")
    same = _Answering("same", head=("cosine", 16.0))
    assert trainer.classifier_head(config, [(one, settings), (same, settings)], "ce") == ("cosine", 16.0)
    pairs = [(_Answering("a", options={"tau": 1.0}), settings), (_Answering("b", options={"tau": 2.0}), settings)]
    with pytest.raises(ValueError, match=r"^a and b both set the base-loss option 'tau'"):
        trainer.build_loss(config, pairs, "logit_adjusted", [5, 3])
    pairs = [(_Answering("a", metrics=[]), settings), (_Answering("b", metrics=["acc"]), settings)]
    with pytest.raises(ValueError, match=r"^only one of the run's methods may choose the compiled metrics, "
                                         r"but a and b both do; drop one of them\.$"):
        methods.at_most_one(pairs, "compile_metrics", "choose the compiled metrics")
    pairs = [(_Answering("a", hook=len), settings), (_Answering("b", hook=len), settings)]
    with pytest.raises(ValueError, match=r"may change the training batches, but a and b both do"):
        methods.at_most_one(pairs, "batch_hook", "change the training batches", None, {})
    pairs = [(_Answering("a", report={"x": 1}), settings), (_Answering("b", report={"x": 2}), settings)]
    with pytest.raises(ValueError, match=r"^a and b both set the report entry 'x'"):
        methods.merged(pairs, "report", "report entry", None, None, None)


def test_compare_and_the_saved_models_take_the_methods_from_the_registry():
    from car_tf import compare
    from car_tf.evaluation import predictors

    assert compare.METHOD_FLAGS == {
        "ce": ["--method=ce"],
        "ldam_drw": ["--method=ldam_drw", "--lr_decay_factor=0.01"],
        "logit_adjusted": ["--method=logit_adjusted"],
        "balanced_softmax": ["--method=balanced_softmax"],
        "decoupled": ["--method=decoupled"],
        "car": ["--method=car"],
        "car_ldam_drw": ["--method=car", "--base_loss=ldam_drw"],
        "car_logit_adjusted": ["--method=car", "--base_loss=logit_adjusted"],
        "car_balanced_softmax": ["--method=car", "--base_loss=balanced_softmax"],
        "car_decoupled": ["--method=car", "--base_loss=decoupled"],
        "car_concutmix": ["--method=car", "--concutmix", "--base_loss=logit_adjusted"],
    }
    assert list(compare.METHOD_FLAGS)[:6] == ["ce", "ldam_drw", "logit_adjusted", "balanced_softmax", "decoupled", "car"]
    pairs = {"car": "ce", "car_ldam_drw": "ldam_drw", "car_logit_adjusted": "logit_adjusted",
             "car_balanced_softmax": "balanced_softmax", "car_decoupled": "decoupled"}
    stages = ("dlsa", "crt", "tau_norm", "posthoc_la")
    assert compare.PAIRED_BASE == {**pairs, **{f"{m}_{s}": f"{b}_{s}" for m, b in pairs.items() for s in stages}}
    assert set(compare.POSTHOC) == {f"{m}_{s}" for m in compare.METHOD_FLAGS if m != "car_concutmix" for s in stages}
    assert predictors.serializable_modules() == (
        "car_tf", "car_tf.models", "car_tf.dlsa", "car_tf.decoupled.terms", "car_tf.concutmix.model")


@pytest.mark.parametrize("entry, message", [
    ("no_colon", r"CAR_TF_METHODS entry 'no_colon' must read module:attribute"),
    ("surely_absent_package.method:X", r"the method surely_absent_package.method:X cannot be imported \(No module "
                                       r"named 'surely_absent_package'\); put its package's folder on PYTHONPATH"),
    ("car_tf.car.method:CARSettings", r"car_tf.car.method:CARSettings is not a Method instance"),
    ("car_tf.car.method:CAR", None),  # registered twice: the same method, kept once
])
def test_a_bad_plugin_entry_is_one_sentence(entry, message, monkeypatch):
    monkeypatch.setenv(methods.PLUGINS_ENV, entry)
    if message is None:
        assert list(methods.registry()) == ["decoupled", "car", "concutmix"]
        return
    with pytest.raises(ValueError, match=message):
        methods.registry()


def test_the_library_classes_take_their_defaults_from_the_settings():
    import inspect

    from car_tf.car import CARCallback, CARLoss, CARState, SparseCARState
    from car_tf.concutmix.model import ConCutMixModel
    from car_tf.concutmix.stage import concutmix_stage
    from car_tf.decoupled.margin import DecoupledMarginLoss
    from car_tf.decoupled.terms import attach_decoupled_terms

    def defaults(function):
        return {k: p.default for k, p in inspect.signature(function).parameters.items()
                if p.default is not inspect.Parameter.empty}

    car, ccm, dec = CARSettings(), ConCutMixSettings(), DecoupledSettings()
    loss = defaults(CARLoss.__init__)
    assert {k: loss[k] for k in ("spec_lambda", "beta", "r0", "temperature", "margin", "power_iterations",
                                 "power_tolerance", "ema_init", "spectral_method")} == {
        "spec_lambda": car.spec_lambda, "beta": car.spec_beta, "r0": car.spec_r0, "temperature": car.spec_temp,
        "margin": car.spec_margin, "power_iterations": car.power_iterations, "power_tolerance": car.power_tolerance,
        "ema_init": car.spec_ema_init, "spectral_method": car.spectral_method}
    assert defaults(CARState.__init__)["spec_lambda"] == defaults(SparseCARState.__init__)["spec_lambda"] == car.spec_lambda
    assert defaults(CARCallback.__init__)["lambda_warmup_epochs"] == car.lambda_warmup_epochs
    model = defaults(ConCutMixModel.__init__)
    assert {k: model[k] for k in ("alpha", "beta", "temperature", "top_k", "omega", "l_d_warm", "projection_dim")} == {
        k: getattr(ccm, f"ccm_{k}") for k in ("alpha", "beta", "temperature", "top_k", "omega", "l_d_warm",
                                              "projection_dim")}
    assert defaults(concutmix_stage)["cutmix_prob"] == ccm.ccm_cutmix_prob
    assert defaults(DecoupledMarginLoss.__init__)["margin"] == dec.arc_margin
    terms = defaults(attach_decoupled_terms)
    assert (terms["uniformity_weight"], terms["feature_norm_weight"], terms["target_norm"]) == (
        dec.uniformity_weight, dec.feature_norm_weight, dec.target_norm)
