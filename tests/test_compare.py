"""launch/compare.py's table: per row the mean and sample standard deviation over seeds, and the gap
closed of the mean exact match, checked against hand-worked figures."""
import importlib.util
import os

spec = importlib.util.spec_from_file_location(
    "compare", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "compare.py"))
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def _run(accuracy, char, nll, wall, teacher=0.8, before=(0.0, 0.1, 20.0)):
    return {"results": {"after": {"accuracy": accuracy, "char_accuracy": char, "answer_nll": nll,
                                  "teacher_accuracy": teacher},
                        "before": {"accuracy": before[0], "char_accuracy": before[1], "answer_nll": before[2]},
                        "wall_time": wall}}


def test_table_means_spreads_and_gap():
    runs = [("new", 0, _run(0.2, 0.5, 3.0, 10)), ("new", 1, _run(0.6, 0.7, 1.0, 20)),
            ("old", 0, _run(0.1, 0.4, 5.0, 30)), ("old", 1, _run(0.1, 0.4, 5.0, 50))]
    table, figures = compare._table(runs)
    lines = table.splitlines()
    assert lines[0].startswith("| run (2 seeds) |")
    assert lines[2] == "| teacher | 0.800 | | | | |"
    assert lines[3] == "| student before | 0.000 | | 0.100 | 20.00 | |"
    # new: exact match mean 0.4, sd sqrt(((0.2-0.4)^2 + (0.6-0.4)^2) / 1) = 0.283; gap 0.4 / 0.8 = 50%
    assert lines[4] == "| new | 0.400 ± 0.283 | 50% | 0.600 ± 0.141 | 2.00 ± 1.41 | 15s |"
    assert lines[5] == "| old | 0.100 ± 0.000 | 12% | 0.400 ± 0.000 | 5.00 ± 0.00 | 40s |"
    assert [f["seed"] for f in figures] == [0, 1, 0, 1] and figures[1]["exact_match"] == 0.6
