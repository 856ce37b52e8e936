"""README.md's code examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_example(name):
    text = README.read_text()
    match = re.search(rf"<!-- readme-example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"README.md has no example named {name}"
    return match.group(1)


def test_car_keras_example_runs_and_logs_the_penalty(capsys):
    namespace = {}
    exec(compile(readme_example("car-keras"), "README.md", "exec"), namespace)
    history = namespace["history"].history
    assert len(history["car_spectral_norm"]) == 3
    assert all(value > 0 for value in history["car_spectral_norm"])
    assert history["accuracy"][-1] > 0.76  # beats always predicting the head class (500 / 658)
    assert "car_spectral_norm" not in capsys.readouterr().err
