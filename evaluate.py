"""Evaluation: anomaly scores, ROC AUC and figures (paper §4, eq. (1), Fig. 4 and Fig. 5).

For every test image one model gives several scores, all oriented so that higher means more
anomalous: A(x) of eq. (1) with each reconstruction distance (``rel-perc-l1``, ``perc-l1``,
``perc`` of eq. 2, pixel ``l1`` and ``mse``) between x and G(E(x)); ``critic`` = -D_X(x) (the
image critic scores real-looking images high; its minibatch-stddev group is the image and fixed
training images, :func:`critic_reference`); and ``latent-norm`` = ‖E(x)‖₂ (Berg et al.'s score).
The primary score is the training loss for PIAD and ``latent-norm`` for ``--method latent-norm``.
No score depends on the other images scored with it (no batch or test-set statistic).

From a score to a decision (not in the paper): with ``--calibration F`` the threshold is an order
statistic of the primary score of held-out normal training images (:func:`calibrate`); an image is
``anomalous`` when its score exceeds it. Without a calibration set no threshold is made.

Writes to the run folder: ``metrics.json`` (ROC AUC and average precision of every score, the
threshold and its test FPR, TPR, precision, F1, the run's settings and provenance),
``scores.csv`` (one row per test image; ``anomalous`` with a threshold), ``roc.png``, ``pr.png``,
``reconstructions.png`` (x above G(E(x)), normal then anomalous, as Fig. 4), ``extremes.png``
(least and most anomalous test images and the maps of the latter, as Fig. 5), ``curves.png``
(log.csv's losses and γ over the iterations) and, for latent-norm runs, ``latent_norms.png`` (histogram of ‖E(x)‖₂). D_X's reference images and the
threshold are stored in the checkpoint (``scoring``), so every later scoring uses the same ones.

``python evaluate.py --checkpoint RUN/checkpoint.pt [--images DIR]`` re-evaluates a saved run,
or scores a folder of new, unlabelled images and writes their anomaly maps (``piad.anomaly_map``:
eq. (4) position by position, summing to A(x)) as ``maps_NAME.npz`` and overlays;
``--export scorer.pt2`` writes the scorer as one ``torch.export`` program (module ``export``).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import calibration
import checkpoint
import data as data_mod
import errors
import features
import figures
import losses
import piad
import readers
import rundir
from baselines import knn
from berg import latent_norm, system
from config import DEVICES, TrainConfig, resolve_device
from tools import export, provenance

SCORES = (*losses.KINDS, "critic", "latent-norm")  # every distance of eq. (1), −D_X(x), ‖E(x)‖
REFERENCE_STREAM = 28  # D_X's reference images: default_rng([seed, 28]) (calibration.CALIBRATION_STREAM: 27)
SCORING_ORDER_SEED = 0  # compute_scores' order of items


def _has_features(rec_loss) -> bool:
    return rec_loss is not None and rec_loss.features is not None and hasattr(rec_loss, "mean")


def _distance(rec_loss, kind: str, device=None) -> losses.ReconstructionLoss:
    """A per-sample distance of eq. (1), unchecked range; feature kinds use the run's VGG features
    and statistics (those of ``rec_loss``)."""
    if kind in losses.PIXEL_KINDS:
        return losses.ReconstructionLoss(kind=kind, reduction="none", check_range=False)
    return losses.ReconstructionLoss(kind=kind, features=rec_loss.features, stats=_stats_of(rec_loss),
                                     reduction="none", impl=rec_loss.impl,
                                     check_range=False).to(device or rec_loss.mean.device)


def map_kind(rec_loss) -> str:
    """The distance of the anomaly maps: eq. (4) (``rel-perc-l1``) with the run's VGG features and
    statistics, whatever the training loss; pixel ``l1`` if the run has no VGG features; a k-NN's own."""
    if isinstance(rec_loss, knn.KNN):
        return knn.SCORE
    return "rel-perc-l1" if _has_features(rec_loss) else "l1"


