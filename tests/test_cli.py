"""The command line as a user runs it: real subprocesses, the tiny model, pipes between stages. The option
checks, which end before any work, run the same app in-process (`invoke`): a Python start each would be most of
their time."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

MATHAGENT = [sys.executable, "-m", "mathagent.cli"]
PROBLEM = '{"id":"p1","question":"What is 2+3?","answer":"5"}\n'


def run(args, stdin="", check=True, **kwargs):
    proc = subprocess.run(MATHAGENT + args, input=stdin, capture_output=True, text=True, timeout=300, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def invoke(args, stdin, cwd, monkeypatch) -> subprocess.CompletedProcess:
    """`run` without a process of its own: the app in ours, in `cwd`, its streams captured apart."""
    from typer.testing import CliRunner

    from mathagent.cli import app

    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, args, input=stdin)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_version_and_help_list_every_stage_option_with_its_default():
    assert run(["--version"]).stdout.strip().startswith("mathagent ")
    assert "rollout" in run(["--help"]).stdout
    text = run(["rollout", "--help"]).stdout
    for option in ("--model", "--backend", "--adapter", "--n ", "--temperature", "--top-p", "--max-tokens",
                   "--max-turns", "--seed", "--prompt", "--observation-role", "--shard", "--resume",
                   "--skip-invalid", "--output"):
        assert option in text
    assert "[default: 6]" in text and "[default: vllm]" in text
    for option in ("--timeout", "--memory-mb", "--observation-role"):
        assert option in run(["execute", "--help"]).stdout


def test_the_training_commands_take_one_set_of_options_declared_once():
    import dataclasses
    import inspect

    from mathagent.cli import TRAINING_OPTIONS, app
    from mathagent.train_config import TrainConfig

    commands = {c.name: inspect.signature(c.callback).parameters for c in app.registered_commands
                if c.name in ("train-mdpo", "train-sft", "train-prm")}
    assert len(commands) == 3
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(TRAINING_OPTIONS) - {"input", "skip_invalid"} <= fields
    for name, parameters in commands.items():
        for option, (annotation, _) in TRAINING_OPTIONS.items():
            assert parameters[option].annotation is annotation, (name, option)  # the one declaration
        assert set(parameters) - set(TRAINING_OPTIONS) <= fields | {"steps", "eval_path"}, name
    assert commands["train-prm"]["epochs"].default == commands["train-mdpo"]["epochs"].default == 1.0
    assert commands["train-prm"]["max_length"].default == commands["train-sft"]["max_length"].default
    assert commands["train-prm"]["lr_scheduler"].default == "constant_with_warmup"  # its constant rate, as before


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_rollout_prints_n_trajectories_with_distinct_ids(backend, tiny_model):
    proc = run(["rollout", "--model", tiny_model, "--backend", backend, "--n", "4", "--max-turns", "3",
                "--max-tokens", "32"], stdin=PROBLEM)
    out = records(proc.stdout)
    assert len(out) == 4
    assert len({t["id"] for t in out}) == 4
    for t in out:
        assert t["problem_id"] == "p1" and t["answer"] == "5" and t["question"] == "What is 2+3?"
        assert t["messages"][0]["role"] == "user" and t["messages"][1]["role"] == "assistant"
        assert t["status"] in ("answered", "stopped", "max_turns", "length")
        assert "reward" in t and "correct" in t
    assert "engine calls" in proc.stderr
    # stderr is the progress bar and the summary: none of the engine's logs, warnings or load bars
    assert [line.split()[0] for line in proc.stderr.splitlines() if line.strip()] == ["problems", "rollout:"]


@pytest.mark.slow
def test_the_engines_own_logs_show_with_verbose_and_continuous_scheduling_runs_from_the_command_line(tiny_model):
    proc = run(["-v", "rollout", "--model", tiny_model, "--n", "4", "--max-turns", "3", "--max-tokens", "32",
                "--schedule", "continuous"], stdin=PROBLEM)
    assert len(records(proc.stdout)) == 4
    assert "WARNING" in proc.stderr or "INFO" in proc.stderr  # vLLM's own lines, kept off stderr without -v


@pytest.mark.slow
def test_rollout_execute_rollout_pipe_continues_the_trajectories(tiny_model):
    first = run(["rollout", "--model", tiny_model, "--backend", "hf", "--n", "2", "--max-turns", "1",
                 "--max-tokens", "6", "--temperature", "1.0"], stdin=PROBLEM).stdout
    # a hand-written trajectory whose code waits for its observation rides along
    pending = {"id": "h", "problem_id": "p2", "question": "q", "answer": "42", "status": "tool_call",
               "messages": [{"role": "user", "content": "q"},
                            {"role": "assistant", "content": "```python\nx = 41\nprint(x + 1)\n```"}]}
    executed = run(["execute"], stdin=first + json.dumps(pending) + "\n").stdout
    middle = records(executed)
    assert [t["id"] for t in middle] == ["p1-0", "p1-1", "h"]
    assert middle[:2] == records(first)  # nothing pending there: passed through unchanged
    assert middle[2]["messages"][-1] == {"role": "user", "content": "```output\n42\n```",
                                         "outcome": {"status": "ok", "cut": False}}
    final = records(run(["rollout", "--model", tiny_model, "--backend", "hf", "--max-turns", "3",
                         "--max-tokens", "6", "--temperature", "1.0"], stdin=executed).stdout)
    assert [t["id"] for t in final] == ["p1-0", "p1-1", "h"]
    for before, after in zip(middle, final):
        grew = len(after["messages"]) > len(before["messages"]) or len(after["messages"][-1]["content"]) > len(
            before["messages"][-1]["content"])
        assert grew or before["status"] in ("answered", "stopped")
        kept = after["messages"][: len(before["messages"]) - 1]
        if "prompt_ids" in before:  # sampled here: the ids ride along unchanged
            assert kept == before["messages"][:-1] and after["prompt_ids"] == before["prompt_ids"]
        else:  # the hand-written one gets its ids computed, its text unchanged
            assert [{k: v for k, v in m.items() if k != "token_ids"} for m in kept] == before["messages"][:-1]
        assert "prompt_ids" in after and all("token_ids" in m for m in after["messages"][1:])


def test_malformed_input_exits_2_naming_the_line(tiny_model):
    proc = run(["rollout", "--model", tiny_model], stdin=PROBLEM + '{"id": "p2", "question": \n', check=False)
    assert proc.returncode == 2
    assert "<stdin>:2: malformed JSON" in proc.stderr
    assert proc.stdout == ""


def test_a_missing_field_exits_2_naming_the_file_line_and_field(tmp_path, tiny_model):
    path = tmp_path / "problems.jsonl"
    path.write_text(PROBLEM + '{"id": "p2", "answer": "1"}\n')
    proc = run(["rollout", str(path), "--model", tiny_model], check=False)
    assert proc.returncode == 2
    assert f"{path}:2: missing required field 'question'" in proc.stderr


def test_execute_rejects_a_trajectory_with_bad_messages():
    proc = run(["execute"], stdin='{"id": "a", "messages": "oops"}\n', check=False)
    assert proc.returncode == 2 and "<stdin>:1: field 'messages'" in proc.stderr


@pytest.mark.slow
def test_resume_after_a_killed_rollout_does_only_the_missing_ids(tmp_path, tiny_model):
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i}?", "answer": str(i)}) + "\n"
                                for i in range(12)))
    out = tmp_path / "out.jsonl"
    args = ["rollout", str(problems), "-o", str(out), "--model", tiny_model, "--backend", "hf", "--n", "2",
            "--max-tokens", "8", "--chunk-size", "2", "--temperature", "1.0"]
    proc = subprocess.Popen(MATHAGENT + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it once some chunks are written, before it ends
        temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        if temps and sum(1 for _ in temps[0].open()) >= 4:
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # a killed run leaves no half output
    partial = [json.loads(line) for line in next(p for p in tmp_path.iterdir() if p.name.endswith(".tmp")).open()
               if line.endswith("\n")]
    resumed = run(args + ["--resume"])
    assert "inputs already done" in resumed.stderr
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(t["id"] for t in final) == sorted(f"q{i}-{k}" for i in range(12) for k in range(2))
    by_id = {t["id"]: t for t in final}
    done_problems = {t["problem_id"] for t in partial}
    for t in partial:  # what the killed run finished was kept, not redone
        if all(f"{t['problem_id']}-{k}" in {p["id"] for p in partial} for k in range(2)):
            assert by_id[t["id"]] == t
    assert done_problems
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_jobs_share_one_engine_start_and_write_what_separate_rollouts_write(tmp_path, tiny_model, monkeypatch):
    from mathagent import stages
    from mathagent.cli import app
    from typer.testing import CliRunner

    def rollout(*args: str) -> None:
        result = CliRunner().invoke(app, ["rollout", *args, "--model", tiny_model, "--backend", "hf", "--max-turns",
                                          "2", "--max-tokens", "12"])
        assert result.exit_code == 0, result.output

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"id": f"a{i}", "question": f"What is {i}+1?", "answer": str(i + 1)}) + "\n"
                         for i in range(3)))
    b.write_text(PROBLEM)
    rollout(str(a), "-o", str(tmp_path / "a1.jsonl"), "--temperature", "0")
    rollout(str(b), "-o", str(tmp_path / "b1.jsonl"), "--n", "3", "--temperature", "1.0", "--seed", "7")
    opened = []
    open_engine = stages.EngineOptions.open
    monkeypatch.setattr(stages.EngineOptions, "open", lambda self: opened.append(self) or open_engine(self))
    rollout(str(a), "-o", str(tmp_path / "a2.jsonl"), "--temperature", "0",
            "--job", f"{b} -o {tmp_path / 'b2.jsonl'} --n 3 --temperature 1.0 --seed 7")
    assert len(opened) == 1
    for name in ("a", "b"):
        assert (tmp_path / f"{name}1.jsonl").read_text() == (tmp_path / f"{name}2.jsonl").read_text()
    # resumed with everything done, no job opens an engine
    rollout(str(a), "-o", str(tmp_path / "a2.jsonl"), "--resume", "--job", f"{b} -o {tmp_path / 'b2.jsonl'} --n 3")
    assert len(opened) == 1


@pytest.mark.parametrize(("job", "message"), [
    ("-o x.jsonl", "start with the job's INPUT"),
    ("b.jsonl", "give its output (-o PATH)"),
    ("b.jsonl -o x.jsonl --max-turns 3", "'--max-turns': a job sets only"),
    ("b.jsonl -o x.jsonl --n", "--n needs a value"),
    ("b.jsonl -o x.jsonl --temperature hot", "could not convert"),
    ("b.jsonl -o x.jsonl --temperature -1", "temperature -1.0: must be 0 (greedy) or positive"),
    ("'b.jsonl -o x.jsonl", "No closing quotation"),
])
def test_a_bad_job_spec_is_refused_naming_it(job, message):
    from mathagent.agent import AgentConfig
    from mathagent.errors import UserError
    from mathagent.stages import RecordIO, RolloutJob, parse_job

    with pytest.raises(UserError) as error:
        parse_job(job, RolloutJob(RecordIO("a.jsonl", "a.out"), AgentConfig(), 1))
    assert message in str(error.value) and job in str(error.value)


def test_jobs_writing_one_output_stop_before_any_work(tmp_path):
    (tmp_path / "a.jsonl").write_text(PROBLEM)
    (tmp_path / "b.jsonl").write_text(PROBLEM)
    proc = run(["rollout", "a.jsonl", "-o", "a.out", "--job", "b.jsonl -o a.out"], check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "a.out: the output of 2 jobs" in proc.stderr, proc.stderr
    assert not (tmp_path / "a.out").exists()


def test_shards_split_the_input_without_overlap(tmp_path, tiny_model):
    problems = "".join(json.dumps({"id": f"q{i}", "question": "x"}) + "\n" for i in range(5))
    ids = []
    for shard in ("0/2", "1/2"):
        out = run(["rollout", "--model", tiny_model, "--backend", "hf", "--shard", shard, "--max-tokens", "2"],
                  stdin=problems).stdout
        ids.append([t["problem_id"] for t in records(out)])
    assert ids == [["q0", "q2", "q4"], ["q1", "q3"]]


PENDING = ('{"id": "t", "problem_id": "p", "question": "q", "status": "tool_call", "messages": [{"role": "user", '
           '"content": "q"}, {"role": "assistant", "content": "```python\\nprint(1)\\n```"}]}\n')
PAIR = ('{"id": "x", "prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],'
        ' "rejected": [{"role": "assistant", "content": "b"}]}\n')


@pytest.mark.parametrize("args, stdin, named", [
    (["rollout", "--model", "no/such/dir"], PROBLEM, "--model no/such/dir: no such directory"),
    (["rollout", "--model", "./missing-model"], PROBLEM, "--model ./missing-model: no such directory"),
    (["rollout", "--adapter", "/no/adapter"], PROBLEM, "--adapter /no/adapter: no such directory"),
    (["rollout", "--chunk-size", "0"], PROBLEM, "--chunk-size"),
    (["rollout", "--dtype", "bogus"], PROBLEM, "--dtype 'bogus'"),
    (["rollout", "--temperature", "-1"], PROBLEM, "--temperature -1.0"),
    (["rollout", "--top-p", "0"], PROBLEM, "--top-p 0.0"),
    (["rollout", "--top-p", "2"], PROBLEM, "--top-p 2.0"),
    (["rollout", "--reward", "bogus"], PROBLEM, "--reward 'bogus'"),
    (["execute", "--observation-role", "assistant"], PENDING, "--observation-role cannot be assistant"),
    (["execute", "--chunk-size", "0"], PENDING, "--chunk-size"),
    (["evaluate", "--grading-timeout", "-1"], PENDING, "--grading-timeout -1.0"),
    (["evaluate", "--json", "/no/such/folder/s.json"], PENDING, "does not exist"),
    (["make-pairs", "--stats", "/no/such/folder/s.json"], PENDING, "does not exist"),
    (["train-mdpo", "-", "--beta", "nan"], PAIR, "--beta nan"),
    (["train-mdpo", "-", "--lr", "-1"], PAIR, "--lr -1.0"),
    (["train-mdpo", "-", "--lora", "--lora-rank", "0"], PAIR, "--lora-rank 0"),
    (["train-mdpo", "-", "--model", "/no/model"], PAIR, "--model /no/model"),
    (["train-mdpo", "-", "--report-to", "bogus"], PAIR, "--report-to 'bogus': choose none, all, or from tensorboard"),
    (["train-sft", "-", "--report-to", "tensorboard,bogus"], PENDING, "--report-to 'tensorboard,bogus': choose"),
    (["train-prm", "-", "--report-to", "bogus"], PENDING, "--report-to 'bogus': choose"),
    (["train-prm", "-", "--labels", "bogus"], PENDING, "--labels 'bogus': choose from hard, soft"),
    (["train-sft", "-", "--merge-lora"], PENDING, "--merge-lora needs --lora"),
    (["train-mdpo", "-", "--loss", "kto", "--nll-weight", "1"], PAIR, "--nll-weight applies to the pair losses"),
])
def test_a_bad_option_is_one_line_and_exit_2_before_any_work(args, stdin, named, tmp_path, monkeypatch):
    proc = invoke(args, stdin, tmp_path, monkeypatch)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert named in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_an_output_that_is_a_directory_or_being_written_is_refused_at_once(tmp_path):
    proc = run(["execute", "-o", str(tmp_path)], PENDING, check=False)
    assert proc.returncode == 2 and "is a directory" in proc.stderr and list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    proc = run(["train-sft", "-", "--output-dir", str(tmp_path / "file")], PENDING, check=False)
    assert proc.returncode == 2 and "is a file" in proc.stderr
    duplicate = run(["execute"], PENDING + PENDING, check=False)
    assert duplicate.returncode == 2 and "<stdin>:2: duplicate id 't' (first on line 1)" in duplicate.stderr
