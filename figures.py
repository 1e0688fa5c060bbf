"""Figures: the paper's figures that this code can redraw, and the plots of our extensions.

Perceptual Image Anomaly Detection (Tuluptceva et al., 2019):

* Fig. 1 and Fig. 3 (right), §3.1: a loss between an image and itself shifted by 5 pixels as
  the contrast falls (:func:`reduce_contrast`, :func:`contrast_curve`): the perceptual loss
  (eq. 2) drops with the contrast, relative-perceptual-L1 (eq. 4) much less; and the L1 norm of
  the VGG-19 features, which falls with it (:func:`feature_l1_curve`). ``python figures.py paper
  --out docs`` redraws both with the real ImageNet VGG-19 on scikit-learn's two photos
  (:func:`contrast_study`, :func:`plot_paper`: ``fig1_contrast.png``, ``fig3_feature_l1.png``,
  ``contrast.json``).
* Fig. 4, §4: images x above their reconstructions G(E(x)), normal then anomalous
  (:func:`plot_reconstructions`, ``reconstructions.png``).
* Fig. 5, §4: the least and the most anomalous test images by a score (:func:`plot_extremes`,
  ``extremes.png``), with the anomaly maps of the most anomalous ones (an extension).
* ROC curves of every score with their ROC AUC (:func:`plot_roc`, ``roc.png``).
* §3.3: a run's training curves from its ``log.csv``, the losses and the γ_G, γ_E that the
  gradient-normalizing policy chose (:func:`plot_curves`, ``curves.png``).

Our extensions, not in the paper: anomaly maps over an image (:func:`plot_overlay`) and ROC AUC
against the fraction of anomalies in the training set (:func:`plot_contamination`,
``auroc_vs_contamination.png``), and against the training iterations (:func:`plot_progress`,
``progress.png``). Berg et al.'s histograms of latent norms are
``berg.latent_norm.plot_latent_norms`` (it draws with :func:`pyplot` and :func:`save`, this module's public helpers).
Also not in the paper: precision-recall curves with their average precision (:func:`plot_pr`,
``pr.png``), the calibrated threshold marked on both (:func:`mark_threshold`).

matplotlib is imported on first use, with its file-only Agg backend; of the project this module
imports only ``errors``, ``readers``, ``rundir`` (atomic writes), ``features``, ``losses`` and ``presets`` (for Fig. 1
and Fig. 3).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import features
import losses
import presets
import readers
import rundir
from errors import UserError, add_debug_flag, run_cli, user_errors

# ---------------------------------------------------------------------------------------------
# Contrast robustness (Fig. 1 and Fig. 3, right).

SHIFT = 5  # Fig. 1 (a): "the same one shifted by 5 pixels"
LEVELS = tuple(i / 10 for i in range(11))  # Fig. 3 (right): 0.0 the original ... 1.0 a flat grey image
PAIR_LEVELS = (0.0, 0.2, 0.4)  # Fig. 1 (a), (b), (c) (Fig. 3's caption: 0.2 is 1b, 0.4 is 1c)
PAPER_LOSSES = ("perc", "rel-perc-l1")  # the two losses of Fig. 1
# The paper's image is an LSUN one, which its models see at 64×64 (§4): by default the photos are
# prepared as LSUN's training images are (shorter side resized, centre square) at that size.
PAPER_IMAGE_SIZE = presets.network("lsun").image_size
PAPER_FILES = ("fig1_contrast.png", "fig3_feature_l1.png", "contrast.json")  # what `paper` writes


def reduce_contrast(img: torch.Tensor, level: float) -> torch.Tensor:
    """Histogram stretching to a reduced dynamic range: level 0 = original, 1 = flat grey.

    The image's intensity range [lo, hi] (in [-1, 1]) is mapped linearly onto
    [(1-level)·lo, (1-level)·hi], i.e. squeezed towards mid-grey 0.
    """
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"contrast level must be in [0, 1], got {level}")
    return img * (1.0 - level)


def shifted_pair(x: torch.Tensor, shift: int = SHIFT) -> tuple[torch.Tensor, torch.Tensor]:
    """Fig. 1 (a): the image and itself shifted ``shift`` pixels to the left (both cropped to the
    columns they share)."""
    return x[..., :, :-shift], x[..., :, shift:]


def contrast_curve(image: torch.Tensor, losses: dict, levels, *, shift: int = SHIFT) -> dict:
    """Loss between ``image`` and itself shifted by ``shift`` pixels, as contrast decreases.

    ``losses``: name -> ``losses.ReconstructionLoss`` (e.g. perc and rel-perc-l1); losses on one
    VGG share its features. Returns ``{"levels": [...], name: [value per level], name +
    "_relative": [value / value at level 0], "weights": ...}``.
    """
    out: dict = {"levels": list(levels), **{name: [] for name in losses}}
    with torch.no_grad():
        for level in levels:
            a, b = shifted_pair(reduce_contrast(image, level), shift)
            feats: dict = {}  # id(VGG) -> (f(a), f(b)): one forward per image and level
            for name, loss in losses.items():
                kw = {}
                if loss.features is not None:
                    if id(loss.features) not in feats:
                        feats[id(loss.features)] = (loss.real_features(a), loss.features(b))
                    kw = dict(zip(("fx", "fy"), feats[id(loss.features)]))
                out[name].append(float(loss(a, b, **kw).mean()))  # whatever its reduction: the mean
    for name, loss in losses.items():
        out[name + "_relative"] = [v / out[name][0] for v in out[name]]
        out["weights"] = loss.weights_id
    return out


@torch.no_grad()
def feature_l1_curve(image: torch.Tensor, vgg, levels) -> list[float]:
    """Fig. 3 (right): the L1 norm of the VGG-19 features, ``||f(x)||_1 / (C·H·W)`` (relu4_2,
    not normalised by eq. 3), of ``image`` at each contrast level."""
    return [float(vgg(reduce_contrast(image, level)).abs().mean()) for level in levels]


def paper_photos(size: int = PAPER_IMAGE_SIZE) -> dict[str, torch.Tensor]:
    """scikit-learn's two bundled photos (china.jpg, flower.jpg) prepared as training images are
    (``readers.prepare``: shorter side resized to ``size``, centre square), ``{name: (1, 3, size, size)}``."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    return {Path(f).name: readers.prepare(im, size, 3, preprocess="float")[None]
            for f, im in zip(photos.filenames, photos.images)}


