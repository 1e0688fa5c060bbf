"""tools/experiments.py: grid resume, failures, tables (values and layout), CSV and the contamination plot."""
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tools import experiments as ex
import checkpoint
import figures
import train

V_PIAD, V_LN = ex.Variant("piad"), ex.Variant("latent-norm", method="latent-norm")


def _grid(**kw):
    base = dict(name="t", dataset="fashion-mnist", classes=("0", "8"), seeds=(0, 1), variants=(V_PIAD, V_LN))
    base.update(kw)
    return ex.Grid(**base)


def _auc(cfg):
    """A deterministic fake AUROC per cell."""
    return round(0.5 + 0.04 * int(cfg.normal) / 8 + 0.01 * cfg.seed + 0.1 * (cfg.method == "piad")
                 - cfg.contamination, 6)


class FakeTrain:
    def __init__(self, fail=lambda cfg: False):
        self.calls, self.fail = [], fail

    def __call__(self, cfg):
        self.calls.append(cfg)
        if self.fail(cfg):
            raise RuntimeError("boom")
        m = {"roc_auc": _auc(cfg), "score": "latent-norm" if cfg.method == "latent-norm" else cfg.loss,
             "roc_auc_per_score": {"mse": 0.5, "latent-norm": 0.6}}
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "metrics.json").write_text(json.dumps(m))
        return m


def _write_metrics(folder, auc):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"roc_auc": auc, "roc_auc_per_score": {"mse": auc}}))


def test_cell_folders_are_distinct_and_follow_the_layout(tmp_path):
    grid = ex.PRESETS["table3-ablation"]
    folders = {c.folder(tmp_path) for c in grid.cells()}
    assert len(folders) == len(grid.cells()) == 10 * 5
    cell = ex.Cell("cifar10", "3", 1, ex.Variant("baseline", loss="mse", weights_policy="fixed"), 0.05)
    assert cell.folder(tmp_path) == tmp_path / "cifar10" / "piad-mse-fixed-c0.05" / "normal3-s1"


def test_resume_skips_finished_cells_and_resumes_checkpoints(tmp_path):
    grid = _grid()
    cells = grid.cells()
    assert len(cells) == 2 * 2 * 2
    _write_metrics(cells[0].folder(tmp_path), 0.9)
    _write_metrics(cells[5].folder(tmp_path), 0.9)
    cells[2].folder(tmp_path).mkdir(parents=True)
    (cells[2].folder(tmp_path) / checkpoint.CHECKPOINT).write_bytes(b"half-finished")
    fake = FakeTrain()
    assert ex.run_grid(grid, tmp_path, train_fn=fake, log=lambda s: None, iterations=7) == []
    assert len(fake.calls) == 6
    outs = {c.out: c for c in fake.calls}
    assert str(cells[0].folder(tmp_path)) not in outs and str(cells[5].folder(tmp_path)) not in outs
    assert outs[str(cells[2].folder(tmp_path))].resume is True
    assert sum(c.resume for c in fake.calls) == 1
    assert all(c.iterations == 7 and c.protocol is None for c in fake.calls)
    assert {(c.method, c.loss) for c in fake.calls} == {("piad", "rel-perc-l1"), ("latent-norm", "rel-perc-l1")}
    # a second pass trains nothing
    again = FakeTrain()
    ex.run_grid(grid, tmp_path, train_fn=again, log=lambda s: None)
    assert again.calls == []


def test_a_failing_cell_does_not_stop_the_grid(tmp_path):
    grid = _grid()
    fake = FakeTrain(fail=lambda cfg: cfg.normal == "0" and cfg.seed == 1 and cfg.method == "piad")
    failures = ex.run_grid(grid, tmp_path, train_fn=fake, log=lambda s: None)
    assert len(fake.calls) == len(grid.cells())
    assert len(failures) == 1 and "boom" in failures[0][1]
    text = (tmp_path / "failures.txt").read_text()
    assert "normal0-s1" in text and "RuntimeError: boom" in text
    table = ex.write_tables(grid, tmp_path)
    assert table["0"]["piad"][2] == 1  # one seed of that cell finished
    # rerunning retries only the failed cell, and the failures file is refreshed
    retry = FakeTrain()
    assert ex.run_grid(grid, tmp_path, train_fn=retry, log=lambda s: None) == []
    assert len(retry.calls) == 1 and not (tmp_path / "failures.txt").exists()


