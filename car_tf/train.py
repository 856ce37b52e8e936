"""Train a long-tailed classifier.

    python -m car_tf.train --flagfile=launch/cifar10_lt.flags --model_dir=runs/cifar10_car

The run directory gets the flags used (flags.txt), run.json (what evaluation and export need),
checkpoints/ (resumable: rerun the same command after a crash), TensorBoard logs in tb/,
history.csv, metrics/epoch_NNN.json (per-class metrics every epoch), the final model.keras and the
per-class report (report.json, per_class.csv, plots).
"""

import json
import pathlib
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import flags, logging

from car_tf import checkpointing, cli, distribute, optimizers, run_directory, schedules
from car_tf.car_callback import CARCallback
from car_tf.car_state import attach_car_state
from car_tf.data import pipelines
from car_tf.data.flags import datasets_from_flags, define_data_flags
from car_tf.evaluate import decoupled_report
from car_tf.evaluation_callback import PerClassEvaluation
from car_tf.losses.car_loss import CARLoss
from car_tf.losses.registry import BASE_LOSSES, callbacks_for_loss, drw_start_epoch, get_base_loss
from car_tf.metrics import per_class_report
from car_tf.models import create_model
from car_tf.predictors import KerasPredictor, predict_dataset
from car_tf.report import format_table, write_report

METHODS = ("car", "concutmix", *BASE_LOSSES)