def map_loss(rec_loss) -> losses.ReconstructionLoss:
    """The loss that draws the anomaly maps, of kind :func:`map_kind`."""
    return _distance(rec_loss, map_kind(rec_loss))


@torch.no_grad()
def compute_scores(model: piad.PIAD | latent_norm.Networks, ds, rec_loss, *, batch_size: int = 256, device=None,
                   centre: torch.Tensor | None = None, maps: bool = False,
                   reference: torch.Tensor | None = None) -> tuple[dict, np.ndarray]:
    """All scores for every item of ``ds`` (items ``(image, label)``); returns (scores, labels).
    With ``maps``, ``scores["map"]`` holds the anomaly map of every image, (N, h, w), which sums to
    its score ``map_kind(rec_loss)`` (``piad.anomaly_map``).

    Eq. (1) with every reconstruction distance (``piad.anomaly_score``), ‖E(x)‖ (and, with
    ``centre``, ‖E(x) - centre‖: ``latent_norm.code_norms``) and -D_X(x) (:func:`critic_score`:
    with ``reference``, :func:`critic_reference`, no score depends on the batch; without it
    D_X's minibatch stddev of PIAD's networks sees the batch). Items are scored in a fixed random
    order (seed 0) and returned in dataset order (without ``reference``, batches in storage order,
    normal first, would let the critic score depend on the label mix of its batch).
    """
    if isinstance(model, knn.KNN):  # baselines/knn.py: distances to the training features, no networks
        return model.scores(ds, batch_size=batch_size, maps=maps)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    feature_losses = ({k: _distance(rec_loss, k, device) for k in ("rel-perc-l1", "perc-l1", "perc")}
                      if _has_features(rec_loss) else {})
    pixel = {k: _distance(rec_loss, k) for k in losses.PIXEL_KINDS}
    amap = {**pixel, **feature_losses}[map_kind(rec_loss)] if maps else None  # one of the distances, reused

    def distances(x, xr) -> dict:  # every L(x, G(E(x))) of eq. (1), VGG features computed once
        out = {k: L(x, xr) for k, L in pixel.items()}
        if feature_losses:
            fx, fy = rec_loss.features(x), rec_loss.features(xr)
            out.update({k: L(x, xr, fx=fx, fy=fy) for k, L in feature_losses.items()})
        if amap is not None:  # the same reconstruction and features, position by position
            out["map"] = amap.map(x, xr, fx=fx, fy=fy) if feature_losses else amap.map(x, xr)
        return out

    out: dict[str, list] = {}
    labels = []
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(SCORING_ORDER_SEED))
    for x, y in DataLoader(Subset(ds, order.tolist()), batch_size=batch_size, shuffle=False, num_workers=0):
        x = x.to(device)
        batch = piad.anomaly_score(model, x, distances, batch_size=len(x))  # eq. (1)
        batch["critic"] = critic_score(model, x, reference)
        # (b, *latent_shape): one E pass for both norms; pgan: each image grouped with fixed
        # training images only (pgan.PGAN.encode), so no test image's code depends on another's
        z = model.encode(x)
        batch["latent-norm"] = latent_norm.code_norms(z)
        if centre is not None:
            batch["latent-norm-centred"] = latent_norm.code_norms(z, centre)
        for k, v in batch.items():
            out.setdefault(k, []).append(v.float().cpu())
        labels.append(torch.as_tensor(y))
    model.train(was_training)
    inverse = torch.argsort(order)  # back to dataset order
    return ({k: torch.cat(v)[inverse].numpy() for k, v in out.items()},
            torch.cat(labels)[inverse].numpy())


