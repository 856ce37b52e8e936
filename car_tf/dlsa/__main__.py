"""DLSA on a trained run (Xu et al., ECCV 2022, arXiv 2208.02567)::

    python -m car_tf.dlsa --model_dir=runs/x [--output_dir=runs/x/dlsa] [--depth=3 ...]

Reads RUN/run.json and RUN/model.keras, rebuilds the run's training and test data from the data
flags in RUN/flags.txt (any data flag given here overrides it), reads the frozen features from
the shared feature cache (or extracts and caches them), trains the flow cascade and the stage classifiers and writes a run directory (see
car_tf/dlsa/run.py) that ``python -m car_tf.evaluate --model=OUTPUT_DIR`` reads like any other.
"""

import pathlib

from absl import flags, logging

from car_tf import cli

cli.refuse_other_backends("car_tf.dlsa")  # before the modules below, which import TensorFlow
from car_tf.data.flags import base_run_data_flags, define_data_flags  # noqa: E402
from car_tf.data.loading import load_datasets  # noqa: E402
from car_tf.dlsa.classifiers import ClassifierTrainingConfig  # noqa: E402
from car_tf.dlsa.fit import DLSAConfig  # noqa: E402
from car_tf.dlsa.flow_training import FlowTrainingConfig  # noqa: E402
from car_tf.dlsa.run import run_dlsa  # noqa: E402
from car_tf.evaluation.predictors import read_run_info  # noqa: E402

define_data_flags()
flags.DEFINE_string("model_dir", None, "Run directory of the trained base model (run.json, model.keras).")
flags.DEFINE_string("output_dir", None, "Where the DLSA run directory goes; default MODEL_DIR/dlsa.")
flags.DEFINE_integer("depth", 1, "Filter stages of the cascade (DLSA: 3 for ImageNet-LT / iNat, else 1).")
flags.DEFINE_float("keep_fraction", 0.3, "Share of each stage's samples its classifier takes (highest likelihood).")
flags.DEFINE_integer("num_components", 500, "Components K of the flow's Gaussian-mixture prior.")
flags.DEFINE_float("prior_stddev", 0.05, "Standard deviation of the prior's fixed random means.")
flags.DEFINE_integer("flow_blocks", 2, "MADE + batch-norm blocks of each flow.")
flags.DEFINE_integer("flow_epochs", 50, "Training epochs of each flow.")
flags.DEFINE_integer("flow_batch_size", 1024, "Samples per flow step (half anchors, half partners).")
flags.DEFINE_float("flow_learning_rate", 0.2, "SGD learning rate of the flows.")
flags.DEFINE_float("flow_momentum", 0.0, "SGD momentum of the flows.")
flags.DEFINE_float("contrast_weight", 0.025, "Weight of the flow's contrast term (DLSA: 0.02-0.03).")
flags.DEFINE_float("balance_weight", 1.5, "Weight of the flow's cluster-balance term (DLSA: 1-2).")
flags.DEFINE_float("balance_momentum", 0.7, "Momentum of the running cluster-use average.")
flags.DEFINE_float("likelihood_weight_power", 2.0, "p of the likelihood weights (n_max / n_c)^p.")
flags.DEFINE_integer("classifier_epochs", 150, "Training epochs of each stage classifier.")
flags.DEFINE_integer("classifier_batch_size", 128, "Batch size of the stage classifiers.")
flags.DEFINE_float("classifier_learning_rate", 0.05, "Peak SGD learning rate of the stage classifiers (cosine decay).")
flags.DEFINE_float("classifier_momentum", 0.9, "SGD momentum of the stage classifiers.")
flags.DEFINE_float("classifier_weight_decay", 5e-4, "Weight decay of the stage classifiers.")
flags.DEFINE_float("validation_fraction", 0.1, "Stratified share of the training features kept for epoch selection.")
flags.DEFINE_integer("seed", 0, "Seed of the split, the prior means, the weights and the sampling.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.mark_flag_as_required("model_dir")

FLAGS = flags.FLAGS
def config_from_flags():
    return DLSAConfig(
        depth=FLAGS.depth,
        keep_fraction=FLAGS.keep_fraction,
        num_components=FLAGS.num_components,
        prior_stddev=FLAGS.prior_stddev,
        num_blocks=FLAGS.flow_blocks,
        validation_fraction=FLAGS.validation_fraction,
        seed=FLAGS.seed,
        flow=FlowTrainingConfig(
            epochs=FLAGS.flow_epochs,
            batch_size=FLAGS.flow_batch_size,
            learning_rate=FLAGS.flow_learning_rate,
            momentum=FLAGS.flow_momentum,
            contrast_weight=FLAGS.contrast_weight,
            balance_weight=FLAGS.balance_weight,
            balance_momentum=FLAGS.balance_momentum,
            likelihood_weight_power=FLAGS.likelihood_weight_power,
            seed=FLAGS.seed,
        ),
        classifier=ClassifierTrainingConfig(
            epochs=FLAGS.classifier_epochs,
            batch_size=FLAGS.classifier_batch_size,
            learning_rate=FLAGS.classifier_learning_rate,
            momentum=FLAGS.classifier_momentum,
            weight_decay=FLAGS.classifier_weight_decay,
            seed=FLAGS.seed,
        ),
    )


def main(argv):
    del argv
    model_dir = pathlib.Path(FLAGS.model_dir)
    run_info = read_run_info(model_dir)
    model_file = model_dir / "model.keras"
    if not model_file.is_file():
        raise ValueError(f"{model_file} does not exist; finish training the base run first.")
    output_dir = pathlib.Path(FLAGS.output_dir or model_dir / "dlsa")
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
        config_from_flags(),
        recipe=recipe,
        image_size=image_size,
        progress=FLAGS.progress,
    )
    logging.info(
        "DLSA test top-1 %.4f (many %s, medium %s, few %s); run directory %s",
        report["top1"], report["many"], report["medium"], report["few"], output_dir,
    )


if __name__ == "__main__":
    cli.run(main, "car_tf.dlsa")
