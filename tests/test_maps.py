"""Anomaly maps (eq. (4) position by position) and what evaluate.py writes from them.

A map must sum to the image's anomaly score A(x) of eq. (1): checked in float64 for every
network preset against the score evaluate.py computes (fused op and PyTorch), and for every
reconstruction distance. ``evaluate.py --images`` writes maps_NAME.npz (one map per CSV id),
one overlay PNG per image at the image's size (times a whole factor for small images) and
extremes_NAME.png.
"""
import csv
import warnings

import numpy as np
import pytest
import torch

import evaluate
import features
import fused_op
import losses
import piad
import presets
import train

IMPLS = ["torch"] + (["ext"] if fused_op.is_built() else [])


@pytest.fixture(scope="module")
def vgg64():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights warn: the identity holds for any weights
        return features.VGG19Features(weights="random", seed=0).double()


def _stats(vgg, c=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return features.FeatureStats(torch.randn(c, generator=g, dtype=torch.float64) * 0.1,
                                 torch.rand(c, generator=g, dtype=torch.float64) + 0.5, vgg.weights_id, vgg.layer, 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", ["mnist", "cifar10", "lsun", "celeba"])
def test_the_map_sums_to_the_anomaly_score_for_every_preset(name, impl, vgg64):
    cfg = presets.network(name)
    channels = 1 if name == "mnist" else 3
    torch.manual_seed(0)
    model = piad.PIAD(config=cfg, channels=channels).double()
    loss = losses.ReconstructionLoss(kind="rel-perc-l1", features=vgg64, stats=_stats(vgg64), reduction="none",
                                     impl=impl, check_range=False)
    x = torch.rand(3, channels, cfg.image_size, cfg.image_size, dtype=torch.float64) * 2 - 1
    scores = piad.anomaly_score(model, x, loss, batch_size=2)          # eq. (1), as evaluate.py
    maps = piad.anomaly_map(model, x, loss.map, batch_size=2)
    s = cfg.image_size // 8                                          # relu4_2: 1/8 of the image
    assert maps.shape == (3, s, s) and maps.dtype == torch.float64 and (maps >= 0).all()
    torch.testing.assert_close(maps.sum((1, 2)), scores, rtol=0, atol=1e-10)


def test_the_map_is_eq4_per_position():
    """Each position: the channel sum of |n(f(x)) - n(f(y))| over the image's denominator."""
    g = torch.Generator().manual_seed(1)
    fx, fy = (torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    mean, std = torch.randn(5, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    nx, ny = (fx - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), (fy - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    m = losses.rel_perc_l1_torch(fx, fy, mean, std, 1e-6, per_position=True)
    for n in range(2):
        den = nx[n].abs().sum() + 1e-6
        for i in range(3):
            for j in range(4):
                assert m[n, i, j].item() == pytest.approx(((nx[n, :, i, j] - ny[n, :, i, j]).abs().sum() / den).item(),
                                                          rel=1e-12)
    torch.testing.assert_close(m.sum((1, 2)), losses.rel_perc_l1_torch(fx, fy, mean, std, 1e-6), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", losses.KINDS)
def test_every_distance_has_a_map_that_sums_to_it(kind, vgg64):
    feat = kind not in losses.PIXEL_KINDS
    loss = losses.ReconstructionLoss(kind=kind, features=vgg64 if feat else None,
                                     stats=_stats(vgg64) if feat else None, reduction="none")
    g = torch.Generator().manual_seed(2)
    x, y = (torch.rand(2, 3, 16, 24, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
    m = loss.map(x, y)
    assert m.shape == ((2, 16, 24) if not feat else (2, 2, 3))
    torch.testing.assert_close(m.sum((1, 2)), loss(x, y), rtol=0, atol=1e-10)


def test_a_per_sample_function_is_refused_as_a_map_and_a_map_as_a_score():
    model = piad.PIAD(config=presets.network("mnist"), channels=1)
    x = torch.zeros(2, 1, 32, 32)
    with pytest.raises(ValueError, match="map per sample"):
        piad.anomaly_map(model, x, lambda a, b: (a - b).flatten(1).mean(1))
    with pytest.raises(ValueError, match="one value per sample"):
        piad.anomaly_score(model, x, lambda a, b: (a - b).mean(1))


# --- evaluate.py --images -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-iteration run with the rel-perc-l1 loss (random VGG), a calibrated threshold, and a
    folder of images."""
    from PIL import Image

    w = tmp_path_factory.mktemp("maps")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.train(train.parse_args(["--dataset", "digits", "--normal", "3", "--batch-size", "8", "--vgg-weights",
                                      "random", "--no-progress", "--iterations", "2", "--calibration", "0.2",
                                      "--out", str(w / "run")]))
    r = np.random.default_rng(0)
    (w / "imgs" / "sub").mkdir(parents=True)
    sizes = {"imgs/a.png": (40, 30), "imgs/sub/b.png": (20, 20, 3), "imgs/c.png": (200, 300, 3)}
    for rel, shape in sizes.items():
        Image.fromarray(r.integers(0, 256, shape, dtype=np.uint8)).save(w / rel)
    return w, sizes


def test_images_writes_maps_overlays_and_extremes(run, capsys):
    from PIL import Image

    w, sizes = run
    before = (w / "run" / "extremes.png").read_bytes()
    evaluate.main(["--checkpoint", str(w / "run" / "checkpoint.pt"), "--images", str(w / "imgs")])
    assert "anomaly maps (rel-perc-l1)" in capsys.readouterr().out
    with open(w / "run" / "scores_imgs.csv") as fh:
        rows = {r["id"]: r for r in csv.DictReader(fh)}
    maps = np.load(w / "run" / "maps_imgs.npz")
    assert set(maps.keys()) == set(rows) == {str(w / rel) for rel in sizes}
    for ident, row in rows.items():
        assert maps[ident].shape == (4, 4)  # 32×32 images, relu4_2
        assert maps[ident].sum() == pytest.approx(float(row["rel-perc-l1"]), rel=1e-5)
    for rel, shape in sizes.items():
        h, w_ = shape[:2]
        k = -(-128 // min(h, w_))  # small images are enlarged by a whole factor
        with Image.open(w / "run" / "overlays_imgs" / rel.removeprefix("imgs/")) as im:
            assert im.size == (w_ * k, h * k)
    assert (w / "run" / "extremes_imgs.png").stat().st_size > 0
    assert (w / "run" / "extremes.png").read_bytes() == before  # the run's own figure is not overwritten


# --- the exported scorer ------------------------------------------------------------------------

LOAD_WITH_TORCH_ONLY = r"""
import sys, json, importlib.abc
import torch

class NoProject(importlib.abc.MetaPathFinder):  # the project's modules and its compiled op are unreachable
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in set(sys.argv[3].split(",")):
            raise ImportError(f"{name} is not allowed here")
sys.meta_path.insert(0, NoProject())
extra = {"piad.json": ""}
scorer = torch.export.load(sys.argv[1], extra_files=extra).module()
x = torch.load(sys.argv[2])
scores, maps, *decision = scorer(x)  # a run with a threshold also returns `anomalous`
torch.save({"scores": scores, "maps": maps, "anomalous": decision[0] if decision else None,
            "meta": json.loads(extra["piad.json"])}, sys.argv[2] + ".out")
"""


def test_the_exported_scorer_equals_evaluate_and_loads_with_torch_only(run, tmp_path):
    import subprocess
    import sys

    import data
    from test_imports import CHAIN

    w, sizes = run
    ckpt = str(w / "run" / "checkpoint.pt")
    evaluate.main(["--checkpoint", ckpt, "--export", str(tmp_path / "scorer.pt2")])
    state, _, model, rec_loss = evaluate.load_run(ckpt)
    ds, paths = data.load_image_folder(str(w / "imgs"), image_size=32, channels=1)
    scores, _ = evaluate.compute_scores(model, ds, rec_loss, maps=True)  # what evaluate.py --images computes
    threshold = state["scoring"]["threshold"]
    x01 = (ds.images + 1) / 2                                             # the same images in [0, 1]
    torch.save(x01, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", LOAD_WITH_TORCH_ONLY, str(tmp_path / "scorer.pt2"), str(tmp_path / "x.pt"),
                    ",".join(CHAIN + ("piad_C",))], check=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    got = torch.load(tmp_path / "x.pt.out")
    np.testing.assert_allclose(got["scores"].numpy(), scores["rel-perc-l1"], rtol=1e-5, atol=0)
    np.testing.assert_allclose(got["maps"].numpy(), scores["map"], rtol=1e-5, atol=1e-7)
    assert got["meta"]["image_size"] == 32 and got["meta"]["distance"] == "rel-perc-l1"
    np.testing.assert_array_equal(got["anomalous"].numpy(), evaluate.decide(scores, threshold))  # the decisions
    assert got["meta"]["threshold"] == threshold
    scorer = torch.export.load(tmp_path / "scorer.pt2").module()  # any batch size
    one, _, _ = scorer(x01[1:2])
    np.testing.assert_allclose(one.numpy(), scores["rel-perc-l1"][1:2], rtol=1e-5, atol=0)


# --- the localisation study (docs/anomaly_maps_study.py) -----------------------------------------

def _study():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "docs" / "anomaly_maps_study.py"
    spec = importlib.util.spec_from_file_location("anomaly_maps_study", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_study_pastes_a_patch_with_its_mask_and_scores_maps_against_it():
    study = _study()
    g = torch.Generator().manual_seed(0)
    target, source = -torch.ones(1, 32, 32), torch.ones(1, 32, 32)
    out, mask = study.paste(target, source, 8, g)
    assert mask.sum() == 64 and (out[0][mask] == 1).all() and (out[0][~mask] == -1).all()
    rows, cols = mask.nonzero(as_tuple=True)
    assert rows.min() >= study.MARGIN and rows.max() < 32 - study.MARGIN and cols.max() - cols.min() == 7
    assert study.paste(target, target.clone(), 8, g) is None  # nothing pasted: the pair is left out
    masks = np.stack([mask.numpy()] * 3)
    perfect = study.localisation(masks.astype(float) + 0.01 * np.random.default_rng(0).random(masks.shape), masks)
    assert perfect == {"pixel_auroc": 1.0, "per_image_auroc": 1.0, "max_in_patch": 1.0}
    inverted = study.localisation(1.0 - masks, masks)
    assert inverted["pixel_auroc"] == 0.0 and inverted["max_in_patch"] == 0.0
