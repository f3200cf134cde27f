"""`mathagent evaluate` as a user runs it: a real subprocess, trajectories in, a JSON summary out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

MATHAGENT = [sys.executable, "-m", "mathagent.cli"]


def run(args, stdin="", check=True):
    proc = subprocess.run(MATHAGENT + args, input=stdin, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def trajectory(pid, i, final, answer, **extra):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "```python\nprint(1/0)\n```"},
                {"role": "user", "content": "```output\nZeroDivisionError: division by zero\n```"},
                {"role": "assistant", "content": final}]
    # Stored pred/correct are wrong on purpose: evaluate must re-grade from the messages.
    return {"id": f"{pid}-{i}", "problem_id": pid, "question": "q", "answer": answer, "messages": messages,
            "status": "answered", "pred": "999", "correct": False, **extra}


RECORDS = [
    trajectory("p1", 0, r"so \boxed{\dfrac{1}{2}}", r"\frac12", score=0.9, level=1),
    trajectory("p1", 1, r"\boxed{0.5}", r"\frac12", score=0.1, level=1),
    trajectory("p2", 0, r"\boxed{50}", "0.5", score=0.3, level=2),
    trajectory("p2", 1, "The answer is 0.5", "0.5", score=0.2, level=2),
]
INPUT = "".join(json.dumps(r) + "\n" for r in RECORDS)


def test_evaluate_regrades_from_messages_and_reports(tmp_path):
    graded_path = tmp_path / "graded.jsonl"
    proc = run(["evaluate", "-", "--pass-at", "1,2", "--score-field", "score", "--graded", str(graded_path)], INPUT)
    summary = json.loads(proc.stdout)
    assert summary["accuracy"] == 0.5
    assert summary["pass@k"] == {"1": 0.5, "2": 0.5}
    assert summary["maj@k"] == {"1": 0.5, "2": 0.5}
    assert summary["best_of_n"]["accuracy"] == 0.5
    assert set(summary["by_level"]) == {"1", "2"}
    assert summary["turns"]["error_observations"] == 4
    assert summary["grading"]["failures"] == 0
    assert "pass@2" in proc.stderr  # the table
    graded = [json.loads(line) for line in graded_path.read_text().splitlines()]
    assert [(g["pred"], g["correct"], g["reward"]) for g in graded] == [
        (r"\dfrac{1}{2}", True, 1.0), ("0.5", True, 1.0), ("50", False, -0.5), (None, False, -1.0)]
    assert graded[0]["score"] == 0.9  # unknown fields pass through


def test_evaluate_answer_modes_and_json_path(tmp_path):
    out = tmp_path / "summary.json"
    proc = run(["evaluate", "-", "--answer-modes", "boxed,answer_is", "--json", str(out)], INPUT)
    assert proc.stdout == ""
    assert json.loads(out.read_text())["accuracy"] == 0.75


def test_evaluate_user_errors_exit_2():
    assert run(["evaluate", "-", "--pass-at", "0"], INPUT, check=False).returncode == 2
    assert run(["evaluate", "-", "--answer-modes", "last_number"], INPUT, check=False).returncode == 2
    bad = run(["evaluate", "-"], '{"id": "x", "messages": []}\n', check=False)
    assert bad.returncode == 2 and "<stdin>:1" in bad.stderr


# ---- --pass-at and --plot: the talk's Figure 2 -----------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sampled(pid, finals, answer):
    return [trajectory(pid, i, rf"\boxed{{{final}}}", answer) for i, final in enumerate(finals)]


def write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_pass_at_sweeps_every_k_up_to_the_samples_and_plots_each_input(tmp_path):
    # Two iterations' samples, both named sampled.jsonl, as the Makefile lays them out.
    # it1: p1 n=4 c=1 (right answer first), p2 n=2 c=2.  it2: p1 n=4 c=2, p2 n=4 c=0.
    first = write(tmp_path / "it1" / "sampled.jsonl", sampled("p1", ["12", "8", "8", "9"], "12") + sampled("p2", ["3", "3"], "3"))
    second = write(tmp_path / "it2" / "sampled.jsonl", sampled("p1", ["8", "12", "12", "9"], "12") + sampled("p2", ["1"] * 4, "3"))
    figure = tmp_path / "fig.png"
    figure.write_bytes(b"an older plot")
    proc = run(["evaluate", first, second, "--pass-at", "1,2,4,...,n", "--plot", str(figure)])

    lines = proc.stdout.splitlines()
    assert len(lines) == 2  # JSONL: one summary per input, in order
    one, two = (json.loads(line) for line in lines)
    assert (one["input"], two["input"]) == (first, second)
    # it1: pass@1 = (1/4 + 1)/2, pass@2 = (1 - C(3,2)/C(4,2) + 1)/2 = (1/2 + 1)/2; pass@4 over p1 alone: 1.
    assert one["pass@k"] == {"1": 0.625, "2": 0.75, "4": 1.0}
    assert one["maj@k"] == {"1": 1.0, "2": 1.0, "4": 0.0}  # p1's first 4 answers: 8 wins
    assert one["problems@k"] == {"1": 2, "2": 2, "4": 1}
    # it2: p1 pass@1 = 1/2, pass@2 = 1 - C(2,2)/C(4,2) = 5/6, pass@4 = 1; p2 0. maj: 8 | tie 8,12 -> 8 | 12.
    assert two["pass@k"] == {"1": 0.25, "2": pytest.approx((5 / 6) / 2, abs=1e-15), "4": 0.5}
    assert two["maj@k"] == {"1": 0.0, "2": 0.0, "4": 0.5}
    assert two["problems@k"] == {"1": 2, "2": 2, "4": 2}
    assert "k=4: 1 of 2 problems" in proc.stderr  # the k that left a problem out, said on stderr
    assert "it1/sampled.jsonl" in proc.stderr and "it2/sampled.jsonl" in proc.stderr
    # one grader for all inputs; each summary counts its own input's comparisons
    assert one["grading"] == json.loads(run(["evaluate", first]).stdout)["grading"]

    data = figure.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = plt.imread(figure)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "it1", "it2"]  # no staging file left


def test_the_default_sweep_is_pass_at_1_for_one_sample_and_k_is_its_former_name(tmp_path):
    greedy = write(tmp_path / "greedy.jsonl", sampled("p1", ["12"], "12") + sampled("p2", ["1"], "3"))
    summary = json.loads(run(["evaluate", greedy]).stdout)
    assert summary["pass@k"] == {"1": 0.5} and summary["problems@k"] == {"1": 2}
    assert json.loads(run(["evaluate", "-", "--pass-at", "1,2,...,n"], INPUT).stdout)["pass@k"] == {"1": 0.5, "2": 0.5}
    # a k no problem has enough samples for is reported as null, over 0 problems
    summary = json.loads(run(["evaluate", "-", "--pass-at", "1,8"], INPUT).stdout)
    assert summary["pass@k"]["8"] is None and summary["problems@k"] == {"1": 2, "8": 0}


def test_the_plot_is_written_atomically(tmp_path, monkeypatch):
    import matplotlib.figure

    from mathagent.stages import input_labels, plot_pass_at

    summary = {"pass@k": {"1": 0.5, "2": 0.75}, "maj@k": {"1": 0.5, "2": None}}
    figure = tmp_path / "fig.png"
    figure.write_bytes(b"the plot before")

    def fail(self, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a PNG")
        raise RuntimeError("the disk is full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail)
    with pytest.raises(RuntimeError):
        plot_pass_at([summary], ["a"], str(figure))
    assert figure.read_bytes() == b"the plot before"
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]
    monkeypatch.undo()
    plot_pass_at([summary], ["a"], str(figure))
    assert figure.read_bytes().startswith(PNG_SIGNATURE)
    assert input_labels(["runs/it1/sampled.jsonl", "runs/it2/sampled.jsonl", "-"]) == [
        "it1/sampled.jsonl", "it2/sampled.jsonl", "<stdin>"]
    assert input_labels(["a.jsonl", "b/a.jsonl", "b.jsonl"]) == ["a.jsonl", "b/a.jsonl", "b.jsonl"]


def test_several_inputs_and_the_plot_refuse_what_they_cannot_do(tmp_path):
    path = write(tmp_path / "a.jsonl", RECORDS)
    for args in (["--json", str(tmp_path / "s.json")], ["--graded", str(tmp_path / "g.jsonl")]):
        proc = run(["evaluate", path, path, *args], check=False)
        assert proc.returncode == 2 and "one input" in proc.stderr
    assert run(["evaluate", "-", "-"], INPUT, check=False).returncode == 2
    proc = run(["evaluate", path, "--plot", str(tmp_path / "fig.pdf")], check=False)
    assert proc.returncode == 2 and "--plot" in proc.stderr
    proc = run(["evaluate", path, "--plot", str(tmp_path / "no" / "fig.png")], check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run(["evaluate", path, "--pass-at", "1,2,..."], check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --pass-at '1,2,...'")
    assert proc.stdout == ""