def critic_score(model, x: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """-D_X(x), (B,). PIAD's D_X (``piad.ImageCritic``) with ``reference`` (R, C, S, S): each image's
    minibatch-stddev group is itself and the R reference images only (the layers before it are per
    image; ``piad.MinibatchStdDev`` of group R + 1 over [h(x), h(ref) repeated], as
    ``pgan.PGAN.encode`` groups E); pGAN models group D with their own ``reference`` images."""
    dx, b = model.image_critic, x.shape[0]
    at = [i for i, m in enumerate(dx) if isinstance(m, piad.MinibatchStdDev)] if isinstance(dx, nn.Sequential) else []
    if reference is not None and at:
        layers = list(dx)
        body, head = nn.Sequential(*layers[:at[0]]), nn.Sequential(*layers[at[0] + 1:])
        h, ref = body(x), body(reference.to(x.device, x.dtype))
        grouped = piad.MinibatchStdDev(len(ref) + 1, layers[at[0]].eps)(torch.cat([h, ref.repeat_interleave(b, 0)]))
        return -head(grouped[:b]).flatten()
    if reference is None and getattr(model, "reference", None) is not None:  # pgan.PGAN: groups of 4
        return -dx(torch.cat([x, model.reference.to(x.dtype).repeat_interleave(b, dim=0)]))[:b].flatten()
    return -dx(x).flatten()


def critic_reference(model, train, *, batch_size: int, seed: int) -> torch.Tensor | None:
    """The training images that share each scored image's minibatch-stddev group in PIAD's D_X
    (:func:`critic_score`): a group as D_X saw real images in training (the whole minibatch,
    ``mbstd_group`` 0, or groups of ``mbstd_group``: ``piad.MinibatchStdDev``'s rule) less one,
    drawn from ``train`` with ``default_rng([seed, REFERENCE_STREAM])``. None for other networks."""
    if not isinstance(model, piad.PIAD):
        return None
    g = min(model.config.mbstd_group, batch_size) if model.config.mbstd_group > 0 else batch_size
    group = batch_size if batch_size % g else g
    rng = np.random.default_rng([seed, REFERENCE_STREAM])
    idx = rng.choice(len(train), group - 1, replace=len(train) < group - 1)
    return torch.stack([train[int(i)][0] for i in idx]) if len(idx) else torch.empty(0, *train[0][0].shape)


def _stats_of(rec_loss) -> features.FeatureStats:
    f = rec_loss.features
    return features.FeatureStats(rec_loss.mean.cpu(), rec_loss.std.cpu(), f.weights_id, f.layer, 0)


def roc_aucs(scores: dict, labels: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        raise ValueError("the test set needs both normal and anomalous images for ROC AUC")
    return {k: float(roc_auc_score(labels, v)) if np.isfinite(v).all() else float("nan")
            for k, v in scores.items()}


def average_precisions(scores: dict, labels: np.ndarray) -> dict:
    """Average precision of every score, anomaly = positive: Σ_n (R_n − R_{n−1}) P_n over the
    thresholds (``sklearn.metrics.average_precision_score``; no trapezoid, which would give a
    constant detector (1 + prevalence) / 2)."""
    from sklearn.metrics import average_precision_score

    return {k: float(average_precision_score(labels, v)) if np.isfinite(v).all() else float("nan")
            for k, v in scores.items()}


def f1_max_oracle(score: np.ndarray, labels: np.ndarray) -> float:
    """The best F1 over all thresholds of ``score``: chosen with the test labels, so no detector
    can attain it on new images (named ``f1_max_oracle`` wherever it is reported)."""
    from sklearn.metrics import precision_recall_curve

    if not np.isfinite(score).all():
        return float("nan")
    p, r, _ = precision_recall_curve(labels, score)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    return float(f1.max())


def calibrate(scores: np.ndarray, target_fpr: float, score: str) -> dict:
    """The threshold of ``score`` from its values on the calibration (normal) images: the
    :func:`calibration.calibration_rank`-th smallest; an image is anomalous when its score is above it."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if not np.isfinite(s).all():
        raise ValueError(f"non-finite {score} scores on the calibration images: no threshold")
    n, k = len(s), calibration.calibration_rank(len(s), target_fpr)
    return {"score": score, "threshold": float(s[k - 1]), "target_fpr": target_fpr, "n_calibration": n,
            "rank": k, "expected_fpr": (n + 1 - k) / (n + 1),
            "rule": "k-th smallest calibration score, k = ceil((n+1)(1-target_fpr)); anomalous: score > threshold",
            "calibration_scores": {"min": float(s[0]), "median": float(np.median(s)), "mean": float(s.mean()),
                                   "max": float(s[-1])}}


def decide(scores: dict, threshold: dict | None) -> np.ndarray | None:
    """0/1 per image: its ``threshold["score"]`` above ``threshold["threshold"]``; None without a threshold."""
    return None if threshold is None else (scores[threshold["score"]] > threshold["threshold"]).astype(np.int64)


def decision_metrics(anomalous: np.ndarray, labels: np.ndarray) -> dict:
    """FPR, TPR, precision and F1 of 0/1 decisions against the labels (1 = anomalous); a ratio
    with nothing to count (precision when nothing is flagged) is None."""
    a, y = np.asarray(anomalous, bool), np.asarray(labels, bool)
    tp, fp, fn, tn = int((a & y).sum()), int((a & ~y).sum()), int((~a & y).sum()), int((~a & ~y).sum())

    def ratio(num, den):
        return num / den if den else None
    return {"test_fpr": ratio(fp, fp + tn), "test_tpr": ratio(tp, tp + fn), "test_precision": ratio(tp, tp + fp),
            "test_f1": ratio(2 * tp, 2 * tp + fp + fn), "test_flagged": int(a.sum())}


def _feature_loss(rec_loss, config, data, model):
    """The training loss if it has VGG features, else one built for scoring (pixel-loss runs)."""
    if rec_loss is not None and rec_loss.features is not None:
        return rec_loss
    try:
        device = next(model.parameters()).device
        loss, _ = features.build_loss("rel-perc-l1", weights=config.vgg_weights, stats=config.stats, impl=config.impl,
                                      device=device, train_batches=data_mod.image_batches(data.train, device))
        return loss
    except (FileNotFoundError, RuntimeError) as exc:  # no VGG weights here: pixel scores only
        warnings.warn(f"perceptual scores skipped: {exc}")
        return rec_loss


def primary_score(config) -> str:
    return {"latent-norm": "latent-norm", "knn": knn.SCORE}.get(config.method, config.loss)


def scoring_state(model, train, calibration, feature_loss, config) -> dict:
    """What every later scoring of the run reuses (stored in its checkpoint as ``scoring``): D_X's
    reference images (:func:`critic_reference`) and, with a calibration set, the threshold
    (:func:`calibrate`) of the primary score on it; ``threshold`` None without one."""
    reference = critic_reference(model, train, batch_size=config.batch_size, seed=config.seed)
    if calibration is None:
        return {"reference": reference, "threshold": None,
                "note": "no calibration set (--calibration 0): no threshold, no decisions"}
    cal, _ = compute_scores(model, calibration, feature_loss, reference=reference)
    try:
        return {"reference": reference, "threshold": calibrate(cal[primary_score(config)], config.target_fpr,
                                                               primary_score(config))}
    except ValueError as exc:  # after training: said, and no threshold, rather than no evaluation
        warnings.warn(str(exc))
        return {"reference": reference, "threshold": None, "note": str(exc)}


def store_scoring(path, scoring: dict) -> None:
    """Adds ``scoring`` (:func:`scoring_state`) to the checkpoint at ``path`` (atomically)."""
    state = checkpoint.load_checkpoint(path)
    state["scoring"] = scoring
    checkpoint.save_checkpoint(Path(path), state)


def evaluate_run(run, *, model, data, rec_loss, config, extra: dict | None = None, scoring: dict | None = None,
                 checkpoint_path=None) -> dict:
    """Scores the protocol's test set and writes every output file into ``run``. ``scoring``: the
    checkpoint's (:func:`scoring_state`); when None it is made and, with ``checkpoint_path``,
    stored there."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    prior = latent_norm.encode_prior(model) if config.method == "latent-norm" else None  # z, E(G(z))
    test, seen = system.as_trained(model, data.test) if config.method == "latent-norm" else (data.test, {})
    if system.resolution_note(seen):  # a pGAN stopped before its final resolution
        print(system.resolution_note(seen), file=sys.stderr, flush=True)
    feature_loss = _feature_loss(rec_loss, config, data, model)
    if scoring is None:
        calibration = data.calibration
        if calibration is not None and config.method == "latent-norm":
            calibration = system.as_trained(model, calibration)[0]  # scored as the test images are
        scoring = scoring_state(model, data.train, calibration, feature_loss, config)
        if checkpoint_path is not None and Path(checkpoint_path).is_file():
            store_scoring(checkpoint_path, scoring)
    scores, labels = compute_scores(model, test, feature_loss, reference=scoring["reference"],
                                    centre=None if prior is None else prior[1].mean(0))  # E's image of 0
    aucs, aps = roc_aucs(scores, labels), average_precisions(scores, labels)
    main, threshold = primary_score(config), scoring["threshold"]
    anomalous = decide(scores, threshold)
    metrics = {
        "roc_auc": aucs[main], "average_precision": aps[main], "score": main, "roc_auc_per_score": aucs,
        "average_precision_per_score": aps, "f1_max_oracle": f1_max_oracle(scores[main], labels),  # test labels
        "threshold": None if threshold is None else {**threshold, **decision_metrics(anomalous, labels)},
        **({} if threshold else {"threshold_note": scoring.get("note", "no threshold stored")}),
        "dataset": config.dataset, "normal": data.normal, "method": config.method, "loss": config.loss,
        "seed": config.seed, "contamination": data.contamination, "protocol": data.protocol,
        "weights_policy": config.weights_policy, "vgg_weights": getattr(rec_loss, "weights_id", None),
        "n_train": len(data.train), "n_calibration": 0 if data.calibration is None else len(data.calibration),
        "n_test": int(len(labels)), "n_test_anomalous": int(labels.sum()),
        "seeds": {"seed": config.seed, "reseed": config.reseed, "calibration": data.info.get("calibration_seed"),
                  "critic_reference": [config.seed, REFERENCE_STREAM], "scoring_order": SCORING_ORDER_SEED},
        "provenance": provenance.record(next(model.parameters()).device),
        **seen, **(extra or {})}
    rundir.write_text(run / "metrics.json", json.dumps(metrics, indent=2))
    write_scores_csv(run / "scores.csv", data.test_ids, scores, labels, anomalous=anomalous)
    title = f"{config.dataset}, normal {data.normal}"
    t = metrics["threshold"]
    figures.plot_roc(run / "roc.png", scores, labels, aucs, title=title,
                     mark=t and (main, t["test_fpr"], t["test_tpr"], t["threshold"]))
    figures.plot_pr(run / "pr.png", scores, labels, aps, title=title,
                    mark=t and (main, t["test_tpr"], t["test_precision"], t["threshold"]))
    if config.method == "knn":  # no reconstructions, no log.csv; its own maps
        print(knn.NOT_WRITTEN, file=sys.stderr, flush=True)
        figures.plot_extremes(run / "extremes.png", test, scores[main], f"{main}: ROC AUC {aucs[main]:.3f}",
                              map_fn=lambda idx, x: model.map(x).cpu(), map_kind=knn.SCORE)
        return metrics
    figures.plot_reconstructions(run / "reconstructions.png", model, test, labels)
    amap = map_loss(feature_loss)
    figures.plot_extremes(run / "extremes.png", test, scores[main], f"{main}: ROC AUC {aucs[main]:.3f}",
                          map_fn=lambda idx, x: piad.anomaly_map(model, x, amap.map), map_kind=amap.kind)
    if config.method == "latent-norm":
        latent_norm.plot_latent_norms(run / "latent_norms.png", scores, labels, prior, title=title)
    figures.plot_curves(run / "curves.png", run / "log.csv")  # the run's training curves, where its log is
    return metrics


def write_scores_csv(path, ids, scores: dict, labels=None, anomalous=None) -> None:
    """One row per image: id, label (when known), anomalous (0/1, with a threshold), every score.
    An id that is a file name not valid in UTF-8 is written readable (``readers.readable``)."""
    names, fh = list(scores), io.StringIO()
    w = csv.writer(fh)
    w.writerow(["id"] + (["label"] if labels is not None else []) + (["anomalous"] if anomalous is not None
                                                                       else []) + names)
    for i, ident in enumerate(ids):
        w.writerow([readers.readable(ident)] + ([int(labels[i])] if labels is not None else [])
                   + ([int(anomalous[i])] if anomalous is not None else [])
                   + [f"{scores[k][i]:.6g}" for k in names])
    rundir.write_text(path, fh.getvalue())


def write_maps(out: Path, name: str, ids: list[str], maps: np.ndarray, ds, scores: dict, kind: str,
               folder) -> None:
    """Beside ``scores_NAME.csv``: ``maps_NAME.npz`` (each image's (h, w) map under its id in the CSV),
    ``overlays_NAME/`` (one PNG per image, at the image file's relative path, the map over the image)
    and ``extremes_NAME.png`` (the most anomalous images by ``kind`` with their maps below)."""
    rundir.atomic_write(out / f"maps_{name}.npz",
                        lambda fh: np.savez(fh, **{readers.readable(ident): m for ident, m in zip(ids, maps)}))
    overlays = out / f"overlays_{name}"
    for ident, m, s in zip(ids, maps, scores[kind]):
        target = (overlays / os.path.relpath(ident, Path(folder).expanduser())).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        figures.plot_overlay(target, ident, torch.from_numpy(m), float(s), label=kind)
    if len(ids) >= 2:
        figures.plot_extremes(out / f"extremes_{name}.png", ds, scores[kind], f"{readers.readable(name)}, {kind}",
                              map_fn=lambda idx, x: torch.from_numpy(maps[idx]), map_kind=kind)  # already computed


def saved_model(state: dict, device) -> piad.PIAD | latent_norm.Networks:
    """The trained networks of a checkpoint's ``state`` (``checkpoint.load_checkpoint``), on ``device``:
    PIAD's; for ``--method latent-norm``, those of its ``--networks`` (``berg.system``)."""
    cfg = TrainConfig.from_saved(state["config"])
    if cfg.method == "latent-norm":
        model = system.saved_model(cfg.networks, state["preset"], state["channels"])
    else:
        model = piad.PIAD(config=piad.PIADConfig(**state["preset"]), channels=state["channels"])
    model.to(device).load_state_dict(state["model"])
    return model


def load_run(path, *, device="auto", data_root=None):
    """Rebuilds (checkpoint state, config, model, reconstruction loss) from what a checkpoint of
    train.py records: its settings, network preset, channels and VGG statistics.

    The checkpoint is loaded with ``weights_only=True`` (a file carrying pickled objects is
    refused); a missing, corrupt or foreign file, or VGG weights that cannot be loaded, raise
    :class:`errors.UserError`."""
    state = checkpoint.load_checkpoint(path, fix="--checkpoint takes the checkpoint.pt of a run of train.py")
    cfg = TrainConfig.from_saved(state["config"])
    if data_root:
        cfg.data_root = data_root
    dev = resolve_device(device)
    if cfg.method == "knn":  # baselines/knn.py: the feature bank is the model and its distance
        model = knn.KNN.from_state(state, cfg.vgg_weights, dev)
        return state, cfg, model, model
    with errors.user_errors(RuntimeError, KeyError, TypeError, ValueError,
                            prefix=f"checkpoint {path}: its networks do not load (damaged, or of another version): "):
        model = saved_model(state, dev).to(memory_format=cfg.memory_format)  # as trained: the same floats
    with errors.user_errors(OSError, ValueError, RuntimeError, prefix="the run's VGG weights: "):
        rec_loss, _ = features.build_loss(cfg.loss, weights=cfg.vgg_weights, impl=cfg.impl, device=dev,
                                          saved_stats=state["stats"])
    return state, cfg, model, rec_loss.to(memory_format=cfg.memory_format)


def _main(argv) -> None:
    p = argparse.ArgumentParser(prog="evaluate.py",
                                description="Evaluate a trained PIAD checkpoint, or score new images.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", default=None, help="folder of images to score (no labels needed); writes "
                   "scores_NAME.csv (with anomalous 0/1 when the run has a threshold), maps_NAME.npz, "
                   "overlays_NAME/ and extremes_NAME.png")
    p.add_argument("--export", default=None, metavar="FILE.pt2",
                   help="write the scorer (preprocessing, E, G, VGG, eq. (4), the threshold's decision) as one "
                        "torch.export program")
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --export file, or another run's evaluation in --out")
    errors.add_debug_flag(p)
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else Path(a.checkpoint).parent
    if out.exists() and not out.is_dir():
        raise errors.UserError(f"--out {out} is a file, not a folder")
    if a.export:  # checked, and its folder held, before anything loads
        target = Path(a.export)
        if target.exists() and target.resolve() == Path(a.checkpoint).resolve():
            raise errors.UserError(f"--export {a.export} is the checkpoint it reads; choose another file")
        if target.is_dir():
            raise errors.UserError(f"--export {a.export} is a folder; give a file name, e.g. {target / 'scorer.pt2'}")
        if target.exists() and not a.overwrite:
            raise rundir.Exists(f"--export {a.export} exists and is not replaced; choose another file, or pass "
                                "--overwrite to replace it")
        with rundir.claim(target.parent, what="--export's folder"):
            return _export(a)
    with rundir.claim(out):  # one process per folder, and out writable, before anything loads
        check_out(out, Path(a.checkpoint), a.overwrite)
        _evaluate_cli(a, out)


def check_out(out: Path, checkpoint_path: Path, overwrite: bool) -> None:
    """evaluate.py rewrites the evaluation (metrics, scores, figures) of the run it was given, in the
    checkpoint's folder or in ``--out``; it never replaces another run's (an ``--out`` holding a
    checkpoint, or the evaluation of another checkpoint) unless ``--overwrite``."""
    if overwrite or Path(out).resolve() == Path(checkpoint_path).resolve().parent:
        return
    others = [n for n in (checkpoint.CHECKPOINT, checkpoint.KEPT, "log.csv") if (Path(out) / n).exists()]
    if others:
        raise errors.UserError(f"--out {out} is another run's folder ({', '.join(others)}); its files are not "
                               "replaced: choose another --out, or pass --overwrite")
    metrics = Path(out) / "metrics.json"
    if metrics.exists():
        try:
            source = json.loads(metrics.read_text()).get("checkpoint")
        except (OSError, ValueError, AttributeError):
            source = None
        if source is None or Path(source).resolve() != Path(checkpoint_path).resolve():
            raise errors.UserError(f"--out {out} holds the evaluation of {source or 'another run'}; it is not "
                                   "replaced: choose another --out, or pass --overwrite")


def _export(a) -> None:
    """``--export``: the scorer of the run as one torch.export program."""
    state, cfg, model, rec_loss = load_run(a.checkpoint, device=a.device, data_root=a.data_root)
    if cfg.method == "knn":
        raise errors.UserError("--export writes PIAD's and latent-norm's scorers; a k-NN run has none (score new "
                               "images with --images)")
    provenance.warn_other_commit(state, a.checkpoint)
    threshold = (state.get("scoring") or {}).get("threshold")
    kind = threshold and threshold["score"]
    decide_by = None if kind in (None, "latent-norm", map_kind(rec_loss)) else _distance(rec_loss, kind)
    with errors.user_errors(OSError, prefix=f"--export {a.export}: "):
        meta = export.export_scorer(model, map_loss(rec_loss), a.export, image_size=state["image_size"],
                                    channels=state["channels"], threshold=threshold, decide_by=decide_by,
                                    extra={"checkpoint": str(a.checkpoint), "iteration": state["iteration"],
                                           "preprocess": cfg.preprocess}, overwrite=a.overwrite)
    print(f"wrote {a.export}: scores and {meta['distance']} maps of {meta['channels']}×{meta['image_size']}×"
          f"{meta['image_size']} images in [0, 1]" + (", and decisions" if threshold else "")
          + "; load it with torch.export.load(path).module()")


def _evaluate_cli(a, out: Path) -> None:
    """Re-evaluates the run into ``out``, or (``--images``) scores a folder of new images."""
    state, cfg, model, rec_loss = load_run(a.checkpoint, device=a.device, data_root=a.data_root)
    provenance.warn_other_commit(state, a.checkpoint)
    scoring = state.get("scoring")  # D_X's reference images and the threshold, once evaluated
    threshold = (scoring or {}).get("threshold")
    if a.images:
        with errors.user_errors(ValueError, OSError, prefix="--images: "):
            ds, paths = data_mod.load_image_folder(a.images, image_size=state["image_size"],
                                                   channels=state["channels"], preprocess=cfg.preprocess)
        if scoring is None and isinstance(model, piad.PIAD):
            print("note: the checkpoint has no D_X reference images (the run was not evaluated): critic scores "
                  "depend on the images scored together", file=sys.stderr)
        scores, _ = compute_scores(model, ds, rec_loss, maps=True, reference=(scoring or {}).get("reference"))
        maps = scores.pop("map")
        out.mkdir(parents=True, exist_ok=True)
        name = Path(a.images).resolve().name
        path = out / f"scores_{name}.csv"
        anomalous = decide(scores, threshold)
        write_scores_csv(path, paths, scores, anomalous=anomalous)
        write_maps(out, name, paths, maps, ds, scores, map_kind(rec_loss), a.images)
        main_score = scores[primary_score(cfg)]
        verdict = ("no threshold (the run had no --calibration): no decisions" if anomalous is None else
                   f"{int(anomalous.sum())} anomalous ({threshold['score']} > {threshold['threshold']:.4g})")
        print(f"scored {len(paths)} images with {primary_score(cfg)} "
              f"(min {main_score.min():.4g}, median {np.median(main_score):.4g}, max {main_score.max():.4g}), "
              f"{verdict} -> {path}; anomaly maps ({map_kind(rec_loss)}) -> {out / f'maps_{name}.npz'}, "
              f"{out / f'overlays_{name}'}/, {out / f'extremes_{name}.png'}")
        return
    print(json.dumps(evaluate_checkpoint(a.checkpoint, out, run=(state, cfg, model, rec_loss)), indent=2))


def evaluate_checkpoint(path, out, *, run=None, device="auto", data_root=None) -> dict:
    """A run's checkpoint evaluated on its protocol's test set (:func:`evaluate_run`, files into
    ``out``); ``run``: what :func:`load_run` returned for it, when already loaded."""
    state, cfg, model, rec_loss = run or load_run(path, device=device, data_root=data_root)
    metrics = evaluate_run(out, model=model, data=cfg.load_data(protocols=system.PROTOCOLS), rec_loss=rec_loss,
                           config=cfg,
                           scoring=state.get("scoring"), checkpoint_path=path,
                           extra={"iterations": state["iteration"], "checkpoint": str(path),
                                  "trained_with": state.get("provenance")})
    if Path(out).resolve() != Path(path).resolve().parent:  # out elsewhere: the log is beside the checkpoint
        figures.plot_curves(Path(out) / "curves.png", Path(path).parent / "log.csv")
    return metrics


def main(argv=None) -> None:
    """``python evaluate.py ...``: mistakes end with ``error: ...`` and exit status 2."""
    errors.run_cli(_main, argv)


if __name__ == "__main__":
    main()
