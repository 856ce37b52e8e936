"""DLSA on a trained run (Xu et al., ECCV 2022, arXiv 2208.02567)::

    python -m car_tf.dlsa --model_dir=runs/x [--output_dir=runs/x/dlsa] [--depth=3 ...]

Reads RUN/run.json and RUN/model.keras, rebuilds the run's training and test data from the data
flags in RUN/flags.txt (any data flag given here overrides it), reads the frozen features from
the shared feature cache (or extracts and caches them), trains the flow cascade and the stage classifiers and writes a run directory (see
car_tf/dlsa/run.py) that ``python -m car_tf.evaluate --model=OUTPUT_DIR`` reads like any other.
"""

import pathlib

from absl import flags, logging

from car_tf import cli, flags_from_config

cli.refuse_other_backends("car_tf.dlsa")  # before the modules below, which import TensorFlow
from car_tf.data.flags import PostHocRun, base_run_data_flags, define_posthoc_flags  # noqa: E402
from car_tf.data.loading import load_datasets  # noqa: E402
from car_tf.dlsa.fit import DLSAConfig  # noqa: E402
from car_tf.dlsa.run import run_dlsa  # noqa: E402
from car_tf.evaluation.predictors import read_run_info  # noqa: E402


def define_flags(flag_values=flags.FLAGS):
    """Defines this command's flags: the data flags, PostHocRun's and DLSAConfig's fields."""
    return define_posthoc_flags(DLSAConfig, flag_values)


FLAGS = flags.FLAGS


def main(argv):
    del argv
    command = flags_from_config.section_from_flags(PostHocRun, FLAGS)
    config = flags_from_config.section_from_flags(DLSAConfig, FLAGS)
    model_dir = pathlib.Path(command.model_dir)
    run_info = read_run_info(model_dir)
    model_file = model_dir / "model.keras"
    if not model_file.is_file():
        raise ValueError(f"{model_file} does not exist; finish training the base run first.")
    output_dir = pathlib.Path(command.output_dir or model_dir / "dlsa")
    train, test, recipe, image_size = load_datasets(base_run_data_flags(model_dir))
    if train.num_classes != int(run_info["num_classes"]):
        raise ValueError(
            f"the data has {train.num_classes} classes but {model_dir} was trained on "
            f"{run_info['num_classes']}; pass the base run's data flags."
        )
    image_size = int(run_info.get("image_size") or image_size)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "flags.txt").write_text(FLAGS.flags_into_string())
    report = run_dlsa(
        model_file,
        run_info,
        train,
        test,
        output_dir,
        config,
        recipe=recipe,
        image_size=image_size,
        progress=command.progress,
    )
    logging.info(
        "DLSA test top-1 %.4f (many %s, medium %s, few %s); run directory %s",
        report["top1"], report["many"], report["medium"], report["few"], output_dir,
    )


if __name__ == "__main__":
    define_flags()
    cli.run(main, "car_tf.dlsa")
