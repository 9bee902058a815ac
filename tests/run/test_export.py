"""The HTML export: every output figure described, so nbconvert has no alt text to complain of."""

import base64
import logging

import nbformat

from helpers.run import runner

PNG = base64.b64encode(
    bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                  "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082")
).decode()  # fmt: skip


def test_every_output_figure_gets_the_prose_before_it_as_alt_text(tmp_path, caplog):
    nb = nbformat.v4.new_notebook()
    figure = nbformat.v4.new_output(
        "display_data", data={"image/png": PNG, "text/plain": "<Figure>"}
    )
    nb.cells = [
        nbformat.v4.new_markdown_cell("## Curves\n\nThe **loss** falls as it learns. More here."),
        nbformat.v4.new_code_cell("plots.curves(x);", outputs=[figure]),
    ]
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, path)
    with caplog.at_level(logging.WARNING):
        html = runner.export_html(path)
    assert 'alt="Figure of cell 1: Curves The loss falls as it learns."' in html
    assert "Alternative text is missing" not in caplog.text
