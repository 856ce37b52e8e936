"""Train a long-tailed classifier: the command line of car_tf.training.trainer.train.

    python -m car_tf.train --flagfile=launch/cifar10_lt.flags --model_dir=runs/cifar10_car

Every flag is a field of the run's configuration (car_tf.training.config); the run directory gets
the flags used (flags.txt, a flagfile), run.json (what evaluation and export need), checkpoints/
(resumable: rerun the same command after a crash), TensorBoard logs in tb/, history.csv,
metrics/epoch_NNN.json (per-class metrics every epoch), the final model.keras and the per-class
report (report.json, per_class.csv, plots).
"""

from absl import flags

from car_tf import cli
from car_tf.data import sampling
from car_tf.data.flags import define_data_flags, define_group_flags
from car_tf.losses.registry import ALIASES, BASE_LOSSES
from car_tf.training import config as run_config
from car_tf.training import distribute, methods, schedules, trainer

define_data_flags()
define_group_flags()  # --many_threshold, --few_threshold: the per-class report's groups
# Run.
flags.DEFINE_string("model_dir", None, "Run directory: flags, checkpoints, logs, final model and report.")
flags.DEFINE_bool("overwrite", False, "Delete an existing run in --model_dir and start over.")
flags.DEFINE_enum(
    "method", "ce", [*methods.method_names(), *ALIASES],
    "Training method: a base loss, car (CARLoss on --base_loss), concutmix or decoupled (alias decoupled_reg).",
)
flags.DEFINE_enum("base_loss", "ce", [*BASE_LOSSES, *ALIASES], "Base loss under CAR (--method=car).")
flags.DEFINE_bool("concutmix", False, "Add the ConCutMix stage to the method (implied by --method=concutmix).")
flags.DEFINE_integer("seed", 0, "Seed of weights, data order and augmentation.")
flags.DEFINE_bool("deterministic", False, "Use deterministic TensorFlow ops (slower on GPU; exact resumes).")
flags.DEFINE_enum("strategy", "auto", distribute.STRATEGIES, "Distribution strategy (auto: all visible GPUs).")
flags.DEFINE_enum("mixed_precision", "none", ["none", "mixed_float16", "mixed_bfloat16"], "Keras dtype policy.")
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA (can help on GPUs; slow to compile).")
flags.DEFINE_bool("eval_on_train", False, "Also report per-class accuracy on the training set at the end.")
flags.DEFINE_bool("verbose", True, "Print metrics: a progress bar within each epoch on a terminal, one line per epoch in logs and pipes.")
flags.DEFINE_float(
    "validation_fraction", None,
    "Hold out this share of each class's training images (a fixed split, the same for every seed) "
    "and evaluate on it instead of the test split, which is then never read: for choosing "
    "hyper-parameters (python -m car_tf.search). Unset: train on all training images, evaluate on test.",
)
flags.DEFINE_enum(
    "sampler", run_config.DataConfig.sampler, list(sampling.SAMPLERS),
    "Which training images an epoch draws (Kang et al., ICLR 2020): instance (a shuffle, each image "
    "once), class_balanced (each class equally often), square_root (classes in proportion to "
    "sqrt(n_j)) or progressive (instance moving linearly to class_balanced over --epochs); the last "
    "three draw with replacement, keyed by (--seed, epoch).",
)
flags.DEFINE_bool("randaugment", False, "Add RandAugment (2 ops, magnitude 10) to the training stream.")
# Model.
flags.DEFINE_string("model", "resnet32", "Backbone name (car_tf.models.list_models()).")
flags.DEFINE_enum("head", "linear", ["linear", "cosine"], "Classifier head.")
flags.DEFINE_float("cosine_scale", 30.0, "Scale s of the cosine head.")
flags.DEFINE_integer("patch_size", 0, "ViT patch size (0: the model's default of 16).")
flags.DEFINE_integer(
    "lora_rank", run_config.ModelConfig.lora_rank,
    "LoRA (Hu et al., ICLR 2022) of this rank on the backbone's Dense/EinsumDense layers (vit_s16, vit_b16: "
    "all of them; --model=keras_hub: its attention query and value layers): only the adapters and the head "
    "train. 0: off. model.keras loads as the merged network; python -m export writes it as a plain one.",
)
flags.DEFINE_string(
    "pretrained", None,
    "Weights to fine-tune from: a .weights.h5 file of the same --model; with --model=keras_hub a "
    "keras-hub preset name (resnet_50_imagenet, vit_base_patch16_224_imagenet, ...) or local preset "
    "folder; with --model=keras_resnet50 'imagenet' or keras.applications' weights file.",
)
flags.DEFINE_bool(
    "frozen_backbone", False,
    "Keep the backbone frozen for the whole run: its features are computed once (cached under "
    "$CAR_TF_CACHE_DIR/features, reused by later runs on the same weights and data) and only the "
    "head trains on them, without augmentation. model.keras is still the whole images-to-logits network.",
)
flags.DEFINE_string(
    "unfreeze_from", None,
    "Partial fine-tuning: train only the layers from this layer of the model (a top-level layer name, "
    "e.g. stage7_block1_expand_conv of efficientnet_lite0) to the head; the layers before it stay "
    "frozen, their batch norms in inference mode.",
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
flags.DEFINE_integer(
    "gradient_accumulation_steps", run_config.OptimizerConfig.gradient_accumulation_steps,
    "Update the weights once per N batches with their mean gradient: an effective batch of N x --batch_size "
    "(a multi-GPU recipe's batch on one GPU; --lr is the effective batch's). Batch norm and CAR's EMA still "
    "update every batch; the learning-rate schedule still counts epochs.",
)
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
flags.DEFINE_float("arc_margin", 0.2, "Additive angular margin m of the decoupled loss.")
flags.DEFINE_float("uniformity_weight", 0.1, "Weight of the hyperspherical-uniformity term (decoupled loss).")
flags.DEFINE_enum("uniformity", "mhe", ["mhe", "gaussian"], "Uniformity term: energy or Gaussian potential.")
flags.DEFINE_float("feature_norm_weight", 0.01, "Weight of the feature-norm term (decoupled loss).")
flags.DEFINE_float("target_norm", 10.0, "Target feature norm of the decoupled loss.")
flags.DEFINE_enum("feature_norm", "hinge", ["hinge", "ring"], "Feature-norm term form.")
# CAR (CVPR 2026, arXiv 2603.16732).
flags.DEFINE_float("spec_lambda", 0.3, "Weight lambda of the CAR penalty.")
flags.DEFINE_float("spec_beta", 0.9, "EMA momentum of the confusion matrix (paper: 0.5).")
flags.DEFINE_float("spec_r0", 0.2, "Offset r0 of the frequency weights.")
flags.DEFINE_float("spec_temp", 1.0, "Softmax temperature of the confusion surrogate.")
flags.DEFINE_float("spec_margin", 0.0, "Paper's gate margin gamma (released code: 0).")
flags.DEFINE_bool("spec_count_weights", False, "Count-based frequency weights (m_j = n_j).")
flags.DEFINE_bool("spec_differentiable_gate", False, "Let gradient through the sigmoid gate.")
flags.DEFINE_enum("spec_ema_init", "first_batch", ["first_batch", "zeros"], "EMA start (code / paper).")
flags.DEFINE_enum("spectral_method", "auto", ["auto", "svd", "power"], "How sigma_max is found.")
flags.DEFINE_integer("power_iterations", 20, "At most this many warm-started power-iteration passes per step.")
flags.DEFINE_float("power_tolerance", 3e-6, "Power iteration stops once a pass raises sigma by less than this fraction.")
flags.DEFINE_integer("spec_sparse_ema_entries", None, "Sparse EMA: keep each class's N largest confusions (unset: dense K x K).")
flags.DEFINE_integer("lambda_warmup_epochs", 0, "Epochs of linear lambda ramp-up (released code: 0).")
# ConCutMix (Pan et al., TIP 2024, arXiv 2407.04911).
flags.DEFINE_float("ccm_alpha", 2.0, "Weight of the classification term.")
flags.DEFINE_float("ccm_beta", 0.6, "Weight of the balanced contrastive term.")
flags.DEFINE_float("ccm_temperature", 0.1, "Contrastive temperature.")
flags.DEFINE_integer("ccm_top_k", 30, "Nearest prototypes in the semantic label.")
flags.DEFINE_float("ccm_omega", 20 / 255, "Rectification strength omega.")
flags.DEFINE_integer("ccm_l_d_warm", 100, "Epochs before label rectification starts.")
flags.DEFINE_integer("ccm_projection_dim", 128, "Projection-head output size.")
flags.DEFINE_float("ccm_cutmix_prob", 0.5, "Probability that a batch is mixed.")

FLAGS = flags.FLAGS


def config_from_flags(flag_values=FLAGS):
    """The TrainConfig the flags describe."""
    if not flag_values.model_dir:
        raise ValueError("--model_dir is required: name the run directory to write (or resume).")
    section = run_config.section_from
    return run_config.TrainConfig(
        run=section(run_config.RunConfig, flag_values),
        data=section(run_config.DataConfig, flag_values),
        model=section(run_config.ModelConfig, flag_values),
        optimizer=section(run_config.OptimizerConfig, flag_values),
        loss=section(run_config.BaseLossConfig, flag_values),
        choice=section(run_config.MethodChoice, flag_values),
        settings={
            name: section(method.settings_class, flag_values) for name, method in methods.registry().items()
        },
    )


def train_and_evaluate(flag_values=FLAGS):
    """Runs (or resumes) the training the flags describe; returns the final test report."""
    return trainer.train(config_from_flags(flag_values))


def main(argv):
    del argv
    train_and_evaluate(FLAGS)


if __name__ == "__main__":
    cli.run(main, "car_tf.train", backends=cli.TRAINING_BACKENDS)