def contrast_study(vgg, size: int = PAPER_IMAGE_SIZE) -> dict:
    """The numbers of Fig. 1 and Fig. 3 (right) on :func:`paper_photos`: for each photo the
    :data:`PAPER_LOSSES` between it and itself shifted by :data:`SHIFT` pixels (:func:`contrast_curve`)
    and the features' L1 norm (:func:`feature_l1_curve`) at every level of :data:`LEVELS`, with the
    VGG-19 ``vgg`` (a ``features.VGG19Features``) and the statistics
    ``features.select_stats("auto", vgg)`` gives for its weights."""
    stats = features.select_stats("auto", vgg)
    fns = {kind: losses.ReconstructionLoss(kind=kind, features=vgg, stats=stats) for kind in PAPER_LOSSES}
    images = {}
    for name, x in paper_photos(size).items():
        curve = contrast_curve(x, fns, LEVELS)
        images[name] = {**{k: curve[k] for k in fns}, **{k + "_relative": curve[k + "_relative"] for k in fns},
                        "feature_l1": feature_l1_curve(x, vgg, LEVELS)}
    return {"weights": vgg.weights_id, "stats": stats.source, "layer": vgg.layer, "shift": SHIFT,
            "image_size": size, "levels": list(LEVELS), "pair_levels": list(PAIR_LEVELS), "images": images}


# ---------------------------------------------------------------------------------------------
# Plots, written to image files.


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path, **kw) -> None:
    """Writes ``fig`` to ``path`` atomically (``rundir.atomic_write``), in the format of its suffix, and closes it."""
    kind = Path(path).suffix.lstrip(".").lower() or "png"
    try:
        rundir.atomic_write(path, lambda fh: fig.savefig(fh, format=kind, **{"dpi": 100, "bbox_inches": "tight", **kw}))
    finally:
        pyplot().close(fig)


def skipped(path, why: str) -> None:
    """One ``note:`` line for a figure that is not drawn (too few images for it)."""
    print(f"note: {Path(path).name} not drawn: {why}", file=sys.stderr, flush=True)


def _images(ds, idx) -> torch.Tensor:
    return torch.stack([ds[int(i)][0] for i in idx])


