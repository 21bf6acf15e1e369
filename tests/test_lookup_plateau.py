"""scripts/lookup_plateau.py: the associative-recall probe of the chain's LLM runs and records its curve."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "lookup_plateau.py"


def _probe():
    spec = importlib.util.spec_from_file_location("lookup_plateau", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_trains_and_writes_its_history(tmp_path: Path) -> None:
    out = tmp_path / "probe"
    assert _probe().main(["--out", str(out), "--steps", "3", "--eval-every", "2", "--batch-size", "4"]) == 0
    result = json.loads((out / "lookup_plateau.json").read_text())
    assert [row["step"] for row in result["history"]] == [2, 3]
    assert all(0.0 <= row["heldout_accuracy"] <= 1.0 for row in result["history"])
    # 4 of 7 colours drawn with replacement: the right one is among the listed about 1/4 + a bit of the time
    assert 0.25 < result["listed_colour_guess_accuracy"] < 0.5
    assert result["llm"]["num_hidden_layers"] == 4 and result["llm"]["hidden_size"] == 256


def test_bad_pair_count_is_refused_before_writing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "probe"
    assert _probe().main(["--out", str(out), "--pairs", "9"]) == 2
    assert "--pairs must be in 1..5" in capsys.readouterr().err
    assert not out.exists()


def test_recall_rows_supervise_each_listed_colour_after_its_shape(tmp_path: Path) -> None:
    probe = _probe()
    probe.train_tiny_tokenizer(tmp_path / "tokenizer")
    tokenizer = probe.AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    for ids, labels in probe.recall_examples(tokenizer, 5, pairs=4, seed=0):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        listing, queries = text.split("\n")
        truth = dict(re.findall(r"(\w+) (\w+)", listing))
        asked = re.findall(r"(\w+) (\w+)", queries)
        assert sorted(shape for shape, _ in asked) == sorted(truth)  # every listed shape asked once
        assert all(truth[shape] == colour for shape, colour in asked)
        supervised = tokenizer.decode([t for t, label in zip(ids, labels) if label != probe.IGNORE_INDEX])
        assert supervised.replace(";", " ").split() == [colour for _, colour in asked]  # only the colours


def test_recall_share_trains_and_bad_share_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "probe"
    assert _probe().main(["--out", str(out), "--steps", "2", "--eval-every", "2", "--batch-size", "4",
                          "--recall-share", "0.5"]) == 0
    assert json.loads((out / "lookup_plateau.json").read_text())["args"]["recall_share"] == "0.5"
    bad = tmp_path / "bad"
    assert _probe().main(["--out", str(bad), "--recall-share", "1.5"]) == 2
    assert "--recall-share must be in [0, 1]" in capsys.readouterr().err
    assert not bad.exists()