def test_table_values_match_hand_computation(tmp_path):
    grid = _grid(seeds=(0, 1, 2))
    values = {("0", "piad"): [0.90, 0.92, 0.94], ("8", "piad"): [0.70, 0.80, 0.60],
              ("0", "latent-norm"): [0.50, 0.60, 0.55], ("8", "latent-norm"): [0.65]}  # one seed only
    for cell in grid.cells():
        v = values[(cell.normal, cell.variant.label)]
        if cell.seed < len(v):
            _write_metrics(cell.folder(tmp_path), v[cell.seed])
    table = ex.write_tables(grid, tmp_path)
    mean, std, n = table["0"]["piad"]
    assert (mean, n) == (pytest.approx(0.92), 3) and std == pytest.approx(0.02)  # sample std
    assert table["8"]["piad"][:2] == (pytest.approx(0.70), pytest.approx(0.10))
    assert np.isnan(table["8"]["latent-norm"][1]) and table["8"]["latent-norm"][2] == 1
    # avg = mean over classes of per-class means; ± = std over seeds of the class-averaged AUROC
    avg_mean, avg_std, _ = table["avg"]["piad"]
    assert avg_mean == pytest.approx((0.92 + 0.70) / 2)
    assert avg_std == pytest.approx(np.std([(0.90 + 0.70) / 2, (0.92 + 0.80) / 2, (0.94 + 0.60) / 2], ddof=1))
    assert table["avg"]["latent-norm"][0] == pytest.approx((0.55 + 0.65) / 2)
    assert np.isnan(table["avg"]["latent-norm"][1])  # only seed 0 is shared by both classes

    md = (tmp_path / "table.md").read_text().splitlines()
    header = next(i for i, line in enumerate(md) if line.startswith("| normal"))
    assert md[header] == "| normal | piad | latent-norm |"
    rows = [line.split(" | ")[0].strip("| ") for line in md[header + 2:]]
    assert rows == ["0 (t-shirt-top)", "8 (bag)", "avg"]
    assert md[header + 2] == "| 0 (t-shirt-top) | 0.920 ± 0.020 | 0.550 ± 0.050 |"
    assert md[header + 3] == "| 8 (bag) | 0.700 ± 0.100 | 0.650 |"
    assert md[header + 4].startswith("| avg | 0.810 ± ")

    with open(tmp_path / "table.csv") as fh:
        summary = list(csv.DictReader(fh))
    assert [r["normal"] for r in summary] == ["0", "8", "avg"]
    assert float(summary[0]["piad mean"]) == pytest.approx(0.92) and summary[1]["latent-norm n"] == "1"


def test_missing_cells_show_a_dash(tmp_path):
    grid = _grid(seeds=(0,))
    _write_metrics(grid.cells()[0].folder(tmp_path), 0.8)
    ex.write_tables(grid, tmp_path)
    md = (tmp_path / "table.md").read_text()
    assert "| 0 (t-shirt-top) | 0.800 | – |" in md and "1/4 cells finished" in md


