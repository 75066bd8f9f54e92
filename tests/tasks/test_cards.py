"""Card drawing: large, distinct, correctly coloured ranks that survive downscaling."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from vlmrl.tasks.cards import (
    CARD_BACK,
    RANK_LABELS,
    SUITS,
    TABLE,
    blank_canvas,
    draw_card,
    font,
)

W, H = 70, 105  # the size Blackjack uses for up to five cards in a row


def card_image(rank, suit, w=W, h=H) -> np.ndarray:
    img = blank_canvas(300)
    draw_card(ImageDraw.Draw(img), (10, 10, 10 + w, 10 + h), rank, suit)
    return np.asarray(img)


def ink_rows(img: np.ndarray, y0: int, y1: int) -> int:
    """Height of the span of rows between y0 and y1 holding dark or red ink."""
    part = img[y0:y1, 10 : 10 + W].astype(int)
    ink = (part.sum(-1) < 300) | ((part[..., 0] > 150) & (part[..., 1] < 80))
    # ignore the card's outline: a row counts when it has ink away from the edges
    rows = np.where(ink[:, 4:-4].any(1))[0]
    return 0 if len(rows) == 0 else int(rows.max() - rows.min() + 1)


def test_constants_and_canvas():
    assert len(RANK_LABELS) == 13 and RANK_LABELS[0] == "A" and RANK_LABELS[9] == "10"
    assert SUITS == ("spades", "hearts", "diamonds", "clubs")
    canvas = blank_canvas()
    assert canvas.mode == "RGB" and canvas.size == (300, 300)
    assert canvas.getpixel((0, 0)) == TABLE
    assert blank_canvas(64).size == (64, 64)


def test_font_is_cached_and_scalable():
    assert font(40) is font(40)
    assert isinstance(font(40), ImageFont.FreeTypeFont)
    assert font(80).getbbox("8")[3] > 1.8 * font(40).getbbox("8")[3] - 2


@pytest.mark.parametrize("rank", range(1, 14))
def test_rank_label_is_large(rank):
    img = card_image(rank, 0)
    # The label lives in the upper part of the card; it must fill at least 40% of the card's height
    # so that, in a 300 px image shrunk to 112 px, it spans more than one 14 px patch.
    height = ink_rows(img, 12, 10 + int(0.6 * H))
    assert height >= 0.4 * H
    assert height * 112 / 300 > 14


def test_all_52_cards_differ_even_downscaled():
    small = {}
    for rank in range(1, 14):
        for suit in range(4):
            crop = Image.fromarray(card_image(rank, suit)[10 : 10 + H, 10 : 10 + W])
            small[rank, suit] = np.asarray(crop.resize((W * 112 // 300, H * 112 // 300), Image.BILINEAR), float)
    keys = list(small)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert np.abs(small[a] - small[b]).mean() > 1.0, (a, b)


@pytest.mark.parametrize("suit", range(4))
def test_suit_colour(suit):
    img = card_image(7, suit).astype(int)
    red = ((img[..., 0] > 150) & (img[..., 1] < 80) & (img[..., 2] < 80)).sum()
    if SUITS[suit] in ("hearts", "diamonds"):
        assert red > 300
    else:
        assert red == 0


def test_face_down_card_shows_no_rank():
    img = card_image(None, None)
    card = img[10 : 10 + H, 10 : 10 + W].reshape(-1, 3)
    back = (card == np.array(CARD_BACK)).all(-1).mean()
    assert back > 0.5
    assert (card.astype(int).sum(-1) < 100).mean() < 0.05  # no big black glyph


def test_ten_on_a_narrow_card_stays_inside_it():
    img = blank_canvas(100)
    draw_card(ImageDraw.Draw(img), (30, 20, 50, 50), 10, 1)
    arr = np.asarray(img)
    outside = np.ones(arr.shape[:2], bool)
    outside[20:51, 30:51] = False
    assert (arr[outside] == np.array(TABLE)).all()
    inside = arr[20:51, 30:51].astype(int)
    assert ((inside[..., 0] > 150) & (inside[..., 1] < 80)).sum() > 20  # the red "10" is there


def test_bad_card_raises():
    draw = ImageDraw.Draw(blank_canvas())
    with pytest.raises(ValueError, match="rank"):
        draw_card(draw, (0, 0, 50, 80), 14, 0)
    with pytest.raises(ValueError, match="suit"):
        draw_card(draw, (0, 0, 50, 80), 3, 4)
