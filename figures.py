"""Figures: the paper's figures that this code can redraw, and the plots of our extensions.

Perceptual Image Anomaly Detection (Tuluptceva et al., 2019):

* Fig. 1 and Fig. 3 (right), §3.1: a loss between an image and itself shifted by 5 pixels as
  the contrast falls (:func:`reduce_contrast`, :func:`contrast_curve`): the perceptual loss
  (eq. 2) drops with the contrast, relative-perceptual-L1 (eq. 4) hardly moves.
* Fig. 4, §4: images x above their reconstructions G(E(x)), normal then anomalous
  (:func:`plot_reconstructions`, ``reconstructions.png``).
* Fig. 5, §4: the least and the most anomalous test images by a score (:func:`plot_extremes`,
  ``extremes.png``), with the anomaly maps of the most anomalous ones (an extension).
* ROC curves of every score with their ROC AUC (:func:`plot_roc`, ``roc.png``).

Also not in the paper: precision-recall curves with their average precision (:func:`plot_pr`,
``pr.png``), the calibrated threshold marked on both (:func:`mark_threshold`).

Our extensions, not in the paper: anomaly maps over an image (:func:`plot_overlay`); histograms of Berg et al.'s latent norms ‖E(x)‖
(:func:`plot_latent_norms`, ``latent_norms.png``) and ROC AUC against the fraction of anomalies
in the training set (:func:`plot_contamination`, ``auroc_vs_contamination.png``).

matplotlib is imported on first use, with its file-only Agg backend; this module imports no
other module of the project.
"""
from __future__ import annotations

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# Contrast robustness (Fig. 1 and Fig. 3, right).


def reduce_contrast(img: torch.Tensor, level: float) -> torch.Tensor:
    """Histogram stretching to a reduced dynamic range: level 0 = original, 1 = flat grey.

    The image's intensity range [lo, hi] (in [-1, 1]) is mapped linearly onto
    [(1-level)·lo, (1-level)·hi], i.e. squeezed towards mid-grey 0.
    """
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"contrast level must be in [0, 1], got {level}")
    return img * (1.0 - level)


def contrast_curve(image: torch.Tensor, losses: dict, levels, *, shift: int = 5) -> dict:
    """Loss between ``image`` and itself shifted by ``shift`` pixels, as contrast decreases.

    ``losses``: name -> ``losses.ReconstructionLoss`` (e.g. perc and rel-perc-l1). Returns
    ``{"levels": [...], name: [value per level], name + "_relative": [value / value at level 0],
    "weights": ...}``.
    """
    out: dict = {"levels": list(levels)}
    with torch.no_grad():
        for name, loss in losses.items():
            vals = []
            for level in levels:
                x = reduce_contrast(image, level)
                a, b = x[..., :, :-shift], x[..., :, shift:]  # the image and itself shifted
                vals.append(float(loss(a, b, reduction="mean")))
            out[name] = vals
            out[name + "_relative"] = [v / vals[0] for v in vals]
            out["weights"] = loss.weights_id
    return out


# ---------------------------------------------------------------------------------------------
# Plots, written to image files.


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _pyplot().close(fig)


def _images(ds, idx) -> torch.Tensor:
    return torch.stack([ds[int(i)][0] for i in idx])