_FLAGS_BEFORE = set(flags.FLAGS)
define_data_flags()
# Run.
flags.DEFINE_string("model_dir", None, "Run directory: flags, checkpoints, logs, final model and report.")
flags.DEFINE_bool("overwrite", False, "Delete an existing run in --model_dir and start over.")
flags.DEFINE_enum("method", "ce", METHODS, "Training method: a base loss, car (CARLoss on --base_loss) or concutmix.")
flags.DEFINE_enum("base_loss", "ce", BASE_LOSSES, "Base loss under CAR (--method=car).")
flags.DEFINE_bool("concutmix", False, "Train with the ConCutMix stage (implied by --method=concutmix).")
flags.DEFINE_integer("seed", 0, "Seed of weights, data order and augmentation.")
flags.DEFINE_bool("deterministic", False, "Use deterministic TensorFlow ops (slower on GPU; exact resumes).")
flags.DEFINE_enum("strategy", "auto", distribute.STRATEGIES, "Distribution strategy (auto: all visible GPUs).")
flags.DEFINE_enum("mixed_precision", "none", ["none", "mixed_float16", "mixed_bfloat16"], "Keras dtype policy.")
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA (can help on GPUs; slow to compile).")
flags.DEFINE_bool("eval_on_train", False, "Also report per-class accuracy on the training set at the end.")
flags.DEFINE_bool("verbose", True, "Print metrics: a progress bar within each epoch on a terminal, one line per epoch in logs and pipes.")
flags.DEFINE_bool("randaugment", False, "Add RandAugment (2 ops, magnitude 10) to the training stream.")
# Model.
flags.DEFINE_string("model", "resnet32", "Backbone name (car_tf.models.list_models()).")
flags.DEFINE_enum("head", "linear", ["linear", "cosine"], "Classifier head.")
flags.DEFINE_float("cosine_scale", 30.0, "Scale s of the cosine head.")
flags.DEFINE_integer("patch_size", 0, "ViT patch size (0: the model's default of 16).")
flags.DEFINE_string(
    "pretrained", None,
    "Weights to fine-tune from: a .weights.h5 file of the same --model; with --model=keras_hub a "
    "keras-hub preset name (resnet_50_imagenet, vit_base_patch16_224_imagenet, ...) or local preset "
    "folder; with --model=keras_resnet50 'imagenet' or keras.applications' weights file.",
)
flags.DEFINE_integer(
    "freeze_backbone_epochs", 0,
    "Epochs at the start during which the backbone does not move (a linear probe), then full fine-tuning.",
    lower_bound=0,
)
flags.DEFINE_float(
    "backbone_lr_multiplier", 1.0,
    "The backbone's learning rate (and weight decay) relative to the head's, e.g. 0.1 for fine-tuning.",
    lower_bound=0.0,
)
# Optimisation.
flags.DEFINE_integer("epochs", 200, "Training epochs.")
flags.DEFINE_integer("batch_size", 128, "Global batch size (split across replicas).")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adamw"], "Optimizer.")
flags.DEFINE_float("lr", 0.1, "Peak learning rate.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_float("weight_decay", 2e-4, "Weight decay (Keras applies it decoupled, as AdamW does).")
flags.DEFINE_enum("lr_schedule", "step", schedules.SCHEDULES, "Learning-rate schedule after warm-up.")
flags.DEFINE_integer("warmup_epochs", 5, "Epochs of linear learning-rate warm-up.")
flags.DEFINE_list("lr_decay_epochs", ["160", "180"], "Epochs at which a step schedule decays.")
flags.DEFINE_float("lr_decay_factor", 0.1, "Step-decay multiplier (the LDAM code uses 0.01).")
# Base losses.
flags.DEFINE_float("la_tau", 1.0, "tau of logit adjustment (logits + tau log prior).")
flags.DEFINE_float("ldam_max_margin", 0.5, "Largest LDAM margin.")
flags.DEFINE_float("ldam_scale", 30.0, "LDAM logit scale.")
flags.DEFINE_float("arc_margin", 0.2, "Additive angular margin m of decoupled_reg.")
flags.DEFINE_float("uniformity_weight", 0.1, "Weight of the hyperspherical-uniformity term (decoupled_reg).")
flags.DEFINE_enum("uniformity", "mhe", ["mhe", "gaussian"], "Uniformity term: energy or Gaussian potential.")
flags.DEFINE_float("feature_norm_weight", 0.01, "Weight of the feature-norm term (decoupled_reg).")
flags.DEFINE_float("target_norm", 10.0, "Target feature norm of decoupled_reg.")
flags.DEFINE_enum("feature_norm", "hinge", ["hinge", "ring"], "Feature-norm term form.")
# CAR (SPEC.md section 1).
flags.DEFINE_float("spec_lambda", 0.3, "Weight lambda of the CAR penalty.")
flags.DEFINE_float("spec_beta", 0.9, "EMA momentum of the confusion matrix (paper: 0.5).")
flags.DEFINE_float("spec_r0", 0.2, "Offset r0 of the frequency weights.")
flags.DEFINE_float("spec_temp", 1.0, "Softmax temperature of the confusion surrogate.")
flags.DEFINE_float("spec_margin", 0.0, "Paper's gate margin gamma (released code: 0).")
flags.DEFINE_bool("spec_count_weights", False, "Count-based frequency weights (m_j = n_j).")
flags.DEFINE_bool("spec_differentiable_gate", False, "Let gradient through the sigmoid gate.")
flags.DEFINE_enum("spec_ema_init", "first_batch", ["first_batch", "zeros"], "EMA start (code / paper).")
flags.DEFINE_enum("spectral_method", "auto", ["auto", "svd", "power"], "How sigma_max is found.")
flags.DEFINE_integer("power_iterations", 4, "Warm-started power-iteration rounds per step.")
flags.DEFINE_integer("lambda_warmup_epochs", 0, "Epochs of linear lambda ramp-up (released code: 0).")
# ConCutMix (SPEC.md section 2).
flags.DEFINE_float("ccm_alpha", 2.0, "Weight of the classification term.")
flags.DEFINE_float("ccm_beta", 0.6, "Weight of the balanced contrastive term.")
flags.DEFINE_float("ccm_temperature", 0.1, "Contrastive temperature.")
flags.DEFINE_integer("ccm_top_k", 30, "Nearest prototypes in the semantic label.")
flags.DEFINE_float("ccm_omega", 20 / 255, "Rectification strength omega.")
flags.DEFINE_integer("ccm_l_d_warm", 100, "Epochs before label rectification starts.")
flags.DEFINE_integer("ccm_projection_dim", 128, "Projection-head output size.")
flags.DEFINE_float("ccm_cutmix_prob", 0.5, "Probability that a batch is mixed.")

FLAGS = flags.FLAGS
_data_flags = flags.FlagValues()
define_data_flags(_data_flags)
# The flags that make up a run's record: this command's own and the data flags.
RUN_FLAGS = frozenset(set(FLAGS) - _FLAGS_BEFORE | set(_data_flags)) - run_directory.UNRECORDED_FLAGS
del _FLAGS_BEFORE, _data_flags


def base_loss_options(name, config):
    """Keyword options of the base loss ``name`` from the flags."""
    return {
        "ldam_drw": {"max_margin": config.ldam_max_margin, "scale": config.ldam_scale},
        "logit_adjusted": {"tau": config.la_tau},
        "decoupled_reg": {"scale": config.cosine_scale, "margin": config.arc_margin},
    }.get(name, {})


def build_loss(config, counts):
    """The compiled loss of the run: a base loss, or CARLoss around one."""
    base = "logit_adjusted" if config.method == "concutmix" else config.base_loss
    if config.method not in ("car", "concutmix"):
        base = config.method
    options = base_loss_options(base, config)
    if config.method != "car":
        return get_base_loss(base, counts, **options)
    return CARLoss(
        counts,
        base=base,
        base_kwargs=options,
        spec_lambda=config.spec_lambda,
        beta=config.spec_beta,
        r0=config.spec_r0,
        count_based_weights=config.spec_count_weights,
        temperature=config.spec_temp,
        margin=config.spec_margin,
        differentiable_gate=config.spec_differentiable_gate,
        ema_init=config.spec_ema_init,
        spectral_method=config.spectral_method,
        power_iterations=config.power_iterations,
    )


def uses_base(config, name):
    return config.method == name or (config.method == "car" and config.base_loss == name)


def build_schedule(config, steps_per_epoch, epochs):
    """The learning rate of each step of a run of ``epochs`` epochs."""
    return schedules.WarmupSchedule(
        config.lr,
        total_steps=epochs * steps_per_epoch,
        warmup_steps=config.warmup_epochs * steps_per_epoch,
        kind=config.lr_schedule,
        decay_steps=[int(e) * steps_per_epoch for e in config.lr_decay_epochs],
        decay_factor=config.lr_decay_factor,
    )


def build_optimizer(config, steps_per_epoch, classifier):
    """The run's optimizer; with fine-tuning controls, one that treats the backbone apart."""
    schedule = build_schedule(config, steps_per_epoch, config.epochs)
    if config.freeze_backbone_epochs or config.backbone_lr_multiplier != 1.0:
        fine_tuning = dict(
            backbone_variables=optimizers.backbone_variable_paths(classifier),
            backbone_lr_multiplier=config.backbone_lr_multiplier,
            freeze_steps=config.freeze_backbone_epochs * steps_per_epoch,
            weight_decay=config.weight_decay,
        )
        if config.optimizer == "adamw":
            return optimizers.FineTuningAdamW(schedule, **fine_tuning)
        return optimizers.FineTuningSGD(schedule, momentum=config.momentum, **fine_tuning)
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)
    return keras.optimizers.SGD(
        schedule, momentum=config.momentum, weight_decay=config.weight_decay
    )


