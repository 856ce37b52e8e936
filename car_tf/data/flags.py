"""The data flags shared by the command lines (train, evaluate, dlsa, rebalance), made from
DataConfig's fields (car_tf.flags_from_config), the DataConfig they describe, and the flags of the
post-hoc commands that write a new run from a finished one (dlsa, rebalance)."""
import dataclasses
import pathlib

from absl import flags, logging

from car_tf import flags_from_config
from car_tf.data.config import DataConfig
from car_tf.method import setting

# The fields of DataConfig that choose and read the data set (every data command has them).
DATA_FLAGS = (
    "dataset", "data_dir", "train_list", "test_list", "imbalance_factor", "lt_profile",
    "image_size", "data_recipe", "skip_corrupt",
)
# The per-class report's many / medium / few groups (train and evaluate).
GROUP_FLAGS = ("many_threshold", "few_threshold")


def define_data_flags(flag_values=flags.FLAGS):
    """Defines the data flags (DATA_FLAGS) once; calling it again is a no-op."""
    flags_from_config.define_flags(DataConfig, flag_values=flag_values, only=DATA_FLAGS,
                                   module_name=flags_from_config.calling_module(skip=(__name__,)))


@dataclasses.dataclass(frozen=True)
class PostHocRun:
    """The flags of a post-hoc command besides its method's settings and the data flags."""

    model_dir: str = setting(help="Run directory of the finished run (run.json, model.keras).")
    output_dir: str | None = setting(
        None, help="Where the new run directory goes; default MODEL_DIR/<stage> (dlsa, crt, tau_norm, posthoc_la).")
    progress: bool = setting(True, help="Show progress bars.")


def define_posthoc_flags(settings_class, flag_values=flags.FLAGS):
    """Defines a post-hoc command's flags: the data flags, PostHocRun's and ``settings_class``'s
    fields; returns the names of the last two."""
    define_data_flags(flag_values)
    return flags_from_config.define_flags(PostHocRun, settings_class, flag_values=flag_values,
                                          module_name=flags_from_config.calling_module(skip=(__name__,)))


def define_group_flags(flag_values=flags.FLAGS):
    """Defines --many_threshold and --few_threshold, the many / medium / few groups of the per-class
    report (train and evaluate); calling it again is a no-op."""
    flags_from_config.define_flags(DataConfig, flag_values=flag_values, only=GROUP_FLAGS,
                                   module_name=flags_from_config.calling_module(skip=(__name__,)))


def data_config(flag_values=flags.FLAGS, names=DATA_FLAGS, **overrides):
    """The DataConfig of the data flags ``names`` (the other fields at their defaults), with
    ``overrides`` (field=value) on top."""
    config = flags_from_config.section_from_flags(DataConfig, flag_values, only=names)
    return dataclasses.replace(config, **overrides) if overrides else config


def base_run_data_flags(model_dir, given=flags.FLAGS):
    """The DataConfig of the run in ``model_dir`` (the data flags of its flags.txt), overridden by
    the data flags given on this command line (``given``): what a post-hoc stage on a finished run
    reads its data with."""
    values = flags.FlagValues()
    define_data_flags(values)
    flagfile = pathlib.Path(model_dir) / "flags.txt"
    if flagfile.is_file():
        values(["base_run", f"--flagfile={flagfile}"], known_only=True)
    else:
        values(["base_run"])
        logging.warning("%s is missing; the data flags of this command line are used.", flagfile)
    for name in DATA_FLAGS:
        if name in given and (given[name].present or not flagfile.is_file()):
            values[name].value = given[name].value
    return data_config(values)
