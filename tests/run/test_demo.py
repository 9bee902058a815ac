"""make demo's verdict: it fails loudly when the network does not beat its baselines."""

import json

import pytest

from helpers.errors import ClaimMissed
from helpers.run import demo


def test_demo_fails_loudly_when_the_cnn_does_not_beat_its_baselines(tmp_path):
    path = tmp_path / "claim.json"
    claim = {
        "ResNet from scratch (validation top-1)": 0.40,
        "colour histogram (best of three)": 0.12,
        "chance (uniform)": 0.10,
        "chance (majority class)": 0.10,
    }
    path.write_text(json.dumps(claim))
    assert "ResNet from scratch (validation top-1) 40.0%" in demo.check_claim(path)
    path.write_text(json.dumps(claim | {"colour histogram (best of three)": 0.35}))
    with pytest.raises(ClaimMissed, match="did not learn what colour and chance cannot"):
        demo.check_claim(path)
    assert demo.check_claim(path, strict=False).startswith("WARNING (04): the CNN did not learn")


def test_make_demo_fails_by_default_and_only_warns_when_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "run", lambda *args: [])  # the notebooks "ran"; their claim below
    claim = tmp_path / "checkpoints" / "dogs" / "claim.json"
    claim.parent.mkdir(parents=True)
    claim.write_text(
        json.dumps({"ResNet from scratch (validation top-1)": 0.11, "chance (uniform)": 0.10})
    )
    with pytest.raises(ClaimMissed, match="did not learn"):
        demo.summary(tmp_path)
    with pytest.raises(ClaimMissed, match="did not learn"):
        demo.main(["--out", str(tmp_path / "notebooks")])
    demo.main(["--out", str(tmp_path / "notebooks"), "--warn-only"])
    assert "WARNING (04): the CNN did not learn" in capsys.readouterr().out


def test_every_notebook_states_its_runtime_and_the_demo_prints_it_beside_the_measured(tmp_path):
    from helpers.run import runner

    stated = {p.name: runner.stated_runtime(p) for p in runner.notebook_paths()}
    assert "not stated" not in stated.values(), stated
    assert all(" s " in s or s.endswith(" s") or "min" in s for s in stated.values()), stated
    path = runner.notebook_paths(["04"])[0]
    (line,) = demo.timings([(tmp_path / path.name, 623.4)])
    assert "623 s" in line and f"stated: {stated[path.name].split(' (`bench/')[0]}" in line
    assert "bench/results/demo_runtimes-" in stated[path.name]  # it quotes a record
