"""How much label-pure scoring batches change the latent-norm AUROC of a pgan run (issue: their
test folders are split by label, so each of their scoring batches of 64 is all-normal or
all-anomalous, and E's minibatch-stddev feature sees the batch).

Scores ‖E(x)‖ of the run's test set three ways, with the same trained E:
  reference : each image grouped with 3 fixed training images only (pgan.PGAN.encode; evaluate.py)
  mixed     : plain E on batches of 64 in a seeded random order (labels mixed)
  pure      : plain E on batches of 64 of one label each (their validation/cell, validation/junk)

    OMP_NUM_THREADS=1 python tools/bench/bench_scoring_leak.py RUN/checkpoint.pt
"""
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import evaluate  # noqa: E402
from berg import latent_norm, system  # noqa: E402


@torch.no_grad()
def norms(encode, x: torch.Tensor, order: np.ndarray, batch: int = 64) -> np.ndarray:
    out = np.empty(len(x))
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        out[idx] = latent_norm.code_norms(encode(x[idx])).numpy()
    return out


def main(path: str) -> None:
    state, cfg, model, _ = evaluate.load_run(path, device="cpu")
    model.eval()
    ds = cfg.load_data(protocols=system.PROTOCOLS)
    x = torch.stack([ds.test[i][0] for i in range(len(ds.test))])
    y = np.asarray(ds.test.labels)
    rng = np.random.default_rng(0)
    pure = np.concatenate([rng.permutation(np.flatnonzero(y == 0)), rng.permutation(np.flatnonzero(y == 1))])
    rows = {"reference": norms(model.encode, x, np.arange(len(x))),
            "mixed": norms(model.E, x, rng.permutation(len(x))),
            "pure": norms(model.E, x, pure)}
    print(f"{path}: {cfg.dataset} normal {ds.normal}, lod {model.lod}, {len(y)} test images "
          f"({int(y.sum())} anomalous), seed {cfg.seed}")
    for k, s in rows.items():
        print(f"{k:>10}: AUROC {roc_auc_score(y, s):.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
