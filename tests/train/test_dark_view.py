"""The block search's dark view (``search_dark_view``): near-black pixels take the image's border colour.

Oracle: hand-built images whose bright level, border colour and replaced pixels are computed by hand."""

from __future__ import annotations

import pytest
import torch

from train.dark_view import border_colour, dark_to_background

GREY, GREEN, MID_GREEN, NEAR_BLACK = (0.5, 0.5, 0.5), (0.0, 1.0, 0.0), (0.0, 0.5, 0.0), (0.02, 0.02, 0.02)


def _image(border: tuple, inside: dict[tuple[int, int], tuple], fill: tuple = GREEN) -> torch.Tensor:
    """A 5×5 image in [0, 1]: ``border`` on the outer ring, ``fill`` inside, ``inside`` pixels as given."""
    img = torch.tensor(border).view(3, 1, 1).repeat(1, 5, 5)
    img[:, 1:4, 1:4] = torch.tensor(fill).view(3, 1, 1)
    for (y, x), rgb in inside.items():
        img[:, y, x] = torch.tensor(rgb)
    return img


def test_only_pixels_below_the_share_of_the_bright_level_take_the_border_colour():
    """Summed RGB: 16 border pixels 1.5, 7 green 1.0, one mid green 0.5, one near-black 0.06. The bright level (95th
    percentile) is 1.5, so at 0.25 the cut is 0.375: only the near-black pixel turns grey; at 0.5 (cut 0.75) the
    mid green does too."""
    img = _image(GREY, {(2, 2): NEAR_BLACK, (1, 3): MID_GREEN})
    out = (dark_to_background(img[None] * 2 - 1, 0.25)[0] + 1) / 2
    want = img.clone()
    want[:, 2, 2] = torch.tensor(GREY)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    out = (dark_to_background(img[None] * 2 - 1, 0.5)[0] + 1) / 2
    want[:, 1, 3] = torch.tensor(GREY)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)


def test_each_image_of_a_batch_has_its_own_border_and_bright_level():
    """On black, near-black stripes already look like the background: the view keeps them black (the border), and a
    grey-bordered image in the same batch gets grey; an image with no dark pixel comes back unchanged."""
    on_black = _image((0.0, 0.0, 0.0), {(2, 1): NEAR_BLACK, (2, 2): NEAR_BLACK, (2, 3): NEAR_BLACK})
    on_grey = _image(GREY, {(2, 2): NEAR_BLACK})
    plain = _image(GREY, {})
    batch = torch.stack([on_black, on_grey, plain]) * 2 - 1
    torch.testing.assert_close(border_colour(batch)[:, :, 0, 0], torch.tensor([[-1.0] * 3, [0.0] * 3, [0.0] * 3]))
    out = (dark_to_background(batch, 0.25) + 1) / 2
    assert out[0, :, 2, 1:4].abs().max() == 0.0  # black border: the near-black row is black
    torch.testing.assert_close(out[1, :, 2, 2], torch.tensor(GREY))
    torch.testing.assert_close(out[2], plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1])
def test_a_threshold_outside_zero_one_is_refused(threshold):
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        dark_to_background(torch.zeros(1, 3, 4, 4), threshold)
