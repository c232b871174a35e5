"""The Canny node: kornia's edges of an IMAGE, as ComfyUI's core node makes them."""

import torch

from nodes.sd.preprocessors import Canny


def run(**inputs):
    node = Canny()
    node.ctx = None
    return node.execute(**inputs)[0]


def test_canny_outlines_a_square_in_white_on_black():
    image = torch.zeros(1, 32, 32, 3)
    image[:, 8:24, 8:24] = 1.0
    edges = run(image=image, low_threshold=0.4, high_threshold=0.8)
    assert edges.shape == (1, 32, 32, 3) and set(edges.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(edges[..., 0], edges[..., 2])  # grey: the same edges in every channel
    on = edges[0, ..., 0] > 0
    assert on[6:10, 8:24].any(dim=0).all() and on[8:24, 6:10].any(dim=1).all()  # the top and left sides
    assert not on[12:20, 12:20].any() and not on[:4].any()  # nothing inside or far outside


def test_canny_is_kornias_and_drops_alpha():
    from kornia.filters import canny

    image = torch.rand(2, 24, 20, 4, generator=torch.Generator().manual_seed(0))
    expected = canny(image[..., :3].movedim(-1, 1), 0.2, 0.5)[1].repeat(1, 3, 1, 1).movedim(1, -1)
    assert torch.equal(run(image=image, low_threshold=0.2, high_threshold=0.5), expected)


def test_a_low_threshold_above_the_high_one_fails_validation():
    message = Canny.check_inputs({"low_threshold": 0.9, "high_threshold": 0.5})
    assert message == "low_threshold (0.9) must not be above high_threshold (0.5)"
    assert Canny.check_inputs({"low_threshold": 0.4, "high_threshold": 0.8}) is None
