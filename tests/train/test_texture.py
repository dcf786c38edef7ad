"""The block search's texture term (``search_texture_weight``): Gram matrices of the guide's convolutional features.

Oracles: the Gram matrix and the score computed by hand; the toy world's own renders (a striped shape is closer to
the striped references' texture than the same shapes plain or dotted); the guidance with the term against the
guidance without it plus the hand-weighted term, from the same noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mole_core as mole
from train.config import TrainConfig
from train.texture import check_textured, gram, reference_grams, texture_scores


@pytest.fixture(scope="module")
def guide():  # noqa: ANN201
    from mole_toy import load_world
    from mole_toy.guide import load_toy_guide

    return load_toy_guide(load_world(None).clip_path)


def _renders(texture: str, n: int, seed: int) -> torch.Tensor:
    """``n`` toy-world renders with ``texture`` (other attributes drawn), ``(n, 3, 32, 32)`` in [-1, 1]."""
    from mole_toy import world as W
    from mole_toy.clip import to_input

    return to_input(np.stack([W.render(s) for s in W.sample_specs(n, seed, {**W.ALL_VALUES, "texture": (texture,)})]))


def test_gram_is_the_channel_correlation_over_positions():
    """Channels [1, 2] and [3, 4] over two positions: ``F Fᵀ / 2`` = [[5, 11], [11, 25]] / 2."""
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # (1, 2, 1, 2)
    torch.testing.assert_close(gram(f), torch.tensor([[[2.5, 5.5], [5.5, 12.5]]]))


def test_texture_score_is_minus_the_relative_gram_distance_averaged_over_the_named_concepts(guide):
    """One reference per concept: an image scores exactly 0 against its own concept, ``-‖G − Ḡ‖ / ‖Ḡ‖`` against
    another (computed here from the guide's features by hand), the mean of both when its prompt names both, and 0
    when it names none."""
    refs = torch.cat([_renders("striped", 1, 1), _renders("dotted", 1, 2)])
    grams = reference_grams(guide, list(refs), ["striped", "dotted"])
    g = {c: gram(guide.texture_features(refs[i:i + 1]))[0] for i, c in enumerate(["striped", "dotted"])}
    torch.testing.assert_close(grams["striped"], g["striped"])
    other = -torch.linalg.matrix_norm(g["striped"] - g["dotted"]) / torch.linalg.matrix_norm(g["dotted"])
    images = refs[[0, 0, 0, 0]]
    got = texture_scores(guide, images, [["striped"], ["dotted"], ["striped", "dotted"], []], grams)
    torch.testing.assert_close(got, torch.stack([torch.tensor(0.0), other, other / 2, torch.tensor(0.0)]),
                               atol=1e-6, rtol=1e-5)
    assert other < -0.05  # the two textures' statistics differ


def test_striped_renders_are_closer_to_striped_references_than_plain_or_dotted_ones(guide):
    """The toy CLIP's last conv block sees texture: eight new striped renders score above the same number of plain
    and of dotted ones against eight striped references (means over the eight)."""
    grams = reference_grams(guide, list(_renders("striped", 8, 10)), ["striped"] * 8)
    score = {t: float(texture_scores(guide, _renders(t, 8, 20), [["striped"]] * 8, grams).mean())
             for t in ("striped", "plain", "dotted")}
    assert score["striped"] > score["plain"] + 0.05 and score["striped"] > score["dotted"] + 0.05, score


def test_open_clip_guides_expose_a_feature_map_a_third_of_the_way_in():
    """An open_clip ViT (tiny, built from a config): the texture features are its first block's patch tokens as a
    map, ``(B, width, 32 / patch, 32 / patch)``, and a Gram matrix of them is symmetric."""
    from tests.train.test_engine import tiny_clip
    from train.objectives import ClipGuide

    model, tok, cfg = tiny_clip()
    clip = ClipGuide(model, tok, 32)
    feats = clip.texture_features(torch.rand(2, 3, 48, 48) * 2 - 1)
    width, patch = cfg["vision_cfg"]["width"], cfg["vision_cfg"]["patch_size"]
    assert feats.shape == (2, width, 32 // patch, 32 // patch)
    g = gram(feats)
    torch.testing.assert_close(g, g.transpose(1, 2))
    check_textured(clip)


def test_a_guide_without_texture_features_and_a_bad_weight_are_one_line_errors():
    with pytest.raises(mole.MoleError, match="`search_texture_weight` needs a guide with texture features .* got "
                                             "object"):
        check_textured(object())
    base = dict(objective="compose", gate_family="sigmoid", gate_input="trigger", train_text_gates=True)
    with pytest.raises(mole.MoleError, match="`search_texture_weight` must be ≥ 0, and above 0 it needs "
                                             "`block_search`, got 0.1 with block_search False"):
        TrainConfig(**base, search_texture_weight=0.1)
    with pytest.raises(mole.MoleError, match="`search_texture_weight` must be ≥ 0, .* got -0.1 with block_search True"):
        TrainConfig(**base, block_search=True, search_texture_weight=-0.1)
    assert TrainConfig(**base, block_search=True, search_texture_weight=0.1).search_texture_weight == 0.1
