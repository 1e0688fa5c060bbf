"""Do the anomaly maps point at the anomaly? A study on pasted patches (docs/anomaly-maps.md).

Nobody tuned anything on this: a square patch of side P is cut from an image and pasted at the
same place into a normal test image (so the mask of the anomaly is known), and each pasted image
is scored by a trained run. Two maps are compared against the mask:

* ``eq. (4)``: ``piad.anomaly_map`` with relative-perceptual-L1 (the map of
  ``evaluate.py --images``), (S/8, S/8), upsampled to the image (bilinear) as for display;
* ``|x - G(E(x))|``: the pixel map of the same reconstruction (``ReconstructionLoss("l1").map``);
* ``centre prior``: no model, minus the distance to the image's centre: what knowing only that
  patches lie inside the central pixels is worth.

Measured per map: pixel-level ROC AUC against the mask over all pixels of all pasted images
(pooled, as anomalib's pixel AUROC), the mean of the per-image pixel ROC AUCs, and how often the
map's maximum falls inside the patch (chance: P²/S²). Patch sources: test images of the anomalous
classes (the study) and, as a control, other normal test images (a seam with normal content).
Patch places are uniform with the patch inside the central (S - 8)² pixels; a draw whose patch
differs from what it covers by less than 0.05 on average (in [-1, 1] units, e.g. background on
background) is drawn again, as no anomaly was pasted.

    python docs/anomaly_maps_study.py --checkpoint RUN/checkpoint.pt [--n 500] [--sizes 8 12 16] [--seed 0]

prints a Markdown table and writes ``anomaly_maps_study.json``, ``anomaly_maps_examples.png`` and
the first pasted images as PNG files (``pasted_examples/``) beside the checkpoint (or in ``--out``).
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
import figures  # noqa: E402
import losses  # noqa: E402
import piad  # noqa: E402

MARGIN = 4      # patches stay inside the central (S - 2·MARGIN)² pixels (Fashion-MNIST is padded)
MIN_CHANGE = 0.05


def paste(target: torch.Tensor, source: torch.Tensor, size: int, gen: torch.Generator,
          tries: int = 100) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``target`` (C, S, S) with the square of side ``size`` of ``source`` pasted at the same place,
    and its mask (S, S) bool; the place is drawn again while the patch changes < ``MIN_CHANGE``
    (None after ``tries`` draws: the pair is left out)."""
    s = target.shape[-1]
    for _ in range(tries):
        top, left = (int(v) for v in torch.randint(MARGIN, s - MARGIN - size + 1, (2,), generator=gen))
        box = (slice(None), slice(top, top + size), slice(left, left + size))
        if (source[box] - target[box]).abs().mean() >= MIN_CHANGE:
            out, mask = target.clone(), torch.zeros(s, s, dtype=torch.bool)
            out[box] = source[box]
            mask[box[1:]] = True
            return out, mask
    return None


def localisation(maps: np.ndarray, masks: np.ndarray) -> dict:
    """Pixel ROC AUC (pooled and mean per image) and hit rate of ``maps`` (N, S, S) vs ``masks``."""
    flat = maps.reshape(len(maps), -1)
    hits = masks.reshape(len(masks), -1)[np.arange(len(maps)), flat.argmax(1)]
    return {"pixel_auroc": float(roc_auc_score(masks.ravel(), maps.ravel())),
            "per_image_auroc": float(np.mean([roc_auc_score(k.ravel(), m.ravel()) for m, k in zip(maps, masks)])),
            "max_in_patch": float(hits.mean())}


def centre_prior(n: int, s: int) -> np.ndarray:
    """A map that knows nothing but where patches tend to be: minus the distance to the centre."""
    r = np.arange(s) - (s - 1) / 2
    return np.broadcast_to(-np.hypot(r[:, None], r[None, :]), (n, s, s))