def _grid(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of (n, C, H, W) images in [-1, 1] -> an (H·rows, W·n, 3) array in [0, 1]; shorter rows
    are filled out with white."""
    n = max(len(r) for r in rows)
    rows = [torch.cat([r, r.new_ones(n - len(r), *r.shape[1:])]) for r in rows]
    rows = [torch.cat(list(r.clamp(-1, 1).add(1).div(2).expand(-1, 3, -1, -1)), dim=2) for r in rows]
    return torch.cat(rows, dim=1).permute(1, 2, 0).numpy()


def plot_roc(path, scores, labels, aucs, *, title="", mark=None) -> None:
    """ROC curve of every finite score, labelled with its ROC AUC (``aucs``); ``mark``: the
    calibrated threshold's point (:func:`mark_threshold`, x = FPR, y = TPR)."""
    from sklearn.metrics import roc_curve

    fig, ax = pyplot().subplots(figsize=(5, 5))
    for k, v in scores.items():
        if np.isfinite(v).all():
            fpr, tpr, _ = roc_curve(labels, v)
            ax.plot(fpr, tpr, label=f"{k} ({aucs[k]:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    mark_threshold(ax, mark)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, {title}")
    ax.legend(fontsize=8)
    save(fig, path)


def mark_threshold(ax, mark) -> None:
    """``mark`` = (score name, x, y, threshold): the calibrated threshold as a point on that score's
    curve (nothing when ``mark`` is None or a coordinate is undefined)."""
    if mark and mark[1] is not None and mark[2] is not None:
        name, x, y, t = mark
        ax.plot([x], [y], "ko", ms=7, mfc="none", mew=1.5, label=f"{name} > {t:.4g} (calibrated)")


def plot_pr(path, scores, labels, aps, *, title="", mark=None) -> None:
    """Precision-recall curve of every finite score (anomaly = positive), labelled with its average
    precision (``aps``), the chance level (the share of anomalies) dotted; ``mark``: the calibrated
    threshold's point (:func:`mark_threshold`, x = recall (TPR), y = precision)."""
    from sklearn.metrics import precision_recall_curve

    fig, ax = pyplot().subplots(figsize=(5, 5))
    for k, v in scores.items():
        if np.isfinite(v).all():
            precision, recall, _ = precision_recall_curve(labels, v)
            ax.step(recall, precision, where="post", label=f"{k} (AP {aps[k]:.3f})")
    ax.axhline(float(np.mean(labels)), color="k", ls=":", lw=0.8)
    mark_threshold(ax, mark)
    ax.set(xlabel="recall (true positive rate)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"precision-recall, {title}")
    ax.legend(fontsize=8)
    save(fig, path)


@torch.no_grad()
def plot_reconstructions(path, model, ds, labels, n: int = 8) -> None:
    """Fig. 4: ``n`` normal then ``n`` anomalous test images x, each row above G(E(x))."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    for wanted in (0, 1):
        idx = np.flatnonzero(labels == wanted)[:n]
        if len(idx) == 0:
            continue
        x = _images(ds, idx).to(device)
        rows += [x.cpu(), model.reconstruct(x).cpu()]  # x above G(E(x))
    model.train(was_training)
    if not rows:
        return skipped(path, "no test images")
    n = max(len(r) for r in rows)
    fig, ax = pyplot().subplots(figsize=(n, len(rows) * 1.1))
    ax.imshow(_grid(rows))
    ax.set_axis_off()
    ax.set_title("normal: x / G(E(x))   —   anomalous: x / G(E(x))", fontsize=9)
    save(fig, path)


def plot_extremes(path, ds, score: np.ndarray, title: str, n: int = 10, map_fn=None,
                  map_kind: str = "rel-perc-l1") -> None:
    """Fig. 5: the ``n`` least (top row) and most (middle row) anomalous images by ``score``;
    with ``map_fn`` ((indices in ``ds``, images) -> (n, h, w) anomaly maps, e.g. by
    ``piad.anomaly_map``) the maps of the most anomalous ones below them, upsampled to the images
    (bilinear), on one colour scale."""
    order = np.argsort(score, kind="stable")
    n = min(n, len(order) // 2)
    if n == 0:
        return skipped(path, f"it shows the least and the most anomalous images, and there is {len(order)} image")
    rows = [_images(ds, order[:n]), _images(ds, order[::-1][:n])]  # least, most anomalous
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(n, 3.6 if map_fn else 2.4))
    grid, what = _grid(rows), "least (top) and most (bottom) anomalous"
    if map_fn is not None:  # a third row: the maps, coloured on one scale
        maps = map_fn(order[::-1][:n], rows[1]).cpu()
        maps = torch.cat(list(upsample_maps(maps, rows[1].shape[-1])), dim=1).numpy()  # (S, n·S)
        norm = plt.Normalize(0, max(float(maps.max()), 1e-12))
        grid = np.concatenate([grid, plt.get_cmap("inferno")(norm(maps))[..., :3]], axis=0)
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="inferno"), ax=ax, orientation="horizontal",
                     fraction=0.05, pad=0.03, label=f"share of A(x) ({map_kind}) per position")
        what = "least (top) and most (middle) anomalous, maps of the latter (bottom)"
    ax.imshow(grid)
    ax.set_axis_off()
    ax.set_title(f"{what} — {title}", fontsize=9)
    save(fig, path)


def upsample_maps(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(N, h, w) anomaly maps -> (N, *size), bilinear (for display: the sum is not kept)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return torch.nn.functional.interpolate(maps[:, None].float(), size=size, mode="bilinear",
                                           align_corners=False)[:, 0]


def plot_overlay(path, image_file, amap: torch.Tensor, score: float, *, label: str = "A(x)",
                 min_side: int = 128) -> tuple[int, int]:
    """One image file with its anomaly map ``amap`` (h, w) over it, a colour bar and the score.

    The map covers the centre square that was scored (``readers.prepare``: shorter side resized,
    centre crop), upsampled to it (bilinear). The PNG has the image's size in pixels, times the
    smallest whole factor that makes its shorter side at least ``min_side`` (so that the colour bar
    and the score can be read on small images); returns its (width, height)."""
    from PIL import Image

    with Image.open(image_file) as im:
        img = np.asarray(im.convert("RGB"))
    h, w = img.shape[:2]
    k = -(-min_side // min(h, w))  # ceil
    side = min(h, w)
    top, left = int(round((h - side) / 2)), int(round((w - side) / 2))
    heat = np.full((h * k, w * k), np.nan)
    heat[top * k:(top + side) * k, left * k:(left + side) * k] = upsample_maps(amap[None].cpu(), side * k)[0].numpy()
    plt = pyplot()
    fig = plt.figure(figsize=(w * k / 100, h * k / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.imshow(img, extent=(0, w * k, h * k, 0), interpolation="nearest")
    shown = ax.imshow(heat, extent=(0, w * k, h * k, 0), cmap="inferno", alpha=0.55, vmin=0)
    cax = ax.inset_axes((0.88, 0.2, 0.04, 0.6))
    fig.colorbar(shown, cax=cax)
    cax.tick_params(labelsize=6, colors="white")
    ax.text(0.02, 0.98, f"{label} = {score:.4g}", transform=ax.transAxes, va="top", fontsize=8,
            color="white", bbox=dict(facecolor="black", alpha=0.6, pad=2, lw=0))
    save(fig, path, bbox_inches=None)
    return w * k, h * k


# Training curves of a run (§3.3): log.csv's losses and the γ_G, γ_E the policy chose.

CURVE_PANELS = (  # (title, log.csv columns): a panel is drawn where its columns hold values
    ("critic losses, eq. (5)", ("loss_dx", "loss_dz")),
    ("adversarial losses, eq. (6)", ("adv_g", "adv_e")),
    ("reconstruction loss L_rec, eq. (7)", ("rec",)),
    ("latent-norm: cycle loss", ("cycle",)),
    ("γ_G, γ_E (§3.3, Algorithms 2-3)", ("gamma_g", "gamma_e")),
    ("progressive growing: level of detail", ("lod",)),
    ("progressive growing: thousands of images shown", ("kimg",)),
)


def read_log(path) -> dict[str, np.ndarray]:
    """A run's ``log.csv`` as ``{column: float array}`` (a blank cell is NaN), only the columns
    that hold at least one number; ``{}`` when the file has no rows."""
    import csv

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols = {k: np.array([float(r[k]) if r.get(k) not in (None, "") else np.nan for r in rows])
            for k in (rows[0] if rows else ())}
    return {k: v for k, v in cols.items() if np.isfinite(v).any()}


def plot_curves(path, log_csv) -> list[tuple[str, list[str]]]:
    """``curves.png``: the columns of ``log_csv`` (a run's ``log.csv``) over the iterations, one
    panel per entry of :data:`CURVE_PANELS` that the log holds (a PIAD run: losses and γ; a
    latent-norm run: its losses, and lod, kimg when it grows). Returns the panels drawn, (title,
    columns); none, and nothing written, when there is no such file or it has no rows."""
    log_csv = Path(log_csv)
    cols = read_log(log_csv) if log_csv.is_file() else {}
    panels = [(title, [c for c in names if c in cols]) for title, names in CURVE_PANELS]
    panels = [(title, names) for title, names in panels if names]
    if "iteration" not in cols or not panels:
        return []
    rows = -(-len(panels) // 2)
    fig, axes = pyplot().subplots(rows, 2, figsize=(11, 3 * rows), squeeze=False)
    for ax, (title, names) in zip(axes.flat, panels):
        for name in names:
            ok = np.isfinite(cols[name])
            steps = name in ("gamma_g", "gamma_e", "lod")  # held between updates: drawn as steps
            ax.plot(cols["iteration"][ok], cols[name][ok], lw=1.2, label=name, drawstyle="steps-post" if steps else "default")
        if title.startswith("γ") and all((cols[n][np.isfinite(cols[n])] > 0).all() for n in names):
            ax.set_yscale("log")
        ax.set(title=title, xlabel="iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    fig.suptitle(f"{log_csv.parent.name}: log.csv, {len(cols['iteration'])} rows", fontsize=10)
    fig.tight_layout()
    save(fig, path)
    return panels


def contamination_curves(rows: list[dict]) -> dict[str, tuple[list, list, list]]:
    """``{variant: (P values, mean ROC AUC, sample std)}`` over the classes and seeds of ``rows``,
    one per finished cell with its ``variant`` label, ``contamination`` P and ``roc_auc`` (the
    records of ``experiments.collect``). The std has ddof = 1, as in ``table.md``; it is 0 for a
    single cell (where ``table.md`` shows none)."""
    by: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        by.setdefault(r["variant"], {}).setdefault(r["contamination"], []).append(r["roc_auc"])
    curves = {}
    for label, cells in by.items():
        ps = sorted(cells)
        curves[label] = (ps, [float(np.mean(cells[p])) for p in ps],
                         [float(np.std(cells[p], ddof=1)) if len(cells[p]) > 1 else 0.0 for p in ps])
    return curves


def _show(x: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) in [-1, 1] -> (H, W, 3) in [0, 1]."""
    return _grid([x])


def plot_paper(out, study: dict, photos: dict[str, torch.Tensor]) -> list[Path]:
    """Fig. 1 and Fig. 3 (right) of :func:`contrast_study`'s numbers into the folder ``out``
    (:data:`PAPER_FILES`): Fig. 1's three pairs (the first photo, and itself shifted, at
    :data:`PAIR_LEVELS`) with both losses, above both losses relative to the original's over all
    levels; Fig. 3 (right) the features' L1 norm over the levels; and the numbers as JSON."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig1, fig3, numbers = (out / f for f in PAPER_FILES)
    plt = pyplot()
    levels, names, shift = study["levels"], list(study["images"]), study["shift"]
    first, curves = names[0], study["images"][names[0]]
    fig = plt.figure(figsize=(12, 6.8))
    grid = fig.add_gridspec(2, len(study["pair_levels"]), height_ratios=(1, 1.1))
    for col, (tag, level) in enumerate(zip("abc", study["pair_levels"])):
        i = levels.index(level)
        a, b = shifted_pair(reduce_contrast(photos[first], level), shift)
        gap = torch.ones(*a.shape[:-1], 4)
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(_show(torch.cat([a, gap, b], dim=-1)))
        ax.set_axis_off()
        what = "original" if level == 0 else f"contrast reduced by {level:.1f}"
        ax.set_title(f"({tag}) {what}, shifted by {shift} px\n" + "\n".join(
            f"{k} = {curves[k][i]:.4g} ({100 * (curves[k + '_relative'][i] - 1):+.0f}%)" for k in PAPER_LOSSES),
            fontsize=9)
    ax = fig.add_subplot(grid[1, :])
    for name, style in zip(names, ("-", "--", ":")):
        for k, colour in zip(PAPER_LOSSES, ("C3", "C0")):
            ax.plot(levels, study["images"][name][k + "_relative"], style, color=colour, marker="o", ms=3,
                    label=f"{k}, {name}")
    ax.set(xlabel="contrast reduction (0 = original, 1 = flat grey)", ylabel="loss / loss of the original pair",
           title=f"loss between an image and itself shifted by {shift} px ({study['weights']}, "
                 f"{study['layer']}, {study['image_size']}×{study['image_size']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, fig1)
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, style in zip(names, ("-", "--", ":")):
        ax.plot(levels, study["images"][name]["feature_l1"], style, color="k", marker="o", ms=3, label=name)
    ax.set(xlabel="contrast reduction (0 = original, 1 = flat grey)", ylabel="||f(x)||₁ / (C·H·W)",
           title=f"L1 norm of VGG-19 {study['layer']} features", ylim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, fig3)
    numbers.write_text(json.dumps(study, indent=2))
    return [fig1, fig3, numbers]


def plot_contamination(path, rows: list[dict], title: str) -> None:
    """:func:`contamination_curves` of ``rows`` as error bars vs. contamination P, one line per variant."""
    fig, ax = pyplot().subplots(figsize=(5, 4))
    for label, (ps, mean, std) in contamination_curves(rows).items():
        ax.errorbar(ps, mean, yerr=std, marker="o", capsize=3, label=label)
    ax.set(xlabel="contamination P (fraction of anomalies in training)", ylabel="ROC AUC", title=title)
    ax.legend()
    save(fig, path)


def plot_progress(path, rows: list[dict], title: str) -> None:
    """ROC AUC and average precision against training iterations (``tools.progress``'s rows)."""
    it = [int(r["iteration"]) for r in rows]
    fig, ax = pyplot().subplots(figsize=(5, 4))
    for key, label in (("roc_auc", "ROC AUC"), ("average_precision", "average precision")):
        ax.plot(it, [float(r[key]) for r in rows], marker="o", label=label)
    ax.set(xlabel="iteration (Algorithm 1)", ylabel=f"{rows[0]['score']} on the test set" if rows else "",
           title=title)
    ax.legend()
    save(fig, path)


# ---------------------------------------------------------------------------------------------
# Command line: the paper's figures that need no trained model.


def _main(argv) -> None:
    p = argparse.ArgumentParser(prog="figures.py", description="Redraw the paper's figures that need no trained model.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("paper", help="Fig. 1 and Fig. 3 (right): perc and rel-perc-l1 as the contrast falls")
    s.add_argument("--out", default="docs", help="output folder (default: docs)")
    s.add_argument("--vgg-weights", default="caffe", help="|".join(features.WEIGHTS) + "|PATH (default: caffe)")
    s.add_argument("--image-size", type=int, default=PAPER_IMAGE_SIZE,
                   help=f"side of the photos' centre square (default: {PAPER_IMAGE_SIZE})")
    add_debug_flag(s)
    args = p.parse_args(argv)
    if args.image_size < 32:
        raise UserError(f"--image-size must be at least 32 (VGG-19 relu4_2 sees 1/8 of it, after a "
                        f"{SHIFT}-pixel shift), got {args.image_size}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    with user_errors(OSError, RuntimeError, ValueError, prefix="--vgg-weights: "):
        vgg = features.VGG19Features("relu4_2", args.vgg_weights)
    study = contrast_study(vgg, args.image_size)
    for path in plot_paper(out, study, paper_photos(args.image_size)):
        print(f"wrote {path}")
    at = [LEVELS.index(level) for level in PAIR_LEVELS[1:]]
    for name, c in study["images"].items():  # e.g. "china.jpg: perc x0.64 / x0.36, ..."
        print(f"{name}, loss / loss of the original at contrast reductions {PAIR_LEVELS[1:]}: " + ", ".join(
            f"{k} " + " / ".join(f"x{c[k + '_relative'][i]:.2f}" for i in at) for k in PAPER_LOSSES))


def main(argv=None) -> None:
    """``python figures.py paper``: mistakes end with ``error: ...`` and exit status 2."""
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
