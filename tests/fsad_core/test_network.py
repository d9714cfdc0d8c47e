import pytest
import torch

from fsad_core.config import DetectorConfig
from fsad_core.network import pool
from fsad_core.options import POOLINGS


def test_pooling_statistics_in_order():
    x = torch.rand(2, 5, 7, 7)
    assert pool(x, "mean").shape == (2, 5)
    full = pool(x, "mean+std+max")
    assert full.shape == (2, 15)
    torch.testing.assert_close(full[:, :5], x.mean(dim=(2, 3)))  # the embedding fine-tuning uses comes first
    torch.testing.assert_close(full[:, 5:10], x.std(dim=(2, 3), unbiased=False))
    torch.testing.assert_close(full[:, 10:], x.flatten(2).amax(dim=2))
    torch.testing.assert_close(pool(x, "mean+std"), full[:, :10])


def test_a_one_cell_defect_moves_the_maximum_most():
    surface = torch.full((1, 1, 14, 14), 0.2)
    defect = surface.clone()
    defect[..., 3, 4] = 2.0
    before, after = pool(surface, "mean+std+max")[0], pool(defect, "mean+std+max")[0]
    mean_shift, max_shift = float(after[0] - before[0]), float(after[2] - before[2])
    assert max_shift > 100 * mean_shift > 0


def test_unknown_pooling_is_refused_by_the_config():
    assert "mean+std+max" in POOLINGS
    with pytest.raises(ValueError, match="pooling"):
        DetectorConfig(pooling="median")
