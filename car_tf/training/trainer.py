"""``train(config) -> report``: runs (or resumes) one training run in its run directory.

The trainer builds the data, model, loss, optimizer and callbacks every run has, and lets the
run's active methods (car_tf.training.methods) add theirs; it knows no method by name. The run
directory is the run's record (car_tf.training.run_directory): the configuration is compared with
it before anything is written.
"""

import dataclasses
import json
import math
import pathlib
import sys
import time
from collections.abc import Callable

import keras
import numpy as np
from absl import logging

from car_tf import backend, distribute
from car_tf.data import feature_streams, recipes, sources, streams
from car_tf.data.loading import load_datasets
from car_tf.evaluation.callback import PerClassEvaluation
from car_tf.evaluation.metrics import per_class_report
from car_tf.evaluation.predictors import KerasPredictor, predict_dataset
from car_tf.evaluation.report import format_table, write_report
from car_tf.losses.registry import callbacks_for_loss, get_base_loss, length_dependence, required_head
from car_tf.models import create_model
from car_tf.models.feature_cache import cached_features, head_model
from car_tf.training import checkpointing, methods, optimizers, run_directory, schedules
from car_tf.training import config as run_config
from car_tf.training.callbacks import NaNGuard


def build_schedule(config, steps_per_epoch, epochs):
    """The learning rate of each step of a run of ``epochs`` epochs."""
    opt = config.optimizer
    return schedules.WarmupSchedule(
        opt.lr,
        total_steps=epochs * steps_per_epoch,
        warmup_steps=opt.warmup_epochs * steps_per_epoch,
        kind=opt.lr_schedule,
        decay_steps=[e * steps_per_epoch for e in opt.lr_decay_epochs],
        decay_factor=opt.lr_decay_factor,
    )


def build_optimizer(config, steps_per_epoch, classifier):
    """The run's optimizer; with fine-tuning controls, one that treats the backbone apart."""
    opt = config.optimizer
    schedule = build_schedule(config, steps_per_epoch, opt.epochs)  # counts batches, not updates (schedules.py)
    accumulation = optimizers.accumulation_options(opt.gradient_accumulation_steps)
    if opt.freeze_backbone_epochs or opt.backbone_lr_multiplier != 1.0:
        fine_tuning = dict(
            backbone_variables=optimizers.backbone_variable_paths(classifier),
            backbone_lr_multiplier=opt.backbone_lr_multiplier,
            freeze_steps=opt.freeze_backbone_epochs * steps_per_epoch,
            weight_decay=opt.weight_decay,
            **accumulation,
        )
        if opt.optimizer == "adamw":
            return optimizers.FineTuningAdamW(schedule, **fine_tuning)
        return optimizers.FineTuningSGD(schedule, momentum=opt.momentum, **fine_tuning)
    if opt.optimizer == "adamw":
        return keras.optimizers.AdamW(schedule, weight_decay=opt.weight_decay, **accumulation)
    return keras.optimizers.SGD(schedule, momentum=opt.momentum, weight_decay=opt.weight_decay, **accumulation)


def classifier_head(config, active, base_loss):
    """(head, scale): the configured head, unless a method or the base loss needs another."""
    configured = (config.model.head, config.model.cosine_scale)
    return methods.one_head(config, active) or required_head(base_loss) or configured


def build_network(config, active, base_loss, num_classes, image_size):
    """The image -> logits network the run deploys, with the head the methods need."""
    head, scale = classifier_head(config, active, base_loss)
    if head != config.model.head:
        logging.info("This method needs a %s classifier (scale %s): using it.", head, scale)
    options = {"patch_size": config.model.patch_size} if config.model.patch_size else {}
    network = create_model(
        config.model.model,
        num_classes,
        input_shape=(image_size, image_size, 3),
        head=head,
        cosine_scale=scale,
        weights=config.model.pretrained,
        lora_rank=config.model.lora_rank,
        **options,
    )
    if config.model.unfreeze_from:
        freeze_before(network, config.model.unfreeze_from)
    return network


