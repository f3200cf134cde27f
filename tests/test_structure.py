"""Tests of structured answers (mathagent/structure.py)."""

from __future__ import annotations

from mathagent.structure import parse_collection


def test_parse_collection_tells_tuples_intervals_sets_and_matrices_apart():
    assert parse_collection("(1,2]").brackets == "(]"
    assert parse_collection(r"\{1,2\}").kind == "set"
    assert parse_collection("1,2").kind == "list"
    assert parse_collection(r"(-\infty,0)\cup(1,\infty)").kind == "union"
    matrix = parse_collection(r"\begin{pmatrix}1&2\\3&4\end{pmatrix}")
    assert (matrix.kind, matrix.shape, matrix.items) == ("matrix", (2, 2), ("1", "2", "3", "4"))
    assert parse_collection("(1)+(2)") is None
    assert parse_collection(r"1\pm\sqrt{2}").items == (r"1+\sqrt{2}", r"1-\sqrt{2}")
