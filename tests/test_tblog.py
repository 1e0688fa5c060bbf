"""--tensorboard: every logged loss and γ, and reconstruction grids, in RUN/tb/ (read back with
tensorboard's own event reader); nothing there without the flag; training unchanged by it."""
import csv
import warnings

import pytest

import config
import train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

FAST = ["--dataset", "digits", "--normal", "3", "--batch-size", "8", "--loss", "mse", "--vgg-weights", "random",
        "--no-progress", "--iterations", "7", "--log-every", "2", "--no-evaluate"]


def _train(argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train.train(train.parse_args(argv))


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_tensorboard_writes_every_logged_value_and_grids_and_nothing_without_the_flag(tmp_path):
    _train(FAST + ["--out", str(tmp_path / "off")])
    _train(FAST + ["--out", str(tmp_path / "on"), "--tensorboard", "--tensorboard-images", "3"])
    assert not (tmp_path / "off" / "tb").exists()
    off, on = _rows(tmp_path / "off" / "log.csv"), _rows(tmp_path / "on" / "log.csv")
    drop = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert drop(on) == drop(off)  # log.csv is still written, and the run is the same run
    acc = EventAccumulator(str(tmp_path / "on" / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    logged = [k for k in on[0] if k not in ("iteration", "time_s") and on[0][k] != ""]
    assert set(tags["scalars"]) == {("gamma/" if k.startswith("gamma") else "loss/") + k for k in logged}
    for k in logged:
        events = acc.Scalars(("gamma/" if k.startswith("gamma") else "loss/") + k)
        assert [e.step for e in events] == [int(r["iteration"]) for r in on]  # 0, 2, 4, 6
        assert [e.value for e in events] == pytest.approx([float(r[k]) for r in on], rel=1e-6)
    (grid,) = tags["images"]
    images = acc.Images(grid)
    assert [e.step for e in images] == [0, 3, 6]  # every 3 iterations and the last
    assert images[0].height == 2 * 32 + 3 * 2 and images[0].width == 8 * 32 + 9 * 2  # x above G(E(x)), 8 images


def test_tensorboard_flag_is_resumable_and_validated():
    assert {"tensorboard", "tensorboard_images"} <= config.TrainConfig.RESUMABLE
    with pytest.raises(Exception, match="tensorboard-images"):
        config.TrainConfig(tensorboard_images=0).validate()


def test_tensorboard_without_the_package_is_one_error_before_any_work(monkeypatch):
    import importlib.util

    import errors

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(errors.UserError, match=r"pip install \.\[tensorboard\]"):
        config.TrainConfig(tensorboard=True).validate()
    config.TrainConfig(tensorboard=False).validate()