def classifier_head(config):
    """(head, scale) of the classifier: the flags, except where the base loss needs a cosine head.

    decoupled_reg scales cosines itself by --cosine_scale; LDAM, as released, takes plain cosines
    (scale 1) and applies its own scale --ldam_scale.
    """
    if uses_base(config, "decoupled_reg"):
        return "cosine", config.cosine_scale
    if uses_base(config, "ldam_drw"):
        return "cosine", 1.0
    return config.head, config.cosine_scale


def build_model(config, num_classes, image_size):
    head, scale = classifier_head(config)
    if head != config.head:
        logging.info("This loss needs a cosine classifier (scale %s): using it.", scale)
    options = {"patch_size": config.patch_size} if config.patch_size else {}
    model = create_model(
        config.model,
        num_classes,
        input_shape=(image_size, image_size, 3),
        head=head,
        cosine_scale=scale,
        weights=config.pretrained,
        **options,
    )
    if uses_base(config, "decoupled_reg"):
        from car_tf.regularizers import attach_decoupled_terms

        model = attach_decoupled_terms(
            model,
            uniformity_weight=config.uniformity_weight,
            feature_norm_weight=config.feature_norm_weight,
            target_norm=config.target_norm,
            uniformity=config.uniformity,
            feature_norm=config.feature_norm,
        )
    return model


