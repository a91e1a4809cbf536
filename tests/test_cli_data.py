"""`polymodal data ...` from the command line (the builders themselves: tests/test_builders.py)."""

import json

from PIL import Image
from typer.testing import CliRunner

from polymodal.cli import app


def test_data_scenes_then_show(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["data", "scenes", str(tmp_path / "sc"), "--n", "12", "--size", "48", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["images"] == 12 and sum(summary["splits"].values()) == 12
    lines = (tmp_path / "sc" / "captions.jsonl").read_text().splitlines()
    assert len({json.loads(line)["image"] for line in lines}) == 12
    res = runner.invoke(app, ["data", "show", str(tmp_path / "sc"), "--out", str(tmp_path / "sheet.png"), "--n", "6"])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "sheet.png").size[0] > 300
    res = runner.invoke(app, ["data", "show", str(tmp_path / "nothing-here")])
    assert res.exit_code == 2 and "nothing-here" in res.stderr


def test_data_mix(tmp_path):
    from polymodal.data.pairs import PairDataset

    runner = CliRunner()
    for name, seed, n in (("a", 0, 5), ("b", 1, 30)):
        assert runner.invoke(app, ["data", "scenes", str(tmp_path / name), "--n", str(n), "--seed", str(seed),
                                   "--size", "32"]).exit_code == 0
    res = runner.invoke(app, ["data", "mix", str(tmp_path / "mix"), "-s", f"a={tmp_path / 'a'}",
                              "-s", f"b={tmp_path / 'b'}", "--json"])
    assert res.exit_code == 0, res.output
    data = PairDataset(tmp_path / "mix")
    assert len(data) == len(PairDataset(tmp_path / "a")) + len(PairDataset(tmp_path / "b"))
    assert {p.meta["dataset"] for p in data.pairs} == {"a", "b"}
    assert all(path.is_file() for path in data.images())
    res = runner.invoke(app, ["data", "mix", str(tmp_path / "mix"), "-s", f"{tmp_path / 'a'}"])
    assert res.exit_code == 2 and "source name" in res.stderr
    # --repeat writes a source's training records K times and its test records once
    res = runner.invoke(app, ["data", "mix", str(tmp_path / "mix3"), "-s", f"a={tmp_path / 'a'}",
                              "-s", f"b={tmp_path / 'b'}", "--repeat", "b=3"])
    assert res.exit_code == 0, res.output
    b = PairDataset(tmp_path / "b").pairs
    n_train = sum(p.meta["split"] == "train" for p in b)
    repeated = [p for p in PairDataset(tmp_path / "mix3").pairs if p.meta["dataset"] == "b"]
    assert 0 < n_train < len(b) and len(repeated) == 3 * n_train + (len(b) - n_train)
    for bad, message in (("c=2", "not sources"), ("b=two", "NAME=K")):
        res = runner.invoke(app, ["data", "mix", str(tmp_path / "mix4"), "-s", f"b={tmp_path / 'b'}", "--repeat", bad])
        assert res.exit_code == 2 and message in res.stderr, res.stderr
