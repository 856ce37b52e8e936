"""--lora_rank / create_model(..., lora_rank=r): Keras's LoRA adapters on a ViT backbone.

Tiny random-weight models only: a car_tf ViT built small (vision_transformer, registered for these
tests) and a keras-hub ViT from a small config saved locally as a preset (no network).
"""

import json

import keras
import numpy as np
import pytest

from car_tf import train as train_cli
from car_tf.evaluation.predictors import SavedModelPredictor
from car_tf.models import create_model, lora, registry
from car_tf.models.vit import vision_transformer
from car_tf.training import config as run_config
from export.__main__ import export_run
from export.onnx_export import export_onnx
from export.parity import check_parity
from export.saved_model import deployable_model
from models.test_finetune import small_resnet_preset, small_vit_preset
from train_helpers import parse, tiny_args

TINY_VIT = "lora_test_vit"
SIZE, K, RANK = 16, 5, 2


@pytest.fixture(scope="module", autouse=True)
def tiny_vit():
    """car_tf's ViT at dim 16, 2 blocks, 2 heads, MLP 32, on 16x16 images: registered while these tests run."""
    registry.register_model(TINY_VIT, input_shape=(SIZE, SIZE, 3))(
        lambda x: vision_transformer(x, patch_size=4, dim=16, depth=2, num_heads=2, mlp_dim=32)
    )
    yield TINY_VIT
    registry._MODELS.pop(TINY_VIT)  # list_models() is checked elsewhere


@pytest.fixture(scope="module")
def hub_preset(tmp_path_factory):
    """keras-hub's ViTBackbone at hidden 16, 2 layers, 2 heads, MLP 32, on 16x16 images (patch 8)."""
    return small_vit_preset(tmp_path_factory.mktemp("hub") / "vit", image_size=SIZE)


def build(family, hub_preset, rank=RANK):
    keras.utils.set_random_seed(0)
    if family == "vit":
        return create_model(TINY_VIT, K, lora_rank=rank)
    return create_model("keras_hub", K, weights=str(hub_preset), input_shape=(SIZE, SIZE, 3), lora_rank=rank)


def images(n=8, seed=1):
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def train(model, steps=3):
    """A few SGD steps of cross-entropy on random images and labels."""
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = images(), np.random.default_rng(2).integers(0, K, 8)
    for _ in range(steps):
        model.train_on_batch(x, y)
    return model


def is_adapter(path):
    return path.endswith(("lora_kernel_a", "lora_kernel_b"))


# Trainable numbers: per adapted layer r * (prod(kernel.shape[:-1]) + d_out), plus the head 16 * 5 + 5.
# car_tf ViT, all 6 projections of each of 2 blocks: query/key/value kernels (16, 2, 8) -> r * (32 + 8),
# attention output (2, 8, 16) -> r * (16 + 16), MLP 16 -> 32 -> 16: r * 48 twice; 2 * 248 r = 992 at r = 2.
# keras-hub ViT, query and value of each of 2 blocks: 4 * r * (32 + 8) = 320 at r = 2.
TRAINABLE = {"vit": 992 + 85, "keras_hub": 320 + 85}
ADAPTED = {"vit": ["query", "key", "value", "attention_output", "block1_mlp1", "block1_mlp2",
                   "query", "key", "value", "attention_output", "block2_mlp1", "block2_mlp2"],
           "keras_hub": ["query", "value", "query", "value"]}


@pytest.mark.parametrize("family", ["vit", "keras_hub"])
def test_only_the_adapters_and_the_head_train(family, hub_preset):
    model = build(family, hub_preset)
    adapted = lora.adapted_layers(model)
    assert [layer.name for layer in adapted] == ADAPTED[family]
    by_shape = sum(RANK * (np.prod(layer.kernel.shape[:-1]) + layer.kernel.shape[-1]) for layer in adapted)
    head = model.get_layer("classifier")
    assert lora.trainable_parameter_count(model) == by_shape + head.count_params() == TRAINABLE[family]
    assert {v.path for v in model.trainable_weights} == (
        {v.path for layer in adapted for v in (layer.lora_kernel_a, layer.lora_kernel_b)}
        | {v.path for v in head.weights}
    )
    before = {v.path: v.numpy().copy() for v in model.weights}
    train(model)
    moved = {v.path for v in model.weights if not np.array_equal(v.numpy(), before[v.path])}
    assert moved == {v.path for v in model.trainable_weights}  # every adapter (A from the second step) and the head


def test_vit_s16_trainable_count_is_the_readme_number():
    """vit_s16, 100 classes, rank 8: 12 blocks x 11,712 r adapter numbers + the 384 x 100 + 100 head."""
    model = create_model("vit_s16", 100, input_shape=(32, 32, 3), lora_rank=8)
    assert len(lora.adapted_layers(model)) == 72
    assert sum(lora.lora_parameter_count(layer) for layer in lora.adapted_layers(model)) == 1_124_352
    assert lora.trainable_parameter_count(model) == 1_162_852
    assert model.count_params() - 1_124_352 == 21_630_436  # the network without adapters


