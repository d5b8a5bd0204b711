"""FID, precision and recall, the sampler rows and evaluate.py end to end."""

from __future__ import annotations

import pytest
import torch

import evaluate
from lib import metrics
from lib.errors import UsageError


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    return metrics.frechet_distance(*metrics.gaussian_stats(a), *metrics.gaussian_stats(b))


def test_fid_of_identical_sets_is_zero():
    features = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert fid(features, features) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_known_gaussians():
    d = 8
    mu1, mu2 = torch.zeros(d), torch.full((d,), 0.5)
    # N(0, I) vs N(mu, 4 I): |mu|^2 + d * (1 + 4 - 2 * 2) = 0.25 d + d
    assert metrics.frechet_distance(mu1, torch.eye(d), mu2, 4 * torch.eye(d)) == pytest.approx(1.25 * d)
    # diagonal covariances: sum of (sqrt(a) - sqrt(b))^2
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    assert metrics.frechet_distance(torch.zeros(3), torch.diag(a), torch.zeros(3), torch.diag(b)) == pytest.approx(2.0)


def test_fid_grows_with_the_gap_and_matches_sampled_statistics():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 4, generator=g)
    y = torch.randn(20000, 4, generator=g) * 2 + 1
    assert fid(x, y) == pytest.approx(4 * 1 + 4 * (1 + 4 - 4), rel=0.05)


def rows_for(*argv: str, T: int) -> list[tuple]:
    args = evaluate.parse_args(list(argv))
    return [(r.sampler, r.steps, r.eta, r.guidance) for r in evaluate.sampler_settings(args, T)]


def test_sampler_rows():
    rows = rows_for("--sampler", "ddpm", "ddim", "dpm++", "--steps", "10", "20", T=50)
    assert rows == [("ddpm", 50, None, 2.0), ("ddim", 10, 1.0, 2.0), ("ddim", 20, 1.0, 2.0),
                    ("dpm++", 10, 1.2, 2.0), ("dpm++", 20, 1.2, 2.0)]
    assert rows_for("--steps", "5", T=50) == [("dpm++", 5, 1.2, 2.0)]  # the default sampler
    assert rows_for(T=500) == [("dpm++", 20, 1.2, 2.0)]
    assert rows_for(T=8) == [("dpm++", 8, 1.2, 2.0)]
    assert rows_for("--guidance", "0", "4", T=8) == [("dpm++", 8, 1.2, 0.0), ("dpm++", 8, 1.2, 4.0)]
    with pytest.raises(UsageError):
        rows_for("--sampler", "ddim", "--steps", "60", T=50)


def test_evaluate_checkpoint_end_to_end(trained_run, tmp_path, capsys):
    args = ["--checkpoint", trained_run["checkpoint"], "--data-root", trained_run["data"], "--n", "3",
            "--guidance", "0", "2", "--sampler", "ddpm", "ddim", "dpm++", "--steps", "4",
            "--classifier-cache", str(tmp_path / "clf.pt"), "--device", "cpu"]
    assert evaluate.main(args) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 6 + 1  # header, 3 samplers x 2 guidance values, the real-data floor
    assert "ddim 4 steps" in out and "dpm++ 4 steps" in out and "ddpm (all T steps)" in out
    assert "real training digits" in out and out.count("per digit") == 6


@pytest.mark.parametrize("extra, words", [
    (["--steps", "9"], "between 1 and T=8"),
    (["--sampler", "ddpm", "--steps", "4"], "always takes all T steps"),
    (["--n", "1"], "--n must be at least 2"),
])
def test_evaluate_bad_input(trained_run, tmp_path, monkeypatch, capsys, extra, words):
    monkeypatch.chdir(tmp_path)
    args = ["--data-root", trained_run["data"], "--n", "2", "--classifier-cache", "clf.pt", "--checkpoint",
            trained_run["checkpoint"]] + extra
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1] and not any("Traceback" in line for line in err)


def test_precision_and_recall_by_hand():
    """Real points 0, 1, 3 and generated 0.5, 10 on a line, k = 1: the real balls reach 1, 1 and 2, so 0.5 is in one
    and 10 in none (precision 1/2); the generated balls reach 9.5 each and hold every real point (recall 1)."""
    real, fake = torch.tensor([[0.0], [1.0], [3.0]]), torch.tensor([[0.5], [10.0]])
    assert metrics.precision_recall(real, fake, k=1) == (0.5, 1.0)
    assert metrics.precision_recall(fake, real, k=1) == (1.0, 0.5)


def test_a_collapsed_set_has_high_precision_and_low_recall():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(1000, 4, generator=g)
    collapsed = 0.1 * torch.randn(1000, 4, generator=g)  # every sample near the mode
    precision, recall = metrics.precision_recall(real, collapsed)
    assert precision > 0.95 and recall < 0.3
    shifted = torch.randn(1000, 4, generator=g) + 4.0  # off the real manifold: both low
    assert max(metrics.precision_recall(real, shifted)) < 0.2
    another = torch.randn(1000, 4, generator=g)  # a second real sample: both high
    assert min(metrics.precision_recall(real, another)) > 0.85


def test_knn_radii_and_coverage_by_hand():
    points = torch.tensor([[0.0], [1.0], [3.0]])
    assert metrics.knn_radii(points, k=1).tolist() == [1.0, 1.0, 2.0]
    radii = torch.tensor([0.4, 0.1, 1.0])
    assert metrics.coverage(torch.tensor([[0.5], [2.2], [9.0]]), points, radii) == pytest.approx(1 / 3)


def test_class_matched_draw_follows_the_labels():
    pool = torch.arange(100) % 10
    index = metrics.class_matched(torch.tensor([3, 3, 3, 7]), pool, seed=0)
    assert sorted(pool[index].tolist()) == [3, 3, 3, 7] and len(set(index.tolist())) == 4