def freeze_before(network, layer_name):
    """Makes the layers before ``layer_name`` non-trainable (batch norms then run in inference mode)."""
    names = [layer.name for layer in network.layers]
    if layer_name not in names[: names.index("features")]:
        backbone = [n for n in names[: names.index("features")] if network.get_layer(n).weights]
        raise ValueError(f"--unfreeze_from={layer_name} names no backbone layer of {network.name}; pass one "
                         f"of its layer names, e.g. {', '.join(backbone[-3:])} (the last ones).")
    for layer in network.layers[: names.index(layer_name)]:
        layer.trainable = False


def build_classifier(config, active, network):
    """What the optimizer trains: the network, or with --frozen_backbone its head on cached
    features (sharing the network's head layers), wrapped by the active methods."""
    classifier = head_model(network) if config.model.frozen_backbone else network
    for method, settings in active:
        classifier = method.wrap_classifier(settings, classifier)
    return classifier


@dataclasses.dataclass
class Streams:
    """The run's input streams: images, or with --frozen_backbone the backbone's cached features."""

    train: object
    test: object
    train_eval: Callable  # () -> the training split in order, for --eval_on_train


def build_streams(config, network, train_data, test_data, *, hook, **stream):
    """The training and evaluation streams of the run (see ``Streams``)."""
    batch_size, recipe, image_size = stream["batch_size"], stream["recipe"], stream["image_size"]
    if not config.model.frozen_backbone:
        def train_eval():
            return streams.evaluation_stream(train_data, recipe=recipe, image_size=image_size, batch_size=batch_size)

        return Streams(
            train=streams.training_stream(train_data, **stream, batch_hook=hook),
            test=streams.evaluation_stream(test_data, recipe=recipe, image_size=image_size, batch_size=batch_size),
            train_eval=train_eval,
        )
    if config.data.validation_fraction:  # both parts of the training split, extracted together
        both = sources.concatenate(train_data, test_data)
        x, y = cached_features(network, both, recipe=recipe, image_size=image_size, split="train+validation")
        (train_x, test_x), (train_y, test_y) = np.split(x, [train_data.size]), np.split(y, [train_data.size])
    else:
        train_x, train_y = cached_features(network, train_data, recipe=recipe, image_size=image_size, split="train")
        test_x, test_y = cached_features(network, test_data, recipe=recipe, image_size=image_size, split="test")
    return Streams(
        train=feature_streams.training_stream(train_x, train_y, batch_size=batch_size, seed=stream["seed"],
                                              start_epoch=stream["start_epoch"], epochs=stream["epochs"],
                                              sampler=config.data.sampler),
        test=feature_streams.evaluation_batches(test_x, test_y, batch_size),
        train_eval=lambda: feature_streams.evaluation_batches(train_x, train_y, batch_size),
    )


def build_loss(config, active, base_loss, counts):
    """The compiled loss: the base loss, wrapped by the active methods (CARLoss, say)."""
    options = config.loss.options(config.model.cosine_scale)
    options.update(methods.merged(active, "base_loss_options", "base-loss option"))
    loss = get_base_loss(base_loss, counts, **options)
    for method, settings in active:
        loss = method.wrap_loss(settings, loss, counts, base_loss, options)
    return loss


def done_epochs_unchanged(config, base_loss, stored_epochs, steps, epochs_done):
    """True when epochs 0 .. epochs_done - 1 see the same schedule in a run of the configured length.

    The learning rate of every step already taken, the base loss's own schedule (LDAM-DRW's
    re-weighting) and the sampler's draws must not depend on the run's length: true of step and
    constant schedules, not of a cosine one nor of the progressive sampler.
    """
    if config.data.sampler == "progressive" and epochs_done and stored_epochs != config.optimizer.epochs:
        return False
    taken = np.arange(epochs_done * steps)
    old = np.asarray(build_schedule(config, steps, stored_epochs)(taken))
    new = np.asarray(build_schedule(config, steps, config.optimizer.epochs)(taken))
    return np.array_equal(old, new) and not length_dependence(base_loss, stored_epochs, config.optimizer.epochs,
                                                              epochs_done)


