"""`mathagent evaluate` as a user runs it: a real subprocess, trajectories in, a JSON summary out."""

from __future__ import annotations

import json
import subprocess
import sys

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
    proc = run(["evaluate", "-", "--k", "1,2", "--score-field", "score", "--graded", str(graded_path)], INPUT)
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
    assert run(["evaluate", "-", "--k", "0"], INPUT, check=False).returncode == 2
    assert run(["evaluate", "-", "--answer-modes", "last_number"], INPUT, check=False).returncode == 2
    bad = run(["evaluate", "-"], '{"id": "x", "messages": []}\n', check=False)
    assert bad.returncode == 2 and "<stdin>:1" in bad.stderr
