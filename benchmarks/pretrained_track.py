"""The evidence of README's "Evidence on the pretrained track": every method on frozen
EfficientNet-Lite0 ImageNet features of CIFAR-10-LT, settings chosen on validation, then seeds.

    python -m benchmarks.pretrained_track --output_dir=../runs/pretrained_track   # CAR_TF_DATA_DIR=../shared/data

1. For each trained method, ``car_tf.search`` at IF 100 on a validation split carved from the
   training images (a fifth of each class; the test split is not read): the flagfile's schedule and
   each --vary value one flag at a time. The same schedule values are tried for every method; the
   CAR variants also try lambda 1.0 (the paper's best is about 0.5, the code's 0.3) and count-based
   frequency weights.
2. For each imbalance factor, ``car_tf.compare`` of every method with the settings chosen for it
   over the seeds (at IF 100 also cRT, tau-normalisation and post-hoc logit adjustment of the CE
   runs; at each factor DLSA on them, ``ce_dlsa``, at a fifth of DLSA's default epochs, which take
   about 10 minutes a fit on this CPU): tables, paired differences and figures in OUTPUT_DIR/if<IF>/.
   DLSA on the CAR runs would repeat ``ce_dlsa``: on frozen features DLSA reads the backbone's
   features, not the base head.
3. At IF 100, the controls that separate CAR's penalty from its chosen learning rate: CAR at CE's
   settings (OUTPUT_DIR/if100_same_settings) and CE at CAR's learning rate (OUTPUT_DIR/if100_lr05).
4. Partial fine-tuning from images (launch/cifar10_lt_partial_ft_effnet.flags, ``--ft_seeds``):
   CE, CAR and their logit-adjusted forms at the flagfile's settings, all alike (no search: a run
   takes about 5 minutes here).

Every step resumes: rerun the command after an interruption.
"""

import json
import pathlib
import subprocess
import sys

from absl import app, flags

from car_tf.training.methods import compare_variants

FLAGFILE = "launch/cifar10_lt_frozen_effnet.flags"
FT_FLAGFILE = "launch/cifar10_lt_partial_ft_effnet.flags"
TRAINED = ["ce", "ldam_drw", "logit_adjusted", "car", "car_logit_adjusted"]
FINE_TUNED = ["ce", "car", "logit_adjusted", "car_logit_adjusted"]
SCHEDULE_VARY = ["--vary=lr=0.02,0.5", "--vary=epochs=30"]
CAR_VARY = ["--vary=spec_lambda=1.0", "--vary=spec_count_weights=true"]
REBALANCED = ["ce_crt", "ce_tau_norm", "ce_posthoc_la"]
DLSA_FLAGS = "--dlsa_flags=--flow_epochs=10,--classifier_epochs=30"

flags.DEFINE_string("output_dir", None, "Where the searches and comparisons go.")
flags.DEFINE_list("imbalance_factors", ["100", "10"], "CIFAR-10-LT imbalance factors to compare at.")
flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4"], "Seeds of the comparisons.")
flags.DEFINE_list("ft_seeds", ["0", "1", "2"], "Seeds of the partial fine-tuning comparison.")
flags.mark_flag_as_required("output_dir")
FLAGS = flags.FLAGS


def run(command):
    print("$ " + " ".join(command), flush=True)
    if subprocess.run([sys.executable, "-m", *command]).returncode:
        raise SystemExit(f"{command[0]} stopped; its message is above. Rerun this command to resume.")


def chosen_flags(output_dir, method):
    """Searches ``method``'s settings on validation (or reads the finished search); its chosen flags."""
    where = output_dir / "search_if100" / method
    vary = SCHEDULE_VARY + (CAR_VARY if method.startswith("car") else [])
    selecting = compare_variants()[method].flags
    run(["car_tf.search", f"--flagfile={FLAGFILE}", *selecting, *vary, f"--output_dir={where}"])
    return json.loads((where / "search.json").read_text())["flags"]


def compare(output_dir, name, *arguments, factor="100", seeds=None, flagfile=FLAGFILE):
    run(["car_tf.compare", f"--flagfile={flagfile}", f"--imbalance_factor={factor}",
         f"--seeds={','.join(seeds or FLAGS.seeds)}", *arguments, f"--output_dir={output_dir / name}"])


def main(argv):
    del argv
    output_dir = pathlib.Path(FLAGS.output_dir)
    method_flags = []
    for method in TRAINED:
        found = chosen_flags(output_dir, method)
        if found:
            method_flags.append(f"--method_flags={method}:{','.join(found)}")
    (output_dir / "chosen.json").write_text(json.dumps(method_flags, indent=1) + "\n")
    for factor in FLAGS.imbalance_factors:
        methods = [*TRAINED, *(REBALANCED if factor == "100" else []), "ce_dlsa"]
        compare(output_dir, f"if{factor}", f"--methods={','.join(methods)}", *method_flags, DLSA_FLAGS,
                factor=factor)
    compare(output_dir, "if100_same_settings", "--methods=car")
    compare(output_dir, "if100_lr05", "--methods=ce", "--lr=0.5")
    compare(output_dir, "partial_ft", f"--methods={','.join(FINE_TUNED)}", seeds=FLAGS.ft_seeds,
            flagfile=FT_FLAGFILE)


if __name__ == "__main__":
    app.run(main)