def check_extension(config, base_loss, run_dir, stored, steps, epochs_done):
    """Refuses a larger --epochs that would change the epochs already trained; returns the stored epochs."""
    stored_epochs = int(stored["epochs"].split("=", 1)[1])
    current = config.flag_values()
    if config.optimizer.epochs < max(stored_epochs, epochs_done):
        raise run_directory.conflict(run_dir, stored, current, ["epochs"], ": a run cannot be shortened")
    if not done_epochs_unchanged(config, base_loss, stored_epochs, steps, epochs_done):
        loss_reason = length_dependence(base_loss, stored_epochs, config.optimizer.epochs, epochs_done)
        reason = (
            f": a longer run would change the schedule of the {epochs_done} epochs already trained "
            f"(--lr_schedule={config.optimizer.lr_schedule}, --sampler={config.data.sampler}"
            f"{', ' + loss_reason if loss_reason else ''})"
        )
        raise run_directory.conflict(run_dir, stored, current, ["epochs"], reason)
    return stored_epochs


def write_run_files(run_dir, config, base_loss, train, recipe, image_size, classifier, extended_from=()):
    run_dir.mkdir(parents=True, exist_ok=True)
    normalization = classifier.get_layer("pixel_normalization").get_config()
    info = {
        "model": config.model.model,
        "num_classes": train.num_classes,
        "class_names": list(train.class_names),
        "train_counts": [int(c) for c in train.counts()],
        "image_size": image_size,
        "recipe": recipe,
        "dataset": config.data.dataset,
        "method": config.choice.method,
        "base_loss": base_loss,
        "methods": [method.name for method, _ in methods.active_methods(config)],
        "epochs": config.optimizer.epochs,
        "effective_batch_size": config.optimizer.batch_size * config.optimizer.gradient_accumulation_steps,
        "epochs_extended_from": list(extended_from),
        "pretrained": config.model.pretrained,
        "keras_backend": keras.backend.backend(),
        "evaluated_on": "validation" if config.data.validation_fraction else "test",
        **config.data.group_thresholds(),  # the many / medium / few groups, reused by evaluate
        # Inside the model, so evaluation and export apply it too; recorded for the reader.
        "pixel_normalization": {k: normalization[k] for k in ("mean", "std", "scale", "channel_order")},
    }
    run_directory.write_atomically(run_dir / run_directory.RUN_FILE, json.dumps(info, indent=1))
    # Written last: a directory with flags.txt holds a complete record.
    record = {k: v for k, v in config.flag_values().items() if k not in run_directory.UNRECORDED_FLAGS}
    run_directory.write_atomically(run_dir / run_directory.FLAGS_FILE, run_directory.flagfile_text(record))


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


def check_evaluation_data(config, train_data, test_data):
    """Refuses, before anything is written, a run with nothing to evaluate on."""
    if test_data.size:
        return
    fraction = config.data.validation_fraction
    if not fraction:
        raise ValueError("the test split holds no image; check --data_dir and --test_list.")
    largest = int(max(train_data.counts()))
    if largest < 2:
        raise ValueError(f"--validation_fraction={fraction} cannot hold out any image: every class has a single "
                         "training image, which it must keep; drop --validation_fraction.")
    enough = max(0.1, math.ceil(100 / largest) / 100)
    raise ValueError(f"--validation_fraction={fraction} holds out no image (round({fraction} x n) of each class's n "
                     f"training images, and the largest class has {largest}); raise it, e.g. to {enough}.")


