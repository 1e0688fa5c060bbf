"""Evaluation: anomaly scores, ROC AUC and figures (paper §4, eq. (1), Fig. 4 and Fig. 5).

For every test image one model gives several scores, all oriented so that higher means more
anomalous: A(x) of eq. (1) with each reconstruction distance (``rel-perc-l1``, ``perc-l1``,
``perc`` of eq. 2, pixel ``l1`` and ``mse``) between x and G(E(x)); ``critic`` = -D_X(x) (the
image critic scores real-looking images high; computed on test batches, so its minibatch-stddev
feature sees the batch); and ``latent-norm`` = ‖E(x)‖₂ (Berg et al.'s score). The primary score
is the training loss for PIAD and ``latent-norm`` for ``--method latent-norm``.

Writes to the run folder: ``metrics.json`` (ROC AUC of every score and the run's settings),
``scores.csv`` (one row per test image), ``roc.png``, ``reconstructions.png`` (x above G(E(x)),
normal then anomalous, as Fig. 4), ``extremes.png`` (least and most anomalous test images and the maps of the latter,
as Fig. 5) and, for latent-norm runs, ``latent_norms.png`` (histogram of ‖E(x)‖₂).

``python evaluate.py --checkpoint RUN/checkpoint.pt [--images DIR]`` re-evaluates a saved run,
or scores a folder of new, unlabelled images and writes their anomaly maps (``piad.anomaly_map``:
eq. (4) position by position, summing to A(x)) as ``maps_NAME.npz`` and overlays;
``--export scorer.pt2`` writes the scorer as one ``torch.export`` program (module ``export``).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

import checkpoint
import data as data_mod
import errors
import features
import figures
import losses
import piad
from berg import latent_norm, pgan
from config import DEVICES, TrainConfig, resolve_device
from tools import export

SCORES = (*losses.KINDS, "critic", "latent-norm")  # every distance of eq. (1), −D_X(x), ‖E(x)‖


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
    statistics, whatever the training loss; pixel ``l1`` if the run has no VGG features."""
    return "rel-perc-l1" if _has_features(rec_loss) else "l1"


def map_loss(rec_loss) -> losses.ReconstructionLoss:
    """The loss that draws the anomaly maps, of kind :func:`map_kind`."""
    return _distance(rec_loss, map_kind(rec_loss))


@torch.no_grad()
def compute_scores(model, ds, rec_loss, *, batch_size: int = 256, device=None,
                   centre: torch.Tensor | None = None, maps: bool = False) -> tuple[dict, np.ndarray]:
    """All scores for every item of ``ds`` (items ``(image, label)``); returns (scores, labels).
    With ``maps``, ``scores["map"]`` holds the anomaly map of every image, (N, h, w), which sums to
    its score ``map_kind(rec_loss)`` (``piad.anomaly_map``).

    Eq. (1) with every reconstruction distance (``piad.anomaly_score``), ‖E(x)‖ (and, with
    ``centre``, ‖E(x) - centre‖: ``latent_norm.code_norms``) and -D_X(x). Items are scored
    in a fixed random order (seed 0) and returned in dataset order: D_X's minibatch-stddev feature
    sees its batch, and test sets are stored normal-first, so batches in storage order would let
    the critic score depend on the label mix of its batch.
    """
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
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    for x, y in DataLoader(Subset(ds, order.tolist()), batch_size=batch_size, shuffle=False, num_workers=0):
        x = x.to(device)
        batch = piad.anomaly_score(model, x, distances, batch_size=len(x))  # eq. (1)
        batch["critic"] = -model.DX(x).flatten()
        # (b, *latent_shape): one E pass for both norms; pgan: each image grouped with fixed
        # training images only (pgan.PGAN.encode), so no test image's code depends on another's
        z = model.encode(x) if hasattr(model, "encode") else model.E(x)
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


def _stats_of(rec_loss) -> features.FeatureStats:
    f = rec_loss.features
    return features.FeatureStats(rec_loss.mean.cpu(), rec_loss.std.cpu(), f.weights_id, f.layer, 0)