def study(checkpoint: str, *, n: int, sizes, seed: int, out: Path) -> list[dict]:
    state, cfg, model, rec_loss = evaluate.load_run(checkpoint, device="cpu")
    ds = cfg.load_data()
    labels = np.asarray([int(y) for _, y in ds.test])
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    eq4 = evaluate.map_loss(rec_loss)
    pixel = losses.ReconstructionLoss(kind="l1", reduction="none", check_range=False)
    gen = torch.Generator().manual_seed(seed)
    targets = normal[torch.randperm(len(normal), generator=gen)[:n].numpy()]  # the same images in every row
    clean = torch.stack([ds.test[int(i)][0] for i in targets])
    clean_scores = dict(zip(targets.tolist(), piad.anomaly_score(model, clean, eq4, batch_size=128).tolist()))
    rows, examples = [], []
    for source_name, pool in (("anomalous class", anomalous), ("normal class (control)", normal)):
        for size in sizes:
            src = pool[torch.randint(len(pool), (len(targets),), generator=gen).numpy()]
            done = [(i, paste(ds.test[int(i)][0], ds.test[int(j)][0], size, gen)) for i, j in zip(targets, src) if i != j]
            idx = [int(i) for i, p in done if p is not None]
            x = torch.stack([p[0] for _, p in done if p is not None])
            masks = torch.stack([p[1] for _, p in done if p is not None]).numpy()
            both = lambda a, b: {"eq4": eq4.map(a, b), "pixel": pixel.map(a, b), "score": eq4(a, b)}  # noqa: E731
            got = piad.anomaly_score(model, x, both, batch_size=128)
            s = x.shape[-1]
            maps = {"eq. (4), upsampled": figures.upsample_maps(got["eq4"], s).numpy(),
                    "|x - G(E(x))|": got["pixel"].numpy(), "centre prior (no model)": centre_prior(len(idx), s)}
            image_auc = roc_auc_score(np.r_[np.zeros(len(idx)), np.ones(len(idx))],
                                      np.r_[[clean_scores[i] for i in idx], got["score"].numpy()])
            for name, m in maps.items():
                rows.append({"source": source_name, "patch": size, "map": name, "n": len(idx),
                             "chance_max_in_patch": size * size / s / s, **localisation(m, masks),
                             "image_auroc_pasted_vs_clean": float(image_auc)})
                print(rows[-1], flush=True)
            if source_name == "anomalous class" and size == sorted(sizes)[len(sizes) // 2]:
                examples = (torch.stack([ds.test[i][0] for i in idx[:6]]), x[:6], masks[:6],
                            maps["eq. (4), upsampled"][:6], maps["|x - G(E(x))|"][:6])
    meta = {"checkpoint": str(checkpoint), "n": n, "sizes": list(sizes), "iteration": state["iteration"], "dataset": cfg.dataset,
            "normal": cfg.normal, "seed": seed, "train_seed": cfg.seed, "vgg_weights": rec_loss.weights_id,
            "device": "cpu", "rows": rows}
    (out / "anomaly_maps_study.json").write_text(json.dumps(meta, indent=2))
    if examples:
        plot_examples(out / "anomaly_maps_examples.png", *examples)
        save_pngs(out / "pasted_examples", examples[1])
    return meta


def save_pngs(folder: Path, images: torch.Tensor) -> None:
    """The first pasted images as PNG files (input for ``evaluate.py --images``; README's overlay)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, img in enumerate(images):
        a = img.add(1).mul(127.5).round().clamp(0, 255).byte().permute(1, 2, 0).squeeze(-1).numpy()
        Image.fromarray(a).save(folder / f"pasted_{k}.png")


def plot_examples(path, clean, pasted, masks, eq4, pixel) -> None:
    plt = figures.pyplot()
    rows = (("normal test image", clean[:, 0].add(1).div(2).numpy(), "gray"),
            ("with a pasted patch (box)", pasted[:, 0].add(1).div(2).numpy(), "gray"),
            ("eq. (4) map, upsampled", eq4, "inferno"), ("|x - G(E(x))|", pixel, "inferno"))
    fig, axes = plt.subplots(len(rows), len(clean), figsize=(1.4 * len(clean), 1.5 * len(rows)), squeeze=False)
    for r, (title, imgs, cmap) in enumerate(rows):
        for c in range(len(clean)):
            ax = axes[r, c]
            ax.imshow(imgs[c], cmap=cmap)
            ax.contour(masks[c], levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_axis_off()
        axes[r, 0].set_title(title, fontsize=8, loc="left")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def table(meta: dict) -> str:
    lines = ["| patch from | P | map | pixel ROC AUC (pooled) | mean per-image pixel ROC AUC | max in patch "
             "(chance) | image ROC AUC, pasted vs clean |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in meta["rows"]:
        name = r["map"].replace("|", "\\|")
        lines.append(f"| {r['source']} | {r['patch']} | {name} | {r['pixel_auroc']:.3f} | {r['per_image_auroc']:.3f} | "
                     f"{r['max_in_patch']:.1%} ({r['chance_max_in_patch']:.1%}) | {r['image_auroc_pasted_vs_clean']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--n", type=int, default=500, help="pasted images per row")
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 12, 16])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else Path(a.checkpoint).parent
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    with torch.no_grad():
        meta = study(a.checkpoint, n=a.n, sizes=a.sizes, seed=a.seed, out=out)
    print(table(meta))


if __name__ == "__main__":
    main()