def check_model_options(config, active):
    """Refuses, before anything is written, model options a method cannot train with: a head on
    cached features (--frozen_backbone), or LoRA adapters under a method that rebuilds the model."""
    for method, _ in active:
        if config.model.lora_rank and method.rebuilds_model:
            raise ValueError(f"{method.name} {method.rebuilds_model}, which drops LoRA's adapters; "
                             "drop --lora_rank or train another method.")
    if not config.model.frozen_backbone:
        return
    opt = config.optimizer
    clashing = [f"--{name}" for name, on in [
        ("unfreeze_from", config.model.unfreeze_from),
        ("randaugment", config.data.randaugment),
        ("freeze_backbone_epochs", opt.freeze_backbone_epochs),
        ("backbone_lr_multiplier", opt.backbone_lr_multiplier != 1.0),
    ] if on]
    if clashing:
        raise ValueError(f"--frozen_backbone trains the head on features computed once from unaugmented images, "
                         f"so {', '.join(clashing)} would have no effect; drop them, or drop --frozen_backbone.")
    for method, _ in active:
        if method.needs_images:
            raise ValueError(f"{method.name} {method.needs_images}, so it cannot train on cached features; "
                             "drop --frozen_backbone.")


def train(config):
    """Runs (or resumes) the training ``config`` (a TrainConfig) describes; returns the test report.

    The process that writes the run directory holds its lock (train.lock) meanwhile, so a second
    command in it is refused; a multi-worker run's other workers write below it, unlocked.
    """
    if not distribute.is_chief():
        return train_in_locked_directory(config)
    with run_directory.training_lock(config.run.model_dir):
        return train_in_locked_directory(config)


@dataclasses.dataclass
class Run:
    """What the phases of a run share: its configuration, methods, directories, record and data."""

    config: object
    active: list
    base_loss: str
    chief: bool
    run_dir: pathlib.Path
    write_dir: pathlib.Path
    stored: dict | None  # the run directory's recorded flags (None: a new run)
    differing: list  # recorded flags the command changes (only --epochs may)
    strategy: object = None
    train_data: object = None
    test_data: object = None
    recipe: str = ""
    image_size: int = 0
    steps: int = 0
    extended_from: list = dataclasses.field(default_factory=list)

    @property
    def checkpoint_dir(self):
        return self.write_dir / "checkpoints"


@dataclasses.dataclass
class Built:
    """The run's Keras objects: the deployable network, what trains (``classifier``, wrapped into
    ``model``), the loss and the methods' callbacks."""

    network: object
    classifier: object
    model: object
    loss: object
    callbacks: list


def train_in_locked_directory(config):
    """``train``, once the run directory is locked: prepare, build, fit, finish. Everything the
    command asks is checked (flags, the run's record, the data, the model) before the run directory
    is changed."""
    run = prepare(config)
    report = finished_report(run.write_dir, checkpointing.latest_epoch(run.checkpoint_dir), config.optimizer.epochs)
    if run.stored is not None and report is not None:
        print(f"{run.run_dir} already finished its {config.optimizer.epochs} epochs; its report:")
        print(format_table(report))
        return report
    built = build(run)
    initial_epoch = 0 if config.run.overwrite else checkpointing.restore(built.model, run.checkpoint_dir)
    if initial_epoch:
        logging.info("Resuming %s after epoch %d.", run.run_dir, initial_epoch)
    run_streams = streams_of(run, built, initial_epoch)
    record(run, built, initial_epoch)  # everything is checked: only now is the run directory changed
    evaluation = fit(run, built, run_streams, initial_epoch)
    # The last epoch's evaluation already scored the final weights; a resumed, finished run has none.
    return finish(run, built, run_streams, evaluation.last_report)


