"""DLSA's cascade of flow filters and its label-space mapping (Xu et al., ECCV 2022, arXiv 2208.02567).

Stage s (s = 0 .. depth-1) trains a new flow on the samples still remaining, keeps the
``keep_fraction`` of them with the highest log-likelihood (threshold = the train-derived
quantile, so any sample with log p(x) >= threshold is taken) for stage s's classifier and passes
the rest on. Whatever is left after the last filter goes to the final classifier, which sees the
last flow's latent. Test samples follow the same flows and thresholds, so every sample lands in
exactly one of depth + 1 classifiers.

Label-space mapping: the prior of cluster k at stage s is the class histogram of that stage's
training samples (all the samples its flow was fitted to) whose argmax component is k; a cluster
no training sample falls into gets the stage's overall class frequencies.
"""

import dataclasses

import numpy as np

from car_tf.data.longtail import GROUPS, class_groups
from car_tf.dlsa.flow import MaskedAutoregressiveFlow
from car_tf.dlsa.flow_training import FlowTrainer, FlowTrainingConfig, flow_log_probs_and_latents


@dataclasses.dataclass
class CascadeStage:
    """One trained filter: its flow, log-likelihood threshold and cluster -> class prior [C, K]."""

    flow: MaskedAutoregressiveFlow
    threshold: float
    cluster_prior: np.ndarray
    history: dict


@dataclasses.dataclass
class Routing:
    """Where each sample goes: ``stage`` in [0, depth] (depth = final classifier), the latent of the
    flow that routed it (the last flow for the final stage), that flow's log p(x) and cluster."""

    stage: np.ndarray
    latent: np.ndarray
    log_prob: np.ndarray
    cluster: np.ndarray


def likelihood_threshold(log_probs, keep_fraction):
    """The round(keep_fraction * N)-th largest log-likelihood (+inf when that count is 0)."""
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction={keep_fraction} must lie in [0, 1]; DLSA uses 0.3.")
    keep = int(round(keep_fraction * len(log_probs)))
    if keep == 0:
        return float("inf")
    return float(np.sort(np.asarray(log_probs))[::-1][keep - 1])


def cluster_class_prior(clusters, labels, num_components, num_classes):
    """Row k: class histogram (normalised) of the samples in cluster k; empty clusters get the
    overall class frequencies of the samples."""
    histogram = np.zeros((num_components, num_classes), np.float64)
    np.add.at(histogram, (np.asarray(clusters), np.asarray(labels)), 1.0)
    overall = np.bincount(labels, minlength=num_classes) / max(len(labels), 1)
    sizes = histogram.sum(axis=1, keepdims=True)
    prior = np.where(sizes > 0, histogram / np.maximum(sizes, 1.0), overall[None, :])
    return prior.astype(np.float32)


def train_cascade(
    features,
    labels,
    num_classes,
    *,
    depth=1,
    keep_fraction=0.3,
    flow_options=None,
    training=FlowTrainingConfig(),
    progress=False,
):
    """Trains ``depth`` flow filters; returns the list of ``CascadeStage``.

    Args:
        features: float32 [N, D] training features; labels: int [N] in [0, num_classes).
        depth: number of filter stages (>= 1).
        keep_fraction: share of each stage's samples taken by that stage's classifier.
        flow_options: keyword arguments of ``MaskedAutoregressiveFlow`` (the seed is offset per stage).
        training: ``FlowTrainingConfig`` of every flow (its sampling seed is the flow's, offset per stage).
    """
    if depth < 1:
        raise ValueError(f"depth={depth} must be at least 1; DLSA uses 1, or 3 with strong features.")
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels, np.int64)
    options = dict(flow_options or {})
    base_seed = options.pop("seed", 0)
    remaining = np.arange(len(labels))
    stages = []
    for s in range(depth):
        flow = MaskedAutoregressiveFlow(seed=base_seed + 1000 * s, name=f"flow_{s}", **options)
        history = FlowTrainer(flow, training, seed=base_seed + s).fit(
            features[remaining], labels[remaining], progress=progress
        )
        log_probs, latents = flow_log_probs_and_latents(flow, features[remaining])
        threshold = likelihood_threshold(log_probs, keep_fraction)
        clusters = np.asarray(flow.clusters(latents))
        prior = cluster_class_prior(
            clusters, labels[remaining], flow.num_components, num_classes
        )
        stages.append(CascadeStage(flow, threshold, prior, history))
        remaining = remaining[log_probs < threshold]
    return stages


def route(stages, features):
    """Routes samples through the trained filters; returns a ``Routing``."""
    features = np.asarray(features, np.float32)
    num_samples = len(features)
    stage = np.full(num_samples, len(stages), np.int32)
    latent = np.zeros_like(features)
    log_prob = np.full(num_samples, np.nan, np.float32)
    cluster = np.zeros(num_samples, np.int32)
    remaining = np.arange(num_samples)
    for s, cascade_stage in enumerate(stages):
        if remaining.size == 0:
            break
        lp, z = flow_log_probs_and_latents(cascade_stage.flow, features[remaining])
        latent[remaining] = z
        log_prob[remaining] = lp
        cluster[remaining] = np.asarray(cascade_stage.flow.clusters(z))
        taken = lp >= cascade_stage.threshold
        stage[remaining[taken]] = s
        remaining = remaining[~taken]
    return Routing(stage, latent, log_prob, cluster)


def stage_side_inputs(stages, routing, stage):
    """(indices, side inputs) of the samples routed to ``stage``: [z; prior of z's cluster] for a
    filter stage, z alone for the final stage."""
    indices = np.flatnonzero(routing.stage == stage)
    z = routing.latent[indices]
    if stage == len(stages):
        return indices, z
    prior = stages[stage].cluster_prior[routing.cluster[indices]]
    return indices, np.concatenate([z, prior], axis=1)


def routing_statistics(stage_ids, labels, train_counts, depth):
    """Per stage (depth filters + final), how many samples of each many/medium/few group it takes."""
    groups = class_groups(train_counts)[np.asarray(labels)]
    stage_ids = np.asarray(stage_ids)
    rows = []
    for s in range(depth + 1):
        taken = stage_ids == s
        row = {"stage": s, "classifier": "final" if s == depth else "filtered"}
        row.update({name: int(np.sum(taken & (groups == name))) for name in GROUPS})
        row["total"] = int(taken.sum())
        rows.append(row)
    return rows