def test_cells_csv_has_one_row_per_cell_and_every_score(tmp_path):
    grid = _grid(contaminations=(0.0, 0.05))
    ex.run_grid(grid, tmp_path, train_fn=FakeTrain(), log=lambda s: None)
    ex.write_tables(grid, tmp_path)
    with open(tmp_path / "cells.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(grid.cells()) == 16
    assert {"dataset", "normal", "method", "loss", "contamination", "seed", "roc_auc", "auc_mse",
            "auc_latent-norm"} <= set(rows[0])
    keys = {(r["normal"], r["method"], r["contamination"], r["seed"]) for r in rows}
    assert len(keys) == 16
    r = next(r for r in rows if r["normal"] == "8" and r["method"] == "piad" and r["seed"] == "1"
             and float(r["contamination"]) == 0.05)
    assert float(r["roc_auc"]) == pytest.approx(0.5 + 0.04 + 0.01 + 0.1 - 0.05)
    md = (tmp_path / "table.md").read_text()
    assert "| normal | piad P=0 | piad P=0.05 | latent-norm P=0 | latent-norm P=0.05 |" in md


def test_contamination_plot_is_written_for_several_levels(tmp_path):
    grid = _grid(contaminations=(0.0, 0.05, 0.1), seeds=(0,))
    ex.run_grid(grid, tmp_path / "a", train_fn=FakeTrain(), log=lambda s: None)
    ex.write_tables(grid, tmp_path / "a")
    png = tmp_path / "a" / "auroc_vs_contamination.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    single = _grid(seeds=(0,))
    ex.run_grid(single, tmp_path / "b", train_fn=FakeTrain(), log=lambda s: None)
    ex.write_tables(single, tmp_path / "b")
    assert not (tmp_path / "b" / "auroc_vs_contamination.png").exists()


def test_contamination_curves_are_means_and_sample_stds_over_classes_and_seeds(tmp_path):
    grid = _grid(contaminations=(0.0, 0.1))  # classes 0, 8; seeds 0, 1
    ex.run_grid(grid, tmp_path, train_fn=FakeTrain(), log=lambda s: None)
    curves = figures.contamination_curves(ex.collect(grid, tmp_path))
    assert set(curves) == {V_PIAD.label, V_LN.label}
    for v in grid.variants:
        ps, mean, std = curves[v.label]
        assert ps == [0.0, 0.1]
        for p, m, sd in zip(ps, mean, std):
            vals = [_auc(SimpleNamespace(normal=k, seed=s, method=v.method, contamination=p))
                    for k in grid.classes for s in grid.seeds]
            assert m == pytest.approx(np.mean(vals)) and sd == pytest.approx(np.std(vals, ddof=1))
    one = _grid(classes=("0",), seeds=(0,), contaminations=(0.0, 0.1))
    assert all(std == [0.0, 0.0] for _, _, std in figures.contamination_curves(ex.collect(one, tmp_path)).values())


def test_presets_and_cli_overrides(tmp_path, monkeypatch):
    assert ex.PRESETS["table2-mnist"].seeds == (0, 1, 2) and len(ex.PRESETS["table2-mnist"].cells()) == 30
    coil = ex.PRESETS["table3-coil100"].classes
    assert len(coil) == len(set(coil)) == 30 and all(1 <= int(k) <= 100 for k in coil)
    assert coil[:3] == ("79", "48", "65") and coil[-1] == "55"  # the authors' fixed list
    ablation = ex.PRESETS["table3-ablation"].variants
    assert [v.label for v in ablation] == ["baseline", "mse", "perc", "perc-l1", "rel-perc-l1"]
    # the authors' manual weights and pixel L2 (configs/ablation_cifar10_L2_manual_weights.yaml)
    assert (ablation[0].loss, ablation[0].weights_policy, ablation[0].gamma_g, ablation[0].gamma_e) == \
        ("mse-imagenet", "fixed", 100.0, 10.0)
    assert ablation[1].loss == "mse-imagenet" and ablation[1].weights_policy == "gradnorm"
    cont = ex.PRESETS["contamination"]
    assert cont.contaminations == (0.0, 0.01, 0.02, 0.05, 0.1)
    assert [v.method for v in cont.variants] == ["piad", "latent-norm"]
    side = ex.PRESETS["knn-fmnist"]  # PIAD and the k-NN on the same cells: Table 3's Fashion-MNIST ones
    assert [v.method for v in side.variants] == ["piad", "knn"] and side.columns() == ["PIAD", "k-NN"]
    assert (side.dataset, side.classes, side.seeds, side.protocol) == ("fashion-mnist", ex.DIGITS, (0,), "gpnd")

    a = ex.parse_args(["custom", "--dataset", "fashion-mnist", "--classes", "0", "8", "--seeds", "0", "1",
                       "--methods", "piad", "latent-norm", "--losses", "rel-perc-l1",
                       "--contaminations", "0", "0.05", "--iterations", "200"])
    g = ex.build_grid(a)
    assert len(g.cells()) == 2 * 2 * 2 * 2 and g.columns()[0] == "piad P=0"
    g2 = ex.build_grid(ex.parse_args(["table2-cifar10", "--classes", "3", "--seeds", "5"]))
    assert [(c.normal, c.seed) for c in g2.cells()] == [("3", 5)] and g2.protocol == "split"

    # --table-only never trains; the default root names short schedules
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ex.train_mod, "train", lambda cfg: pytest.fail("--table-only must not train"))
    ex.main(["table3-fmnist", "--classes", "0", "--iterations", "50", "--table-only"])
    assert (tmp_path / "runs" / "experiments" / "table3-fmnist-it50" / "table.md").is_file()


def test_cli_runs_cells_through_train(tmp_path, monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(ex.train_mod, "train", fake)
    ex.main(["custom", "--dataset", "digits", "--classes", "3", "--methods", "latent-norm", "--losses", "mse",
             "--iterations", "5", "--root", str(tmp_path), "--vgg-weights", "random", "--device", "cpu",
             "--data-root", "/nowhere", "--no-progress"])
    (cfg,) = fake.calls
    assert (cfg.dataset, cfg.normal, cfg.method, cfg.loss, cfg.iterations) == ("digits", "3", "latent-norm", "mse", 5)
    assert (cfg.vgg_weights, cfg.device, cfg.data_root, cfg.progress) == ("random", "cpu", "/nowhere", False)
    assert (tmp_path / "table.md").is_file() and (tmp_path / "cells.csv").is_file()


def test_piad_and_knn_side_by_side_on_the_same_cells(tmp_path):
    """A grid of both methods trains each cell through train.py into its own folder, one table."""
    n = train.torch.get_num_threads()
    try:
        ex.main(["custom", "--dataset", "digits", "--classes", "3", "--methods", "piad", "knn", "--iterations", "2",
                 "--root", str(tmp_path), "--vgg-weights", "random", "--device", "cpu", "--no-progress",
                 "--threads-per-cell", "1"])
    finally:
        train.torch.set_num_threads(n)
    cells = {r["method"]: r for r in csv.DictReader(open(tmp_path / "cells.csv"))}
    assert set(cells) == {"piad", "knn"} and cells["knn"]["score"] == "knn" and cells["piad"]["score"] == "rel-perc-l1"
    knn_run = json.loads((tmp_path / "digits" / "knn-rel-perc-l1-c0" / "normal3-s0" / "metrics.json").read_text())
    piad_run = json.loads((tmp_path / "digits" / "piad-rel-perc-l1-c0" / "normal3-s0" / "metrics.json").read_text())
    assert knn_run["n_test"] == piad_run["n_test"] and knn_run["n_train"] == piad_run["n_train"]  # the same split
    assert "| normal | piad | knn |" in (tmp_path / "table.md").read_text()
