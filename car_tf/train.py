"""Train a long-tailed classifier: the command line of car_tf.training.trainer.train.

    python -m car_tf.train --flagfile=launch/cifar10_lt.flags --model_dir=runs/cifar10_car

Every flag is a field of the run's configuration (car_tf.training.config) or of a registered
method's settings (car_tf.training.methods), made by car_tf.flags_from_config from the field's
name, default and help; the run directory gets the flags used (flags.txt, a flagfile), run.json
(what evaluation and export need), checkpoints/ (resumable: rerun the same command after a crash),
TensorBoard logs in tb/, history.csv, metrics/epoch_NNN.json (per-class metrics every epoch), the
final model.keras and the per-class report (report.json, per_class.csv, plots).
"""

from absl import flags

from car_tf import cli
from car_tf import flags_from_config
from car_tf.training import config as run_config
from car_tf.training import methods, trainer


def sections():
    """{name: dataclass} of every section the flags fill: the run's own (TrainConfig's fields),
    then each registered method's settings under the method's name."""
    return {**run_config.SECTIONS, **methods.settings_classes()}


def define_flags(flag_values=flags.FLAGS):
    """Defines train's flags, one per field of ``sections()``; returns their names."""
    return flags_from_config.define_flags(
        *sections().values(), flag_values=flag_values, module_name=flags_from_config.calling_module()
    )


cli.define_or_exit(define_flags)

FLAGS = flags.FLAGS


def config_from_flags(flag_values=FLAGS):
    """The TrainConfig the flags describe: every section built from the flags of its fields."""
    if not flag_values["model_dir"].value:
        raise ValueError("--model_dir is required: name the run directory to write (or resume).")
    section = flags_from_config.section_from_flags
    return run_config.TrainConfig(
        **{name: section(cls, flag_values) for name, cls in run_config.SECTIONS.items()},
        settings={name: section(cls, flag_values) for name, cls in methods.settings_classes().items()},
    )


def train_and_evaluate(flag_values=FLAGS):
    """Runs (or resumes) the training the flags describe; returns the final test report."""
    return trainer.train(config_from_flags(flag_values))


def main(argv):
    del argv
    train_and_evaluate(FLAGS)


if __name__ == "__main__":
    cli.run(main, "car_tf.train", backends=cli.TRAINING_BACKENDS)
