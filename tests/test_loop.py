"""The online loop as the Makefile runs it: file targets, resume after a kill, one run per RUN, manifests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mathagent import loop
from mathagent.tasks import arith

REPO = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def stages(folder: Path) -> list[dict]:
    path = folder / loop.STAGES_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_stage_names_come_from_the_mathagent_subcommand():
    assert loop.stage_name_of([".venv/bin/mathagent", "rollout", "p.jsonl", "-o", "x"]) == "rollout"
    assert loop.stage_name_of(["python", "-m", "mathagent.cli", "train-mdpo", "pairs.jsonl"]) == "train-mdpo"


def test_a_failed_stage_is_not_recorded_and_keeps_its_exit_code(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "mathagent.loop", "stage", str(tmp_path), "--", sys.executable, "-c",
                         "print('records'); import sys; print('progress', file=sys.stderr)"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout == ""  # the command's own output goes to the stage's log
    bad = subprocess.run([sys.executable, "-m", "mathagent.loop", "stage", str(tmp_path), "--name", "bad", "--",
                          sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"],
                         capture_output=True, text=True)
    assert bad.returncode == 3 and "boom" in bad.stderr
    assert [s["stage"] for s in stages(tmp_path)] == [Path(sys.executable).name]
    assert "records" in (tmp_path / "logs" / f"{Path(sys.executable).name}.log").read_text()


def test_a_mixture_splits_the_samples_evenly_in_its_order():
    assert loop.parse_mixture("0.7", 4) == [loop.Component("current", 0.7, 4)]
    assert loop.parse_mixture("0.7, 1.0", 4) == [loop.Component("current", 0.7, 2), loop.Component("current", 1.0, 2)]
    assert loop.parse_mixture("current:0.7,previous:0.7,sft:1", 6) == [
        loop.Component("current", 0.7, 2), loop.Component("previous", 0.7, 2), loop.Component("sft", 1.0, 2)]


@pytest.mark.parametrize(("spec", "n", "message"), [
    ("0.7,1.0", 3, "2 components do not split --n 3 samples evenly"),
    ("0.7,", 4, "give [POLICY:]TEMPERATURE components separated by commas"),
    ("older:0.7", 1, "policy 'older': choose from current, previous, sft"),
    ("hot", 1, "temperature 'hot' is not a number"),
    ("0", 1, "temperature 0: sampling needs one above 0"),
])
def test_a_bad_mixture_is_named(spec, n, message):
    with pytest.raises(loop.UserError, match=re.escape(message)):
        loop.parse_mixture(spec, n)


def test_merged_parts_are_one_rollout_of_n_samples_per_problem_with_their_sampler(tmp_path):
    parts = []
    for i, (role, temperature) in enumerate((("current", 0.7), ("previous", 1.0))):
        path = Path(write_jsonl(tmp_path / f"p{i}.jsonl", [
            {"id": f"{p}-{k}", "problem_id": p, "tag": (i, k)} for p in ("b", "a") for k in range(2)]))
        parts.append((loop.Component(role, temperature, 2), f"model-{role}", path))
    merged = loop.merge_samples(parts, 4)
    assert [r["id"] for r in merged] == ["b-0", "b-1", "b-2", "b-3", "a-0", "a-1", "a-2", "a-3"]
    assert [tuple(r["tag"]) for r in merged[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert merged[2]["sampler"] == {"policy": "previous", "model": "model-previous", "temperature": 1.0}
    with pytest.raises(loop.UserError, match="problem b: 4 samples in the parts, expected 6"):
        loop.merge_samples(parts, 6)


@pytest.mark.slow
def test_sample_runs_one_resumable_rollout_per_component_and_merges_them(tmp_path, tiny_model):
    problems = write_jsonl(tmp_path / "train.jsonl", arith.make_problems(3, seed=21, split="train"))
    out = tmp_path / "it" / "trajectories.jsonl"
    proc = subprocess.run([sys.executable, "-m", "mathagent.loop", "sample", str(tmp_path / "it"), "--problems",
                           problems, "--mixture", "current:0.5,sft:1.0", "--n", "4", "--seed", "3", "--policy",
                           f"current={tiny_model}", "--policy", "sft=" + tiny_model, "-o", str(out), "--",
                           str(REPO / ".venv" / "bin" / "mathagent"), "rollout", "--backend", "hf",
                           "--prompt", "tool", "--max-turns", "2", "--max-tokens", "16"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 12 and len({r["id"] for r in records}) == 12
    for k, record in enumerate(records):
        assert record["id"] == f"{record['problem_id']}-{k % 4}"
        assert record["sampler"]["temperature"] == (0.5 if k % 4 < 2 else 1.0)
    ran = stages(tmp_path / "it")
    assert [s["stage"] for s in ran] == ["rollout-0", "rollout-1"]
    assert "--temperature 0.5 --n 2 --seed 3 --resume" in ran[0]["command"]
    assert "--temperature 1.0 --n 2 --seed 1003 --resume" in ran[1]["command"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["logs", "stages.jsonl", "trajectories.jsonl"]


def test_a_round_of_groups_takes_what_the_rate_so_far_asks_for():
    assert loop.next_round(8, 0, 0) == 8  # the first round: as many problems as groups wanted
    assert loop.next_round(8, 4, 8) == 8  # half of them disagreed: 4 more groups need 8 more problems
    assert loop.next_round(8, 0, 8) == 64  # none did: at least 1 in 8 is assumed


def test_sample_takes_rounds_of_problems_until_enough_groups_disagree(tmp_path):
    """--groups with a stand-in rollout (a script whose samples disagree on every problem of even number): the
    rounds stop once enough groups disagree; a group with an ungraded sample does not count."""
    script = tmp_path / "stand_in_rollout.py"
    script.write_text(
        "import json, sys\n"
        "args = sys.argv[1:]; out = args[args.index('-o') + 1]; n = int(args[args.index('--n') + 1])\n"
        "with open(out, 'w') as f:\n"
        "    for p in map(json.loads, open(args[0])):\n"
        "        for k in range(n):\n"
        "            r = 1.0 if int(p['id'][1:]) % 2 == 0 and k == 0 else -1.0\n"
        "            f.write(json.dumps({'id': p['id'] + '-' + str(k), 'problem_id': p['id'], 'reward': r}) + '\\n')\n")
    problems = write_jsonl(tmp_path / "pool.jsonl", [{"id": f"q{i}", "question": "?"} for i in range(40)])
    out = tmp_path / "it" / "trajectories.jsonl"
    proc = subprocess.run([sys.executable, "-m", "mathagent.loop", "sample", str(tmp_path / "it"), "--problems",
                           problems, "--mixture", "0.7", "--n", "2", "--seed", "1", "--groups", "6", "--policy",
                           "current=m", "-o", str(out), "--", sys.executable, str(script)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    sampled = {json.loads(line)["problem_id"] for line in out.read_text().splitlines()}
    disagree = {p for p in sampled if int(p[1:]) % 2 == 0}
    assert len(disagree) >= 6 and len(sampled) < 40  # enough informative groups, and it stopped early
    assert [s["stage"] for s in stages(tmp_path / "it")][0] == "rollout-round0"
    assert sorted(p.name for p in out.parent.iterdir()) == ["logs", "stages.jsonl", "trajectories.jsonl"]
    assert loop.informative_groups(out) == len(disagree)
    ungraded = write_jsonl(tmp_path / "u.jsonl", [{"id": "a-0", "problem_id": "a", "reward": 1.0},
                                                  {"id": "a-1", "problem_id": "a", "reward": None}])
    assert loop.informative_groups(ungraded) == 0


def make(*args: str, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("algo", ["mdpo", "grpo"])
def test_two_iterations_resume_after_a_kill_redo_nothing_and_refuse_a_concurrent_run(tmp_path, algo):
    from mathagent.tiny import build_tiny_model

    # A policy that writes the agent's format (boxed answers, python cells), rarely right: winners are the
    # trajectories that box an answer in time, losers those that do not.
    model = build_tiny_model(tmp_path / "policy", seed=1, warmup_steps=150)
    problems = write_jsonl(tmp_path / "train.jsonl", arith.make_problems(8, seed=21, split="train"))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", arith.make_problems(3, seed=22, split="heldout"))
    runs = tmp_path / "runs"
    settings = [
        f"RUNS={runs}", "RUN=chain", f"MODEL={model}", "BACKEND=hf", "PROMPT=tool", f"PROBLEMS={problems}",
        f"EVAL={heldout}", "N_SAMPLES=4", "N_EVAL=2", "MAX_TURNS=3", "MAX_TOKENS=40", "START=1",
        # GRPO's own part is its update; the iterations around it are the Makefile's, run twice with M-DPO
        f"N={2 if algo == 'mdpo' else 1}",
        "PAIRS_ARGS=--strategy random --k 2 --reward-threshold -0.75 --keep-unfinished --keep-errors",
        "TRAIN_ARGS=--lr 1e-4 --batch-size 2 --max-steps 3", f"ALGO={algo}",
        "GRPO_ARGS=--lr 1e-4 --batch-size 2 --max-steps 3",
    ]
    trainer = f"train-{algo}"
    before_training = ["rollout", "make-pairs"] if algo == "mdpo" else ["rollout"]
    iter1, iter2 = runs / "chain" / "iter1", runs / "chain" / "iter2"

    first = subprocess.Popen(["make", "--no-print-directory", "iterations", *settings], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Wait until iteration 1 is training: its rollout and pairs are finished files.
        deadline = time.monotonic() + 600
        while not (iter1 / "logs" / f"{trainer}.log").exists():
            assert first.poll() is None, "the first run ended before training"
            assert time.monotonic() < deadline, "iteration 1 never reached training"
            time.sleep(0.2)
        second = make("iterations", *settings, timeout=60)
        assert second.returncode != 0 and "in use by another run" in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the killed stage (a big process) takes a moment to die
            try:
                os.killpg(first.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    done = {name: (iter1 / name).stat().st_mtime_ns for name in ("trajectories.jsonl", "pairs.jsonl")[:len(before_training)]}
    assert [s["stage"] for s in stages(iter1)] == before_training

    rerun = make("iterations", *settings)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert {name: (iter1 / name).stat().st_mtime_ns for name in done} == done
    # every stage of each iteration ran exactly once, the killed training included (after the kill); pi_1's
    # evaluations and iteration 2's training samples were one rollout, recorded in both iterations
    expected = [*before_training, trainer, "rollout", "evaluate", "evaluate"]
    assert sorted(s["stage"] for s in stages(iter1)) == sorted(expected)
    last = iter2 if algo == "mdpo" else iter1
    if algo == "mdpo":
        assert sorted(s["stage"] for s in stages(iter2)) == sorted(expected)
        shared = [s for s in stages(iter2) if s.get("shared_with") == str(iter1)]
        assert len(shared) == 1 and f"-o {iter2 / 'trajectories.jsonl'}" in shared[0]["command"]
        assert shared[0]["seconds"] == 0 and shared[0]["shared_seconds"] > 0
    else:  # iteration 1 is the last (N=1): its evaluation samples nothing for an iteration 2
        assert not iter2.exists() and not any("iter2" in s["command"] for s in stages(iter1))

    manifest = json.loads((last / "manifest.json").read_text())
    assert manifest["config"]["POLICY"] == str(last / "model")
    if algo == "mdpo":
        assert str(iter1 / "model") in manifest["inputs"]  # pi_1, the policy iteration 2 sampled from, by hash
    assert 0 <= manifest["metrics"]["accuracy"] <= 1 and manifest["config"]["ALGO"] == algo
    if algo == "mdpo":
        assert manifest["metrics"]["pairs"] >= 1
    else:  # trained on the groups whose rewards differ, with no pairs
        assert manifest["metrics"]["pairs"] is None and manifest["metrics"]["train_examples"] >= 2
    assert any(f"--model {iter1 / 'model'}" in s["command"] for s in manifest["stages"] if s["stage"] == "rollout")

    again = make("iterations", *settings)  # everything is finished: nothing runs
    assert again.returncode == 0 and len(stages(iter1)) == len(expected)
    assert algo != "mdpo" or len(stages(iter2)) == len(expected)


def test_report_writes_the_papers_table_a_plot_and_summary_json_in_the_documented_shape(tmp_path):
    demo = tmp_path / "demo"
    config = {"MODEL": f"{demo}/sft/model", "PROBLEMS": f"{demo}/train.jsonl", "EVAL": f"{demo}/heldout.jsonl",
              "GREEDY_ARGS": "--prompt bare --max-turns 4 --max-tokens 64 --temperature 0 --n 1",
              "BACKEND": "vllm", "SEED": "0"}
    accuracy = {("mdpo", 0): 0.2, ("mdpo", 1): 0.3, ("mdpo", 2): 0.35, ("mdpo", 3): 0.4,
                ("dpo", 1): 0.25, ("dpo", 2): 0.3, ("dpo", 3): 0.33}
    for (method, k), value in accuracy.items():
        folder = demo / method / f"iter{k}"
        folder.mkdir(parents=True)
        metrics = {"accuracy": value, "pass@1": value / 2, "maj@k": value, "k": 4,
                   "pairs": None if k == 0 else 50 + k, "train_loss": None if k == 0 else 0.5}
        (folder / "manifest.json").write_text(json.dumps(
            {"directory": str(folder), "config": config, "metrics": metrics, "seconds": 10.0 * (k + 1), "stages": []}))
    proc = subprocess.run([sys.executable, "-m", "mathagent.loop", "report", str(demo), "--seconds", "700"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "M-DPO iteration 3" in proc.stderr and "single-turn DPO iteration 3" in proc.stderr
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["seconds"] == 700 and summary["heldout_problems"] == config["EVAL"]
    assert summary["rollout_args"] == config["GREEDY_ARGS"].split() + ["--backend", "vllm", "--seed", "0"]
    rows = {(r["method"], r["iteration"]): r for r in summary["rows"]}
    assert set(rows) == {("sft", 0)} | {k for k in accuracy if k[0] == "dpo" or k[1] > 0}
    assert rows[("sft", 0)]["model"] == config["MODEL"] and rows[("sft", 0)]["accuracy"] == 0.2
    assert rows[("mdpo", 3)]["model"] == str(demo / "mdpo" / "iter3" / "model")
    assert rows[("mdpo", 3)]["heldout"] == str(demo / "mdpo" / "iter3" / "heldout.jsonl")
    assert (demo / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _manifests(root, accuracy):
    for (run, k), value in accuracy.items():
        folder = root / run / f"iter{k}"
        folder.mkdir(parents=True)
        metrics = {"accuracy": value, "pass@1": value / 2, "maj@k": value, "k": 4, "pairs": None if k == 0 else 50 + k}
        (folder / "manifest.json").write_text(json.dumps({"directory": str(folder), "metrics": metrics}))


def test_compare_puts_runs_side_by_side_with_the_shared_start_as_their_iteration_0(tmp_path):
    _manifests(tmp_path, {("a", 0): 0.2, ("a", 1): 0.3, ("a", 2): 0.45, ("b", 1): 0.25, ("b", 2): 0.275})
    out = tmp_path / "c.json"
    proc = subprocess.run([sys.executable, "-m", "mathagent.loop", "compare", f"with NLL={tmp_path / 'a'}",
                           f"no NLL={tmp_path / 'b'}", "--start", str(tmp_path / "a"), "--json", str(out),
                           "--plot", str(tmp_path / "c.png")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in proc.stderr.splitlines() if line.count("│") > 3}
    assert rows["no NLL"] == ["20.0", "25.0", "27.5", "13.8", "27.5", "52"]  # iteration 0 is a's, the shared start
    assert rows["with NLL"] == ["20.0", "30.0", "45.0", "22.5", "45.0", "52"]
    runs = json.loads(out.read_text())["runs"]
    assert [r["label"] for r in runs] == ["with NLL", "no NLL"]
    assert [p["accuracy"] for p in runs[1]["iterations"]] == [0.2, 0.25, 0.275]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("args", "message"), [
    (["problems", "--task", "arith", "-o", "x.jsonl"], "--task arith needs --n (at least 1)"),
    (["problems", "--task", "arith", "--n", "2", "--demos", "--prompt", "nope", "-o", "x.jsonl"],
     "--prompt: 'nope' is neither a prompt name (tool, cot, bare) nor a file"),
    (["policy", "--out", "model", "--prompt", "nope"], "--prompt: 'nope' is neither a prompt name (tool, cot, bare) nor a file"),
    (["stage", "."], "no command after --"),
    (["eval-json", "."], ". needs greedy.json and sampled.json"),
    (["manifest", ".", "RUN"], "'RUN': expected KEY=VALUE"),
    (["report", "."], "./mdpo/iter0/manifest.json (the SFT policy's evaluation) is missing"),
    (["compare", "a"], "run 'a': give LABEL=DIR"),
    (["compare", "a=nowhere"], "nowhere: no finished iteration (iter*/manifest.json)"),
])
def test_a_user_mistake_is_one_line_and_exit_2_as_in_the_main_command_line(args, message, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(loop.app, args)
    assert result.exit_code == 2 and result.output == f"error: {message}\n"
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "model").exists()