def prepare(config):
    """Checks the command against the backend, the methods and the run's record, sets up the
    strategy and loads the data; writes nothing."""
    run_dir = pathlib.Path(config.run.model_dir)
    chief = distribute.is_chief()
    active = methods.active_methods(config)
    for method, _ in active:
        if method.needs_tensorflow and not backend.is_tensorflow():
            raise ValueError(f"{method.name} {method.needs_tensorflow}, so it cannot train under KERAS_BACKEND="
                             f"{keras.backend.backend()}; unset KERAS_BACKEND to use TensorFlow.")
    streams.check_options(config.data.randaugment)
    check_model_options(config, active)
    if config.run.overwrite and chief:
        run_directory.check_start_over(run_dir)  # refuses a folder holding other files; deletes later
    current = config.flag_values()
    stored = None if config.run.overwrite else run_directory.read_flagfile(run_dir)
    differing = []
    if stored is not None:  # refuse a different experiment before loading any data
        defaults = run_config.TrainConfig(run=run_config.RunConfig(model_dir=config.run.model_dir)).flag_values()
        differing = run_directory.differing_flags(stored, current, defaults)
        if set(differing) - {"epochs"}:
            raise run_directory.conflict(run_dir, stored, current, differing)
    write_dir = run_dir if chief else run_dir / "workers" / str(distribute.task_index())
    run = Run(config, active, methods.effective_base_loss(config), chief, run_dir, write_dir, stored, differing)
    run.strategy = distribute.make_strategy(config.run.strategy)  # first: collectives need a fresh runtime
    if config.run.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(config.run.mixed_precision)
    if config.run.deterministic:
        distribute.enable_determinism()
    keras.utils.set_random_seed(config.run.seed)
    train_data, test_data, run.recipe, run.image_size = load_datasets(config.data)
    check_evaluation_data(config, train_data, test_data)
    run.train_data, run.test_data = streams.prepare(train_data, test_data, run.recipe, run.image_size)
    run.steps = recipes.steps_per_epoch(run.train_data, config.optimizer.batch_size)
    if stored is not None:
        info = run_directory.read_run_info(run_dir)
        run_directory.check_same_data(run_dir, info, run.train_data.class_names, run.train_data.counts())
        if differing:  # only --epochs
            epochs_done = checkpointing.latest_epoch(run.checkpoint_dir)
            stored_epochs = check_extension(config, run.base_loss, run_dir, stored, run.steps, epochs_done)
            run.extended_from = [*(info or {}).get("epochs_extended_from", []), stored_epochs]
            logging.info("Extending %s from %d to %d epochs.", run_dir, stored_epochs, config.optimizer.epochs)
    return run


def build(run):
    """The network, what trains, the compiled model and the methods' callbacks, in the strategy's scope."""
    config, active, counts = run.config, run.active, run.train_data.counts()
    with run.strategy.scope():
        network = build_network(config, active, run.base_loss, run.train_data.num_classes, run.image_size)
        classifier = build_classifier(config, active, network)
        loss = build_loss(config, active, run.base_loss, counts)
        model = classifier
        for method, settings in active:
            model = method.wrap_model(settings, model, classifier, counts)
        metrics = methods.at_most_one(active, "compile_metrics", "choose the compiled metrics")
        if metrics is None:
            metrics = [keras.metrics.SparseCategoricalAccuracy(name="acc")]
        model.compile(
            optimizer=build_optimizer(config, run.steps, classifier),
            loss=loss,
            metrics=metrics or None,
            jit_compile=config.run.jit_compile if backend.is_tensorflow() else "auto",  # JAX: every step compiled
        )
        callbacks = [c for method, settings in active for c in method.attach(settings, model, loss)]
        model.optimizer.build(model.trainable_variables)
    return Built(network, classifier, model, loss, callbacks)


def streams_of(run, built, initial_epoch):
    """The run's input streams from ``initial_epoch`` on, with a method's batch hook if any."""
    config = run.config
    stream = dict(
        recipe=run.recipe,
        image_size=run.image_size,
        batch_size=config.optimizer.batch_size,
        seed=config.run.seed,
        start_epoch=initial_epoch,
        epochs=config.optimizer.epochs,
        randaugment=config.data.randaugment,
        skip_corrupt=config.data.skip_corrupt,
        sampler=config.data.sampler,
    )
    hook = methods.at_most_one(run.active, "batch_hook", "change the training batches", run.train_data, stream)
    return build_streams(config, built.network, run.train_data, run.test_data, hook=hook, **stream)


