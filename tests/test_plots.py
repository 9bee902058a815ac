"""Figures that read: a gallery's titles stay clear of every other image and title."""

import matplotlib
import pytest

matplotlib.use("Agg")

LONG = ["Greater_Swiss_Mountain_dog", "Chesapeake_Bay_retriever", "West_Highland_white_terrier",
        "Pembroke", "Staffordshire_bullterrier", "Brabancon_griffon"]  # fmt: skip


@pytest.mark.parametrize("n", [12, 7])
def test_gallery_titles_overlap_no_image_and_no_other_title(n):
    import numpy as np

    from helpers import plots

    images = [np.zeros((64, 64, 3), dtype=np.uint8)] * n
    titles = [f"{LONG[i % 6]} 87%\n(true: {LONG[(i + 3) % 6]})" for i in range(n)]
    axes = plots.image_grid(images, titles, ["red"] * n)
    fig = axes.flat[0].figure
    fig.canvas.draw()  # as shown: titles placed, layout applied
    renderer = fig.canvas.get_renderer()
    shown = [ax for ax in axes.flat if ax.images]
    boxes = [(ax.title.get_window_extent(renderer), ax.get_window_extent(renderer)) for ax in shown]
    for i, (title, _) in enumerate(boxes):
        for j, (other_title, other_image) in enumerate(boxes):
            if i != j:
                assert not title.overlaps(other_image), (titles[i], "over the image of", titles[j])
                assert not title.overlaps(other_title), (titles[i], "over", titles[j])
        assert fig.bbox.contains(title.x0, title.y0) and fig.bbox.contains(title.x1, title.y1)


def test_footprint_legend_handles_stay_clear_of_their_labels():
    from helpers import plots

    rows = [{"rank": 0, "arch": a, "strategy": s, "param_mib": 90.0, "grad_mib": 90.0,
             "optim_mib": 90.0, "peak_mib": 1300.0, "peak_of": "process RSS"}
            for a, s in (("resnet50", "ddp"), ("resnet50", "fsdp"))]  # fmt: skip
    ax = plots.footprint(rows, limit_mib=2560)
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend()
    texts = [t.get_window_extent(renderer) for t in legend.get_texts()]
    for handle in legend.legend_handles:
        box = handle.get_window_extent(renderer)
        assert not any(box.overlaps(t) for t in texts), handle.get_label()
    assert fig.bbox.contains(*legend.get_window_extent(renderer).p1)  # inside the figure
