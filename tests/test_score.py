"""`cifar10-hvd score`: accuracy figures on hand-made files, and every input error naming its line."""
from __future__ import annotations

from pathlib import Path

import pytest

from predictor import score as score_mod

CLASSES = score_mod.CIFAR10_CLASSES


def write_csv(path: Path, rows: list[tuple], header: str = "id,label") -> Path:
    """An id,label CSV with the given rows."""
    path.write_text(header + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path):
    """A 12-row submission (ids 1..12) and a solution over 8 of its ids, 6 of them right."""
    sub = write_csv(tmp_path / "submission.csv",
                    [(i, CLASSES[i % 10]) for i in range(1, 13)])
    truth = {1: "automobile", 2: "bird", 3: "cat", 4: "deer", 10: "airplane", 11: "automobile",
             5: "cat", 12: "cat"}  # 5 and 12 are wrong (predicted dog, bird)
    sol = write_csv(tmp_path / "solution.csv", sorted(truth.items()))
    return sub, sol


def test_score_reports_accuracy_per_class_and_plot(files, tmp_path, capsys):
    sub, sol = files
    assert score_mod.main(["--submission", str(sub), "--solution", str(sol)]) == 0
    out = capsys.readouterr().out
    assert "accuracy: 0.7500 (8 ids)" in out
    result = score_mod.score(sub, sol)
    assert result["count"] == 8 and result["accuracy"] == pytest.approx(6 / 8)
    assert result["per_class"]["cat"] == pytest.approx(1 / 3)
    assert result["per_class"]["automobile"] == 1.0
    assert result["per_class"]["frog"] is None  # no solution rows of that class
    cm = result["confusion"]
    assert cm[CLASSES.index("cat")][CLASSES.index("dog")] == 1
    assert sum(map(sum, cm)) == 8
    png = tmp_path / "submission-confusion.png"
    assert Path(result["plot"]) == png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_score_classes_from_flag(tmp_path, capsys):
    sub = write_csv(tmp_path / "s.csv", [(1, "x"), (2, "y"), (3, "y")])
    sol = write_csv(tmp_path / "t.csv", [(1, "x"), (3, "x")])
    assert score_mod.main(["--submission", str(sub), "--solution", str(sol), "--classes", "x,y"]) == 0
    assert "accuracy: 0.5000 (2 ids)" in capsys.readouterr().out


@pytest.mark.parametrize("which, rows, header, expect", [
    ("submission", [(1, "cat"), (2, "dog"), (2, "cat")], "id,label", "submission.csv:4: duplicate id 2"),
    ("solution", [(1, "cat"), (1, "cat")], "id,label", "solution.csv:3: duplicate id 1"),
    ("submission", [(1, "cat"), (2, "wolf")], "id,label", "submission.csv:3: label 'wolf' is not one of the classes"),
    ("solution", [(1, "Cat")], "id,label", "solution.csv:2: label 'Cat' is not one of the classes"),
    ("solution", [(1, "cat"), (2, "dog"), (99, "dog")], "id,label", "solution.csv:4: id 99 is not in"),
    ("submission", [(1, "cat"), ("x7", "dog")], "id,label", "submission.csv:3: id 'x7' is not a positive integer"),
    ("submission", [(1, "cat"), (2, "dog", "extra")], "id,label", "submission.csv:3: expected 2 fields"),
    ("submission", [(1, "cat")], "id,class", "submission.csv:1: header must be 'id,label'"),
])
def test_score_input_errors_name_the_line(tmp_path, capsys, which, rows, header, expect):
    good = {"submission": [(1, "cat"), (2, "dog")], "solution": [(1, "cat"), (2, "cat")]}
    good[which] = rows
    sub = write_csv(tmp_path / "submission.csv", good["submission"], header if which == "submission" else "id,label")
    sol = write_csv(tmp_path / "solution.csv", good["solution"], header if which == "solution" else "id,label")
    assert score_mod.main(["--submission", str(sub), "--solution", str(sol)]) == 2
    err = capsys.readouterr().err
    assert expect in err, err
    assert not (tmp_path / "submission-confusion.png").exists()


def test_score_missing_file_is_input_error(tmp_path, capsys):
    sol = write_csv(tmp_path / "solution.csv", [(1, "cat")])
    assert score_mod.main(["--submission", str(tmp_path / "nope.csv"), "--solution", str(sol)]) == 2
    assert "nope.csv: cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("line3, expect", [
    (b"3," + b"a" * 300_000 + b"\n", "submission.csv:4: label 'aaaaaaaa"),  # beyond csv's 128 KB field limit
    (b"3,d\xffg\n", "submission.csv:4: not UTF-8 text"),
    (b"0,cat\n", "submission.csv:4: id '0' is not a positive integer"),
    (b"-3,cat\n", "submission.csv:4: id '-3' is not a positive integer"),
])
def test_score_bad_bytes_and_ids_exit_2_naming_the_line(tmp_path, capfd, line3, expect):
    """A 300 KB line or a non-UTF-8 byte is a short input error (exit 2) naming FILE:LINE,
    and ids follow prepare's policy (positive integers), through the real CLI."""
    from conftest import run_cli

    sub = tmp_path / "submission.csv"
    sub.write_bytes(b"id,label\n1,cat\n2,dog\n" + line3)
    sol = write_csv(tmp_path / "solution.csv", [(1, "cat"), (2, "cat")])
    proc = run_cli(["score", "--submission", str(sub), "--solution", str(sol)])
    assert proc.returncode == 2, proc.stderr
    assert expect in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr) < 2000  # the 300 KB value is not echoed
    assert not (tmp_path / "submission-confusion.png").exists()


def test_score_and_prepare_share_one_bom_and_crlf_policy(tmp_path, capsys):
    """A BOM and CRLF line ends, which prepare accepts in trainLabels.csv, are accepted by score."""
    from contracts.labels import read_labels

    bom = b"\xef\xbb\xbfid,label\r\n1,cat\r\n2,dog\r\n"
    (tmp_path / "submission.csv").write_bytes(bom)
    (tmp_path / "trainLabels.csv").write_bytes(bom)
    sol = write_csv(tmp_path / "solution.csv", [(1, "cat"), (2, "cat")])
    assert read_labels(tmp_path / "trainLabels.csv") == {1: ("cat", 2), 2: ("dog", 3)}
    assert score_mod.main(["--submission", str(tmp_path / "submission.csv"), "--solution", str(sol)]) == 0
    assert "accuracy: 0.5000 (2 ids)" in capsys.readouterr().out


def test_id_label_module_round_trip_and_writer_policy(tmp_path):
    """The one id,label module: what it writes it reads back (300,000 rows); it refuses to write ids it would reject."""
    import numpy as np

    from contracts.labels import read_table, write_table

    rng = np.random.default_rng(0)
    ids = rng.permutation(300_000) + 1
    labels = np.array(CLASSES, dtype=object)[ids % 10]
    write_table(tmp_path / "big.csv", ids, labels)
    back = read_table(tmp_path / "big.csv", CLASSES)
    assert np.array_equal(back.ids, ids) and list(back.labels[:5]) == list(labels[:5])
    assert back.lines[0] == 2 and back.lines[-1] == 300_001
    for bad in ([1, 1], [0, 2]):
        with pytest.raises(ValueError, match="positive integers, each once"):
            write_table(tmp_path / "bad.csv", np.array(bad), ["cat", "dog"])
    assert not (tmp_path / "bad.csv").exists()
