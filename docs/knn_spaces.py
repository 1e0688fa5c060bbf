"""The k-NN's feature space measured (docs/knn.md): flattened relu4_2 (the default), eq. (3)'s μ/σ
normalisation, spatial pooling, and k, on k-NN run folders (``--method knn``) that hold their
checkpoint.pt (those of ``results/fashion-mnist-knn/`` are not committed: its table.md's command
writes them again).

Each run's checkpoint.pt holds its bank (the training images' flattened relu4_2 maps); this script
computes the test images' features once per class and scores them in every space; the flat k = 1
numbers are the run's own (its metrics.json). docs/knn_spaces.csv came from

    python docs/knn_spaces.py RUNS/pullover RUNS/shirt RUNS/bag --k 1 5 --out docs/knn_spaces.csv
"""
import argparse
import csv
import sys
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's modules, from docs/

import evaluate  # noqa: E402
import features  # noqa: E402
from baselines import knn  # noqa: E402


def spaces(bank: torch.Tensor, shape, stats: features.FeatureStats) -> dict:
    """{name: f(features (N, C·h·w)) -> (N, D)}: the spaces compared."""
    c, h, w = shape
    sigma = stats.std.view(1, c, 1, 1)

    def maps(f):
        return f.view(len(f), c, h, w)
    return {"flat": lambda f: f,
            "flat, eq. (3) μ/σ": lambda f: (maps(f) / sigma).flatten(1),  # μ cancels in a difference
            "mean-pooled": lambda f: maps(f).mean((2, 3)),
            "max-pooled": lambda f: maps(f).amax((2, 3))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--k", nargs="+", type=int, default=[1, 2, 5])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for run in map(Path, a.runs):
        state, cfg, model, _ = evaluate.load_run(run / "checkpoint.pt", device="cpu")
        ds = cfg.load_data()
        test = torch.cat([model.embed(x) for x, _ in torch.utils.data.DataLoader(ds.test, batch_size=256)])
        labels = ds.test.labels.numpy()
        stats = features.select_stats(cfg.stats, model.features)
        for name, f in spaces(model.bank, model.shape, stats).items():
            probe = knn.KNN(torch.nn.Identity(), f(model.bank), model.shape, 1)
            q = f(test)
            for k in a.k:
                probe.k = k
                score = torch.cat([probe.neighbours(q[i:i + 256])[0].mean(1) for i in range(0, len(q), 256)])
                rows.append({"class": run.name, "space": name, "k": k,
                             "roc_auc": round(float(roc_auc_score(labels, score.numpy())), 4)})
                print(rows[-1], flush=True)
    with open(a.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