@pytest.mark.parametrize("family", ["vit", "keras_hub"])
def test_merged_copy_is_a_plain_network_computing_the_same(family, hub_preset):
    model = train(build(family, hub_preset))
    merged = lora.merged_copy(model)
    assert not lora.adapted_layers(merged)
    assert not any(is_adapter(v.path) for v in merged.weights)
    plain = build(family, hub_preset, rank=0)
    assert [v.shape for v in merged.weights] == [v.shape for v in plain.weights]
    x = images(16, seed=3)
    np.testing.assert_allclose(merged(x), model(x), atol=1e-5)
    assert lora.merged_copy(plain) is plain


@pytest.mark.parametrize("family", ["vit", "keras_hub"])
def test_checkpoints_keep_the_adapters_and_load_anywhere_as_the_merged_network(family, hub_preset, tmp_path):
    model = train(build(family, hub_preset))
    path = tmp_path / "c.weights.h5"
    model.save_weights(path)  # what checkpointing.save writes
    restored = build(family, hub_preset)
    restored.load_weights(path)
    for got, want in zip(restored.weights, model.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=want.path)  # W, A and B, not W + AB
    x = images(4, seed=4)
    plain = build(family, hub_preset, rank=0)
    plain.load_weights(path)  # Keras's own format: the merged kernels
    np.testing.assert_allclose(plain(x), model(x), atol=1e-5)
    # A plain network's weights become a LoRA model's base: adapters start afresh (A random, B zero).
    plain.save_weights(tmp_path / "plain.weights.h5")
    fresh = build(family, hub_preset)
    fresh.load_weights(tmp_path / "plain.weights.h5")
    np.testing.assert_allclose(fresh(x), model(x), atol=1e-5)
    for layer in lora.adapted_layers(fresh):
        assert np.any(layer.lora_kernel_a.numpy()) and not np.any(layer.lora_kernel_b.numpy())


def test_backbones_without_dense_layers_and_clashing_flags_are_refused(hub_preset, tmp_path):
    with pytest.raises(ValueError, match=r"^lora_rank=2 adapts Dense and EinsumDense layers, and the backbone of "
                                         r"resnet32 has none; use a ViT"):
        create_model("resnet32", 3, input_shape=(32, 32, 3), lora_rank=2)
    resnet = small_resnet_preset(tmp_path / "resnet")
    with pytest.raises(ValueError, match=r"keras-hub backbone \w+ has none \(a CNN\)"):
        create_model("keras_hub", 3, weights=str(resnet), input_shape=(32, 32, 3), lora_rank=2)
    with pytest.raises(ValueError, match=r"^--lora_rank=-1 must be at least 0"):
        run_config.ModelConfig(lora_rank=-1)
    with pytest.raises(ValueError, match=r"cannot be combined with --frozen_backbone; drop one of them\.$"):
        run_config.ModelConfig(lora_rank=4, frozen_backbone=True)
    assert create_model("resnet32", 3, input_shape=(32, 32, 3), lora_rank=0).trainable_weights  # 0: off


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vit", "keras_hub"])
def test_export_of_a_lora_model_is_plain_and_passes_the_parity_check(family, hub_preset, tmp_path):
    """SavedModel for both; ONNX for car_tf's ViT (keras-hub's ViT computes GELU with Erfc, an op
    tf2onnx 1.17 cannot convert, with or without LoRA)."""
    model = train(build(family, hub_preset))
    deployable = deployable_model(model)
    assert not lora.adapted_layers(deployable) and not any(is_adapter(v.path) for v in deployable.weights)
    pixels = np.random.default_rng(5).integers(0, 256, (32, SIZE, SIZE, 3)).astype(np.uint8)
    if family == "vit":  # ONNX of the merged network, against the model with its trained, non-zero adapters
        differences = export_onnx(deployable, tmp_path / "m.onnx", pixels, reference=model)
        assert max(differences.values()) <= 1e-4
    # python -m export on a run directory holding the model.keras training writes.
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "model.keras")
    info = {"num_classes": K, "class_names": list("abcde"), "train_counts": [5] * K, "image_size": SIZE}
    (run / "run.json").write_text(json.dumps(info))
    summary = export_run(run, "both" if family == "vit" else "saved_model", output_dir=tmp_path / "export")
    assert max(summary["saved_model"]["max_abs_diff_probabilities"].values()) <= 1e-4
    served = SavedModelPredictor(tmp_path / "export" / "saved_model").predict(pixels)
    check_parity(lambda x: keras.ops.softmax(model(x.astype(np.float32))), lambda x: served[: len(x)], pixels,
                 what="merged SavedModel", batch_sizes=(32,))
    if family == "vit":
        assert max(summary["onnx"]["max_abs_diff_logits"].values()) <= 1e-4


@pytest.mark.slow
def test_a_lora_run_resumes_exactly(tiny_folder, tmp_path):
    """Two epochs straight, or one epoch then --epochs=2 from its checkpoint: the same weights."""
    def run(model_dir, epochs):
        flags = parse(tiny_args(tiny_folder, model_dir, f"--model={TINY_VIT}", f"--lora_rank={RANK}",
                                f"--epochs={epochs}"))
        return train_cli.train_and_evaluate(flags)

    run(tmp_path / "straight", 2)
    run(tmp_path / "resumed", 1)
    run(tmp_path / "resumed", 2)
    weights = [keras.saving.load_model(tmp_path / name / "model.keras", compile=False).get_weights()
               for name in ("straight", "resumed")]
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)
    assert "--lora_rank=2" in (tmp_path / "straight" / "flags.txt").read_text().splitlines()
