"""ConCutMix's released hyper-parameters per data set: the one source of the defaults of
ConCutMixSettings (the --ccm_* flags: the CIFAR-100-LT column), ConCutMixModel and concutmix_stage."""

# Released settings (Pan et al., TIP 2024, arXiv 2407.04911). "tau" is the logit-adjustment strength of the CE term
# (released range 0.75-1.0 on CIFAR); the model keys match ConCutMixModel's arguments. No
# l_d_warm or batch size is published for ImageNet-LT / iNaturalist: l_d_warm keeps the CIFAR value
# (so with 90 or 100 epochs rectification starts late or never) and batch_size is left out.
_CIFAR = {
    "backbone": "resnet32",
    "projection_dim": 128,
    "alpha": 2.0,
    "beta": 0.6,
    "temperature": 0.1,
    "tau": 1.0,
    "l_d_warm": 100,
    "top_k": 30,
    "omega": 20 / 255,
    "cutmix_prob": 0.5,
    "epochs": 200,
    "batch_size": 256,
    "optimizer": "sgd",
    "momentum": 0.9,
    "learning_rate": 0.15,
    "weight_decay": 5e-4,
    "warmup_epochs": 5,
    "lr_schedule": "step",
    "lr_decay_epochs": (160, 180),
    "augment": "autoaugment",
}
_IMAGENET_LT = {
    **{key: value for key, value in _CIFAR.items() if key != "batch_size"},
    "backbone": "resnet50",
    "cosine_classifier_scale": 30.0,
    "projection_dim": 1024,
    "alpha": 1.0,
    "beta": 0.35,
    "temperature": 0.07,
    "tau": 0.99,
    "top_k": 30,
    "omega": 200 / 255,
    "epochs": 90,
    "learning_rate": 0.1,
    "weight_decay": 5e-4,
    "warmup_epochs": 0,
    "lr_schedule": "cosine",
    "lr_decay_epochs": (),
    "augment": "randaugment_n2_m10",
}
CONCUTMIX_DEFAULTS = {
    "cifar10": {**_CIFAR, "top_k": 3, "omega": 2 / 255},
    "cifar100": dict(_CIFAR),
    "imagenet_lt": _IMAGENET_LT,
    "inat2018": {
        **_IMAGENET_LT,
        "epochs": 100,
        "learning_rate": 0.2,
        "weight_decay": 1e-4,
        "omega": 1628 / 255,
    },
}

CIFAR = CONCUTMIX_DEFAULTS["cifar100"]  # the defaults of the flags and of the library classes
