"""A method from outside car_tf is a folder plus one registry line: its flag, its place in
car_tf.compare and its training follow from the registry (car_tf.training.methods)."""

import csv
import json
import os
import subprocess
import sys

import pytest
from absl import flags

from car_tf import train as train_cli
from car_tf.training import methods
from train_helpers import ROOT, tiny_args

TOY_METHOD = '''"""A toy method: the base loss times --toy_scale."""

import dataclasses

import keras

from car_tf.method import Method, Variant, setting

SCALES = []  # the scales wrap_loss was given, for the test to read


@dataclasses.dataclass(frozen=True, kw_only=True)
class ToySettings:
    toy_scale: float = setting(1.0, lower_bound=0.0, help="Factor the base loss is multiplied by.")


class ScaledLoss(keras.losses.Loss):
    def __init__(self, inner, scale):
        super().__init__(name="toy_scaled")
        self.inner, self.scale = inner, scale

    def call(self, y_true, y_pred):
        return self.scale * self.inner.call(y_true, y_pred)


class ToyMethod(Method):
    name = "toy"
    settings_class = ToySettings

    def wrap_loss(self, settings, loss, counts, base_loss, base_options):
        SCALES.append(settings.toy_scale)
        return ScaledLoss(loss, settings.toy_scale)

    def compare_variants(self, base_losses):
        return {"toy": Variant(("--method=toy",), paired_with="ce")}


TOY = ToyMethod()
'''
REGISTRY_LINE = "toy_method.method:TOY"  # the one line: CAR_TF_METHODS=toy_method.method:TOY


def write_toy_package(root):
    package = root / "toy_method"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "method.py").write_text(TOY_METHOD)
    return root


def _forget_toy():
    for name in [n for n in sys.modules if n == "toy_method" or n.startswith("toy_method.")]:
        del sys.modules[name]


@pytest.fixture
def registered_toy(tmp_path, monkeypatch):
    """The toy package written under ``tmp_path`` and registered by its one line; its folder."""
    plugins = write_toy_package(tmp_path / "plugins")
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.setenv(methods.PLUGINS_ENV, REGISTRY_LINE)
    _forget_toy()  # this test's own copy of the package
    yield plugins
    _forget_toy()


def test_a_registered_toy_method_gets_its_flag_its_settings_and_its_compare_row(registered_toy):
    assert list(methods.registry()) == ["decoupled", "car", "concutmix", "toy"]  # after car_tf's own
    assert list(methods.compare_variants())[-2:] == ["car_concutmix", "toy"]
    assert methods.compare_variants()["toy"].paired_with == "ce"
    assert "toy" in methods.method_names()
    values = flags.FlagValues()
    assert "toy_scale" in train_cli.define_flags(values)
    assert values["toy_scale"].help == "Factor the base loss is multiplied by." and values["toy_scale"].default == 1.0
    values(["train", "--model_dir=x", "--method=toy", "--toy_scale=0.25"])
    config = train_cli.config_from_flags(values)
    assert config.settings["toy"].toy_scale == 0.25 and config.flag_values()["toy_scale"] == "--toy_scale=0.25"
    assert [method.name for method, _ in methods.active_methods(config)] == ["toy"]
    with pytest.raises(flags.IllegalFlagValueError):
        values(["train", "--toy_scale=-1"])  # its field's lower bound


@pytest.mark.slow
def test_a_toy_method_is_a_folder_plus_one_registry_line(registered_toy, tiny_folder, tmp_path):
    plugins = registered_toy
    # car_tf.train: the toy's flag is made from its field, and the run trains with its scaled loss.
    values = flags.FlagValues()
    train_cli.define_flags(values)
    run = tmp_path / "run"
    values(["train", *tiny_args(tiny_folder, run, "--epochs=1", "--method=toy", "--toy_scale=0.01")])
    report = train_cli.train_and_evaluate(values)
    from toy_method.method import SCALES

    assert SCALES == [0.01] and 0 <= report["top1"] <= 1
    assert "--toy_scale=0.01\n" in (run / "flags.txt").read_text()
    assert json.loads((run / "run.json").read_text())["methods"] == ["toy"]
    loss = float(next(csv.DictReader((run / "history.csv").open()))["loss"])
    assert 0 < loss < 0.05  # cross-entropy over three classes is about 1.1; a hundredth of it trained

    # car_tf.compare: a row of its own, paired with ce, trained in a process that inherits the line.
    env = {**os.environ, methods.PLUGINS_ENV: REGISTRY_LINE,
           "PYTHONPATH": os.pathsep.join([str(plugins), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    train_flags = [a for a in tiny_args(tiny_folder, "unused", "--epochs=1") if not a.startswith("--model_dir")]
    out = tmp_path / "set"
    done = subprocess.run([sys.executable, "-m", "car_tf.compare", *train_flags, "--methods=ce,toy", "--seeds=0",
                           "--method_flags=toy:--toy_scale=0.01", f"--output_dir={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| toy - ce | 1 |" in done.stdout
    recorded = (out / "toy" / "seed_0" / "flags.txt").read_text()
    assert "--method=toy\n" in recorded and "--toy_scale=0.01\n" in recorded
    assert "--toy_scale=1.0\n" in (out / "ce" / "seed_0" / "flags.txt").read_text()  # ce's run: the default


def test_a_registry_line_naming_nothing_stops_the_command_in_one_sentence(tmp_path):
    env = {**os.environ, methods.PLUGINS_ENV: "toy_method.method:TOY"}  # its folder not on PYTHONPATH
    done = subprocess.run([sys.executable, "-m", "car_tf.train", f"--model_dir={tmp_path / 'run'}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "car_tf.train: the method toy_method.method:TOY cannot be imported (No module named 'toy_method'); "
        "put its package's folder on PYTHONPATH or correct CAR_TF_METHODS.")