def roc_aucs(scores: dict, labels: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        raise ValueError("the test set needs both normal and anomalous images for ROC AUC")
    return {k: float(roc_auc_score(labels, v)) if np.isfinite(v).all() else float("nan")
            for k, v in scores.items()}


def _feature_loss(rec_loss, config, data, model):
    """The training loss if it has VGG features, else one built for scoring (pixel-loss runs)."""
    if rec_loss is not None and rec_loss.features is not None:
        return rec_loss
    try:
        device = next(model.parameters()).device
        loss, _ = losses.build_loss("rel-perc-l1", weights=config.vgg_weights, stats=config.stats, impl=config.impl,
                                    device=device, train_batches=data_mod.image_batches(data.train, device))
        return loss
    except (FileNotFoundError, RuntimeError) as exc:  # no VGG weights here: pixel scores only
        warnings.warn(f"perceptual scores skipped: {exc}")
        return rec_loss


def primary_score(config) -> str:
    return "latent-norm" if config.method == "latent-norm" else config.loss


def evaluate_run(run, *, model, data, rec_loss, config, extra: dict | None = None) -> dict:
    """Scores the protocol's test set and writes every output file into ``run``."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    prior = latent_norm.encode_prior(model) if config.method == "latent-norm" else None  # z, E(G(z))
    feature_loss = _feature_loss(rec_loss, config, data, model)
    scores, labels = compute_scores(model, data.test, feature_loss,
                                    centre=None if prior is None else prior[1].mean(0))  # E's image of 0
    aucs = roc_aucs(scores, labels)
    main = primary_score(config)
    metrics = {
        "roc_auc": aucs[main], "score": main, "roc_auc_per_score": aucs,
        "dataset": config.dataset, "normal": data.normal, "method": config.method, "loss": config.loss,
        "seed": config.seed, "contamination": data.contamination, "protocol": data.protocol,
        "weights_policy": config.weights_policy, "vgg_weights": getattr(rec_loss, "weights_id", None),
        "n_train": len(data.train), "n_test": int(len(labels)), "n_test_anomalous": int(labels.sum()),
        **(extra or {})}
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_scores_csv(run / "scores.csv", data.test_ids, scores, labels)
    figures.plot_roc(run / "roc.png", scores, labels, aucs, title=f"{config.dataset}, normal {data.normal}")
    figures.plot_reconstructions(run / "reconstructions.png", model, data.test, labels)
    amap = map_loss(feature_loss)
    figures.plot_extremes(run / "extremes.png", data.test, scores[main], f"{main}: ROC AUC {aucs[main]:.3f}",
                          map_fn=lambda idx, x: piad.anomaly_map(model, x, amap.map), map_kind=amap.kind)
    if config.method == "latent-norm":
        figures.plot_latent_norms(run / "latent_norms.png", scores, labels, prior,
                                  title=f"{config.dataset}, normal {data.normal}")
    return metrics


def write_scores_csv(path, ids, scores: dict, labels=None) -> None:
    names = list(scores)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id"] + (["label"] if labels is not None else []) + names)
        for i, ident in enumerate(ids):
            w.writerow([ident] + ([int(labels[i])] if labels is not None else [])
                       + [f"{scores[k][i]:.6g}" for k in names])


def write_maps(out: Path, name: str, ids: list[str], maps: np.ndarray, ds, scores: dict, kind: str,
               folder) -> None:
    """Beside ``scores_NAME.csv``: ``maps_NAME.npz`` (each image's (h, w) map under its id in the CSV),
    ``overlays_NAME/`` (one PNG per image, at the image file's relative path, the map over the image)
    and ``extremes_NAME.png`` (the most anomalous images by ``kind`` with their maps below)."""
    np.savez(out / f"maps_{name}.npz", **{ident: m for ident, m in zip(ids, maps)})
    overlays = out / f"overlays_{name}"
    for ident, m, s in zip(ids, maps, scores[kind]):
        target = (overlays / os.path.relpath(ident, Path(folder).expanduser())).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        figures.plot_overlay(target, ident, torch.from_numpy(m), float(s), label=kind)
    if len(ids) >= 2:
        figures.plot_extremes(out / f"extremes_{name}.png", ds, scores[kind], f"{name}, {kind}",
                              map_fn=lambda idx, x: torch.from_numpy(maps[idx]), map_kind=kind)  # already computed


def saved_model(state: dict, device) -> piad.PIAD | pgan.PGAN:
    """The trained networks of a checkpoint's ``state`` (``checkpoint.load_checkpoint``), on ``device``."""
    method = state["config"].get("method", "piad")
    if method == "latent-norm" and state["config"].get("networks") == "pgan":  # berg/pgan.py; records lod
        model = pgan.PGAN(pgan.PGANConfig(**state["preset"]))
    else:
        model = piad.PIAD(config=piad.PIADConfig(**state["preset"]), channels=state["channels"])
        if method == "latent-norm":
            latent_norm.use_pixel_norm(model)
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
    model = saved_model(state, dev)
    with errors.user_errors(OSError, ValueError, RuntimeError, prefix="the run's VGG weights: "):
        rec_loss, _ = losses.build_loss(cfg.loss, weights=cfg.vgg_weights, impl=cfg.impl, device=dev,
                                        saved_stats=state["stats"])
    return state, cfg, model, rec_loss


def _main(argv) -> None:
    p = argparse.ArgumentParser(prog="evaluate.py",
                                description="Evaluate a trained PIAD checkpoint, or score new images.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", default=None, help="folder of images to score (no labels needed); writes "
                   "scores_NAME.csv, maps_NAME.npz, overlays_NAME/ and extremes_NAME.png")
    p.add_argument("--export", default=None, metavar="FILE.pt2",
                   help="write the scorer (preprocessing, E, G, VGG, eq. (4)) as one torch.export program")
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default="auto", choices=DEVICES)
    errors.add_debug_flag(p)
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else Path(a.checkpoint).parent
    if out.exists() and not out.is_dir():
        raise errors.UserError(f"--out {out} is a file, not a folder")
    state, cfg, model, rec_loss = load_run(a.checkpoint, device=a.device, data_root=a.data_root)
    if a.export:
        with errors.user_errors(OSError, prefix=f"--export {a.export}: "):
            meta = export.export_scorer(model, map_loss(rec_loss), a.export, image_size=state["image_size"],
                                        channels=state["channels"], extra={"checkpoint": str(a.checkpoint),
                                                                           "iteration": state["iteration"]})
        print(f"wrote {a.export}: scores and {meta['distance']} maps of {meta['channels']}×{meta['image_size']}×"
              f"{meta['image_size']} images in [0, 1]; load it with torch.export.load(path).module()")
        return
    if a.images:
        with errors.user_errors(ValueError, OSError, prefix="--images: "):
            ds, paths = data_mod.load_image_folder(a.images, image_size=state["image_size"],
                                                   channels=state["channels"], preprocess=cfg.preprocess)
        scores, _ = compute_scores(model, ds, rec_loss, maps=True)
        maps = scores.pop("map")
        out.mkdir(parents=True, exist_ok=True)
        name = Path(a.images).resolve().name
        path = out / f"scores_{name}.csv"
        write_scores_csv(path, paths, scores)
        write_maps(out, name, paths, maps, ds, scores, map_kind(rec_loss), a.images)
        main_score = scores[primary_score(cfg)]
        print(f"scored {len(paths)} images with {primary_score(cfg)} "
              f"(min {main_score.min():.4g}, median {np.median(main_score):.4g}, max {main_score.max():.4g}) "
              f"-> {path}; anomaly maps ({map_kind(rec_loss)}) -> {out / f'maps_{name}.npz'}, "
              f"{out / f'overlays_{name}'}/, {out / f'extremes_{name}.png'}")
        return
    with errors.user_errors(ValueError, OSError, ImportError):  # the run's dataset is not here
        ds = data_mod.load_dataset(cfg.dataset, cfg.normal, root=cfg.data_root, seed=cfg.seed,
                                   contamination=cfg.contamination, protocol=cfg.protocol,
                                   image_size=cfg.image_size, preprocess=cfg.preprocess)
    metrics = evaluate_run(out, model=model, data=ds, rec_loss=rec_loss, config=cfg,
                           extra={"iterations": state["iteration"], "checkpoint": str(a.checkpoint)})
    print(json.dumps(metrics, indent=2))


def main(argv=None) -> None:
    """``python evaluate.py ...``: mistakes end with ``error: ...`` and exit status 2."""
    errors.run_cli(_main, argv)


if __name__ == "__main__":
    main()