def record(run, built, initial_epoch):
    """Starts over (--overwrite) or records the run (flags.txt, run.json), and drops epoch records
    past the checkpoint."""
    if run.config.run.overwrite and run.chief:
        run_directory.start_over(run.run_dir)
    if run.chief and (run.stored is None or run.differing):
        write_run_files(run.run_dir, run.config, run.base_loss, run.train_data, run.recipe, run.image_size,
                        built.network, run.extended_from)
    trim_logs_to(run.write_dir, initial_epoch)


def fit(run, built, run_streams, initial_epoch):
    """Trains the remaining epochs with the run's callbacks; returns the per-class evaluation callback."""
    config, counts = run.config, run.train_data.counts()
    epochs = config.optimizer.epochs
    distribute.prepare_for_multi_worker(built.model, run.strategy, run_streams.train)
    callbacks = [*built.callbacks, *callbacks_for_loss(built.loss, epochs)]
    callbacks += [c for method, settings in run.active for c in method.callbacks(settings, run_streams.test, counts)]
    evaluation = PerClassEvaluation(run_streams.test, counts, log_dir=run.write_dir,
                                    class_names=run.train_data.class_names, **config.data.group_thresholds())
    callbacks += [
        evaluation,
        NaNGuard(run.run_dir),
        keras.callbacks.CSVLogger(str(run.write_dir / "history.csv"), append=True),
        *([keras.callbacks.TensorBoard(str(run.write_dir / "tb"))] if backend.is_tensorflow() else []),  # tf.summary
        # Last: an epoch's records are complete before its checkpoint makes it count as done.
        checkpointing.EpochCheckpoint(run.checkpoint_dir),
    ]
    start = time.time()
    if initial_epoch < epochs:
        built.model.fit(
            run_streams.train,
            epochs=epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=run.steps,
            callbacks=callbacks,
            shuffle=False,  # the stream is already shuffled, deterministically per epoch
            verbose=(1 if sys.stdout.isatty() else 2) if config.run.verbose else 0,  # bar on a terminal
        )
    logging.info("Training took %.1f s.", time.time() - start)
    return evaluation


def with_head_of(network, head):
    """``network`` (images -> logits) with the weights of ``head``'s layers after its features."""
    names = [layer.name for layer in network.layers]
    for layer in network.layers[names.index("features") + 1 :]:
        if layer.weights:
            layer.set_weights(head.get_layer(layer.name).get_weights())
    return keras.Model(network.inputs, network.outputs, name=network.name)


def finish(run, built, run_streams, report=None):
    """Saves the deployable model (images -> logits) as model.keras and writes the final per-class
    report (computed if not given) of what the run trained on its streams.

    Unreadable test files that --skip_corrupt left out are listed in report.json.
    """
    config, active, network, classifier = run.config, run.active, built.network, built.classifier
    train_data, test_data, write_dir = run.train_data, run.test_data, run.write_dir
    trained = keras.Model(classifier.inputs, classifier.outputs, name=classifier.name)  # no training wrapper
    serving = trained
    if config.model.frozen_backbone:  # the backbone under the trained head: images -> logits
        serving = with_head_of(network, trained)
    serving.save(str(write_dir / "model.keras"))
    counts = train_data.counts()
    predictor = KerasPredictor(trained)
    test_ds = run_streams.test
    if report is None:
        report = per_class_report(*predict_dataset(predictor, test_ds), counts, train_data.class_names,
                                  **config.data.group_thresholds())
    report.update(methods.merged(active, "report", "report entry", predictor, test_ds, counts))
    if config.run.eval_on_train:
        train_ds = run_streams.train_eval()
        train_report = per_class_report(*predict_dataset(predictor, train_ds), counts, train_data.class_names,
                                        **config.data.group_thresholds())
        report["train"] = {k: train_report[k] for k in ("top1", "worst_class_accuracy", "many", "medium", "few")}
        report["worst_class_gap"] = train_report["worst_class_accuracy"] - report["worst_class_accuracy"]
    if test_data.skipped:
        report["skipped_test_images"] = list(test_data.skipped)
    report["evaluated_on"] = "validation" if config.data.validation_fraction else "test"
    write_report(report, write_dir)
    print(format_table(report))
    return report