class NaNGuard(keras.callbacks.Callback):
    """Stops a run whose loss turns NaN or Inf with one sentence saying what to do."""

    def __init__(self, checkpoint_dir):
        super().__init__()
        self.checkpoint_dir = checkpoint_dir
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not tf.math.is_finite(float(loss)):
            raise FloatingPointError(
                f"the training loss became {float(loss)} at epoch {self.epoch}, step {batch}; "
                f"lower --lr (or enable warm-up) and rerun: the run resumes from the last good "
                f"checkpoint in {self.checkpoint_dir}."
            )


def run_flag_values(config):
    """{name: "--name=value"} of the flags in RUN_FLAGS: the run's record."""
    return {name: config[name].serialize() for name in RUN_FLAGS if config[name].serialize()}


def write_run_files(run_dir, config, train, recipe, image_size, classifier, extended_from=()):
    run_dir.mkdir(parents=True, exist_ok=True)
    normalization = classifier.get_layer("pixel_normalization").get_config()
    info = {
        "model": config.model,
        "num_classes": train.num_classes,
        "class_names": list(train.class_names),
        "train_counts": [int(c) for c in train.counts()],
        "image_size": image_size,
        "recipe": recipe,
        "dataset": config.dataset,
        "method": config.method,
        "base_loss": config.base_loss,
        "concutmix": config.concutmix or config.method == "concutmix",
        "epochs": config.epochs,
        "epochs_extended_from": list(extended_from),
        "pretrained": config.pretrained,
        # Inside the model, so evaluation and export apply it too; recorded for the reader.
        "pixel_normalization": {k: normalization[k] for k in ("mean", "std", "scale", "channel_order")},
    }
    run_directory.write_atomically(run_dir / run_directory.RUN_FILE, json.dumps(info, indent=1))
    # Written last: a directory with flags.txt holds a complete record.
    text = run_directory.flagfile_text(run_flag_values(config))
    run_directory.write_atomically(run_dir / run_directory.FLAGS_FILE, text)


def done_epochs_unchanged(config, stored_epochs, steps, epochs_done):
    """True when epochs 0 .. epochs_done - 1 see the same schedule in a run of config.epochs epochs.

    The learning rate of every step already taken, and LDAM-DRW's re-weighting, must not depend on
    the run's length: true of step and constant schedules, not of a cosine one.
    """
    taken = np.arange(epochs_done * steps)
    old = np.asarray(build_schedule(config, steps, stored_epochs)(taken))
    new = np.asarray(build_schedule(config, steps, config.epochs)(taken))
    if not np.array_equal(old, new):
        return False
    if uses_base(config, "ldam_drw"):
        return min(drw_start_epoch(stored_epochs), epochs_done) == min(drw_start_epoch(config.epochs), epochs_done)
    return True


def check_extension(config, run_dir, stored, steps, epochs_done):
    """Refuses a larger --epochs that would change the epochs already trained; returns the stored epochs."""
    stored_epochs = int(stored["epochs"].split("=", 1)[1])
    current = run_flag_values(config)
    if config.epochs < max(stored_epochs, epochs_done):
        raise run_directory.conflict(run_dir, stored, current, ["epochs"], ": a run cannot be shortened")
    if not done_epochs_unchanged(config, stored_epochs, steps, epochs_done):
        reason = (
            f": a longer run would change the schedule of the {epochs_done} epochs already trained "
            f"(--lr_schedule={config.lr_schedule}"
            f"{', LDAM-DRW re-weighting' if uses_base(config, 'ldam_drw') else ''})"
        )
        raise run_directory.conflict(run_dir, stored, current, ["epochs"], reason)
    return stored_epochs