def _grid(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of (n, C, H, W) images in [-1, 1] -> an (H·rows, W·n, 3) array in [0, 1]."""
    rows = [torch.cat(list(r.clamp(-1, 1).add(1).div(2).expand(-1, 3, -1, -1)), dim=2) for r in rows]
    return torch.cat(rows, dim=1).permute(1, 2, 0).numpy()


def plot_roc(path, scores, labels, aucs, *, title="", mark=None) -> None:
    """ROC curve of every finite score, labelled with its ROC AUC (``aucs``); ``mark``: the
    calibrated threshold's point (:func:`mark_threshold`, x = FPR, y = TPR)."""
    from sklearn.metrics import roc_curve

    fig, ax = _pyplot().subplots(figsize=(5, 5))
    for k, v in scores.items():
        if np.isfinite(v).all():
            fpr, tpr, _ = roc_curve(labels, v)
            ax.plot(fpr, tpr, label=f"{k} ({aucs[k]:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    mark_threshold(ax, mark)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, {title}")
    ax.legend(fontsize=8)
    _save(fig, path)


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

    fig, ax = _pyplot().subplots(figsize=(5, 5))
    for k, v in scores.items():
        if np.isfinite(v).all():
            precision, recall, _ = precision_recall_curve(labels, v)
            ax.step(recall, precision, where="post", label=f"{k} (AP {aps[k]:.3f})")
    ax.axhline(float(np.mean(labels)), color="k", ls=":", lw=0.8)
    mark_threshold(ax, mark)
    ax.set(xlabel="recall (true positive rate)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"precision-recall, {title}")
    ax.legend(fontsize=8)
    _save(fig, path)


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
        rows += [x.cpu(), model.G(model.E(x)).cpu()]  # x above G(E(x))
    model.train(was_training)
    fig, ax = _pyplot().subplots(figsize=(n, len(rows) * 1.1))
    ax.imshow(_grid(rows))
    ax.set_axis_off()
    ax.set_title("normal: x / G(E(x))   —   anomalous: x / G(E(x))", fontsize=9)
    _save(fig, path)


def plot_extremes(path, ds, score: np.ndarray, title: str, n: int = 10, map_fn=None,
                  map_kind: str = "rel-perc-l1") -> None:
    """Fig. 5: the ``n`` least (top row) and most (middle row) anomalous images by ``score``;
    with ``map_fn`` ((indices in ``ds``, images) -> (n, h, w) anomaly maps, e.g. by
    ``piad.anomaly_map``) the maps of the most anomalous ones below them, upsampled to the images
    (bilinear), on one colour scale."""
    order = np.argsort(score, kind="stable")
    n = min(n, len(order) // 2)
    rows = [_images(ds, order[:n]), _images(ds, order[::-1][:n])]  # least, most anomalous
    plt = _pyplot()
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
    _save(fig, path)


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
    plt = _pyplot()
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return w * k, h * k


def plot_latent_norms(path, scores: dict, labels: np.ndarray, prior: tuple[torch.Tensor, torch.Tensor], *,
                      title: str = "") -> None:
    """Histograms of ``||E(x)||`` (the paper's score, left) and ``||E(x) - c||`` with c = mean
    E(G(z)) (right) for normal (label 0) and anomalous (1) test images and for E(G(z)) (``prior``
    = ``latent_norm.encode_prior``), each panel titled with the score's ROC AUC and that of its
    negation; the figure's title says how far E is from inverting G (offset of E(G(z)),
    cos(E(G(z)), z))."""
    from sklearn.metrics import roc_auc_score

    z, gen = (t.cpu() for t in prior)
    panels = (("latent-norm", "||E(x)||₂", gen.norm(dim=1)),
              ("latent-norm-centred", "||E(x) - mean E(G(z))||₂", (gen - gen.mean(0)).norm(dim=1)))
    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 4))
    for ax, (key, xlabel, gen_values) in zip(axes, panels):
        values, auc = scores[key], roc_auc_score(labels, scores[key])
        groups = ((values[labels == 0], "normal test"), (values[labels == 1], "anomalous test"),
                  (gen_values.numpy(), "generated, E(G(z))"))
        bins = np.histogram_bin_edges(np.concatenate([g for g, _ in groups]), bins=40)
        for v, name in groups:
            ax.hist(v, bins=bins, density=True, histtype="step", lw=1.5,
                    label=f"{name} (n={len(v)}, median {np.median(v):.3g})")
        ax.set(xlabel=xlabel, ylabel="density", title=f"ROC AUC {auc:.3f} (negated: {1 - auc:.3f})")
        ax.legend(fontsize=8)
    cos = torch.nn.functional.cosine_similarity(gen, z).mean()
    fig.suptitle(f"{title}; ||mean E(G(z))|| = {gen.mean(0).norm():.3g}, mean ||E(G(z))|| = "
                 f"{gen.norm(dim=1).mean():.3g}, mean cos(E(G(z)), z) = {cos:.3g}", fontsize=10)
    _save(fig, path)


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


def plot_contamination(path, rows: list[dict], title: str) -> None:
    """:func:`contamination_curves` of ``rows`` as error bars vs. contamination P, one line per variant."""
    fig, ax = _pyplot().subplots(figsize=(5, 4))
    for label, (ps, mean, std) in contamination_curves(rows).items():
        ax.errorbar(ps, mean, yerr=std, marker="o", capsize=3, label=label)
    ax.set(xlabel="contamination P (fraction of anomalies in training)", ylabel="ROC AUC", title=title)
    ax.legend()
    _save(fig, path)