def finished_report(run_dir, epochs_done, epochs):
    """The stored report of a run that has finished its epochs, else None."""
    path = run_dir / "report.json"
    if epochs_done < epochs or not path.is_file() or not (run_dir / "model.keras").is_file():
        return None
    return json.loads(path.read_text())


def trim_logs_to(write_dir, epochs_done):
    """Drops per-epoch records past the checkpoint (a run killed after logging, before saving)."""
    history = write_dir / "history.csv"
    if history.is_file():
        lines = history.read_text().splitlines(keepends=True)
        history.write_text("".join(lines[: 1 + epochs_done]))
    for record in (write_dir / "metrics").glob("epoch_*.json"):
        if int(record.stem.split("_")[1]) > epochs_done:
            record.unlink()


def train_and_evaluate(config):
    """Runs (or resumes) the training the flags describe; returns the final test report."""
    if not config.model_dir:
        raise ValueError("--model_dir is required: name the run directory to write (or resume).")
    run_dir = pathlib.Path(config.model_dir)
    chief = distribute.is_chief()
    if config.overwrite and chief:
        run_directory.start_over(run_dir)
    stored = run_directory.read_flagfile(run_dir)
    differing = []
    if stored is not None:  # refuse a different experiment before loading any data
        differing = run_directory.differing_flags(stored, run_flag_values(config))
        if set(differing) - {"epochs"}:
            raise run_directory.conflict(run_dir, stored, run_flag_values(config), differing)
    strategy = distribute.make_strategy(config.strategy)  # first: collectives need a fresh runtime
    if config.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(config.mixed_precision)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    write_dir = run_dir if chief else run_dir / "workers" / str(distribute.task_index())
    checkpoint_dir = write_dir / "checkpoints"

    train, test, recipe, image_size = datasets_from_flags(config)
    counts = train.counts()
    steps = pipelines.steps_per_epoch(train, config.batch_size)
    epochs_done = checkpointing.latest_epoch(checkpoint_dir)
    extended_from = []
    if stored is not None:
        info = run_directory.read_run_info(run_dir)
        run_directory.check_same_data(run_dir, info, train.class_names, counts)
        if differing:  # only --epochs
            stored_epochs = check_extension(config, run_dir, stored, steps, epochs_done)
            extended_from = [*(info or {}).get("epochs_extended_from", []), stored_epochs]
            logging.info("Extending %s from %d to %d epochs.", run_dir, stored_epochs, config.epochs)
        report = finished_report(write_dir, epochs_done, config.epochs)
        if report is not None:
            print(f"{run_dir} already finished its {config.epochs} epochs; its report:")
            print(format_table(report))
            return report
    concutmix = config.concutmix or config.method == "concutmix"

    with strategy.scope():
        classifier = build_model(config, train.num_classes, image_size)
        loss = build_loss(config, counts)
        model = wrap_concutmix(config, classifier, counts) if concutmix else classifier
        model.compile(
            optimizer=build_optimizer(config, steps, classifier),
            loss=loss,
            metrics=None if concutmix else [keras.metrics.SparseCategoricalAccuracy(name="acc")],
            jit_compile=config.jit_compile,
        )
        callbacks = []
        if isinstance(loss, CARLoss):
            attach_car_state(model, loss)  # before restoring, so the checkpoint's EMA is loaded
            callbacks.append(CARCallback(loss, lambda_warmup_epochs=config.lambda_warmup_epochs))
        model.optimizer.build(model.trainable_variables)
    if chief and (stored is None or differing):
        write_run_files(run_dir, config, train, recipe, image_size, classifier, extended_from)
    initial_epoch = checkpointing.restore(model, checkpoint_dir)
    if initial_epoch:
        logging.info("Resuming %s after epoch %d.", run_dir, initial_epoch)
    trim_logs_to(write_dir, initial_epoch)

    stream = dict(
        recipe=recipe,
        image_size=image_size,
        batch_size=config.batch_size,
        seed=config.seed,
        start_epoch=initial_epoch,
        epochs=config.epochs,
        randaugment=config.randaugment,
        skip_corrupt=config.skip_corrupt,
    )
    if concutmix:
        train_ds = concutmix_stream(config, train, stream)
    else:
        train_ds = pipelines.train_dataset(train, **stream)
    test_ds = pipelines.eval_dataset(test, recipe=recipe, image_size=image_size, batch_size=config.batch_size)
    distribute.prepare_for_multi_worker(model, strategy, train_ds)
    callbacks += callbacks_for_loss(loss, config.epochs)
    if uses_base(config, "decoupled_reg"):
        from car_tf.decoupled_diagnostics import DecoupledDiagnostics

        callbacks.append(DecoupledDiagnostics(test_ds, counts))
    evaluation = PerClassEvaluation(test_ds, counts, log_dir=write_dir, class_names=train.class_names)
    callbacks += [
        evaluation,
        NaNGuard(checkpoint_dir),
        keras.callbacks.CSVLogger(str(write_dir / "history.csv"), append=True),
        keras.callbacks.TensorBoard(str(write_dir / "tb")),
        # Last: an epoch's records are complete before its checkpoint makes it count as done.
        checkpointing.EpochCheckpoint(checkpoint_dir),
    ]
    start = time.time()
    if initial_epoch < config.epochs:
        model.fit(
            train_ds,
            epochs=config.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps,
            callbacks=callbacks,
            shuffle=False,  # the stream is already shuffled, deterministically per epoch
            verbose=(1 if sys.stdout.isatty() else 2) if config.verbose else 0,  # bar on a terminal
        )
    logging.info("Training took %.1f s.", time.time() - start)
    # The last epoch's evaluation already scored the final weights; a resumed, finished run has none.
    return finish(config, classifier, train, test_ds, recipe, image_size, write_dir, evaluation.last_report,
                  skipped_test=test.skipped)


def finish(config, classifier, train, test_ds, recipe, image_size, write_dir, report=None, skipped_test=()):
    """Saves the plain classifier and writes the final per-class report (computed if not given).

    skipped_test: the unreadable test files --skip_corrupt left out, listed in report.json.
    """
    serving = keras.Model(classifier.inputs, classifier.outputs, name=classifier.name)
    serving.save(str(write_dir / "model.keras"))
    counts = train.counts()
    predictor = KerasPredictor(serving)
    if report is None:
        report = per_class_report(*predict_dataset(predictor, test_ds), counts, train.class_names)
    if uses_base(config, "decoupled_reg"):
        report["decoupled"] = decoupled_report(predictor, test_ds, counts)
    if config.eval_on_train:
        train_ds = pipelines.eval_dataset(train, recipe=recipe, image_size=image_size, batch_size=config.batch_size)
        train_report = per_class_report(*predict_dataset(predictor, train_ds), counts, train.class_names)
        report["train"] = {k: train_report[k] for k in ("top1", "worst_class_accuracy", "many", "medium", "few")}
        report["worst_class_gap"] = train_report["worst_class_accuracy"] - report["worst_class_accuracy"]
    if skipped_test:
        report["skipped_test_images"] = list(skipped_test)
    write_report(report, write_dir)
    print(format_table(report))
    return report


def wrap_concutmix(config, classifier, counts):
    from car_tf.concutmix.model import ConCutMixModel

    return ConCutMixModel(
        classifier,
        num_classes=len(counts),
        class_counts=counts,
        projection_dim=config.ccm_projection_dim,
        alpha=config.ccm_alpha,
        beta=config.ccm_beta,
        temperature=config.ccm_temperature,
        top_k=config.ccm_top_k,
        omega=config.ccm_omega,
        l_d_warm=config.ccm_l_d_warm,
    )


def concutmix_stream(config, train, stream):
    from car_tf.concutmix.stage import concutmix_training_stream

    return concutmix_training_stream(train, cutmix_prob=config.ccm_cutmix_prob, **stream)


def main(argv):
    del argv
    train_and_evaluate(FLAGS)


if __name__ == "__main__":
    cli.run(main, "car_tf.train")
