"""The multi-turn loop: actions, code, observations, statuses, and one engine call per turn."""

import pytest

from mathagent import agent
from mathagent.agent import AgentConfig, cut_after_code, executed_cells, extract_code, pending_code, run_agent
from mathagent.prompts import PROMPTS
from mathagent.records import format_observation

from conftest import last_output

CODE_ACTION = "Let me compute.\n```python\nx = 6 * 7\nprint(x)\n```"


def test_code_is_the_first_complete_python_block():
    assert extract_code(CODE_ACTION) == "x = 6 * 7\nprint(x)\n"
    assert extract_code("```python\nprint(1)") is None
    assert extract_code("no code") is None


def test_an_action_ends_with_its_first_python_block():
    text = CODE_ACTION + "\nso the output is 42 and \\boxed{42}"
    assert cut_after_code(text) == CODE_ACTION
    assert cut_after_code("plain \\boxed{1}") == "plain \\boxed{1}"


def test_pending_code_is_code_without_an_observation_and_without_an_answer():
    base = [{"role": "user", "content": "q"}]
    assert pending_code(base + [{"role": "assistant", "content": CODE_ACTION}]) == "x = 6 * 7\nprint(x)\n"
    assert pending_code(base + [{"role": "assistant", "content": CODE_ACTION + " \\boxed{42}"}]) is None
    assert pending_code(base + [{"role": "assistant", "content": CODE_ACTION}, {"role": "user", "content": "```output\n42\n```"}]) is None


def test_executed_cells_are_the_code_of_actions_with_observations():
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "```python\na = 1\n```"},
        {"role": "tool", "content": format_observation("")},
        {"role": "assistant", "content": "```python\nb = a + 1\n```"},
    ]
    assert executed_cells(messages) == ("a = 1\n",)


def test_new_trajectories_keep_problem_fields_and_get_distinct_ids():
    problem = {"id": "p1", "question": "What is 2+3?", "answer": "5", "level": 2}
    ts = agent.new_trajectories(problem, 3, PROMPTS["tool"])
    assert [t["id"] for t in ts] == ["p1-0", "p1-1", "p1-2"]
    assert all(t["problem_id"] == "p1" and t["level"] == 2 and t["answer"] == "5" for t in ts)
    assert ts[0]["messages"][0]["content"].startswith("What is 2+3?\n\n")
    assert ts[0]["messages"] is not ts[1]["messages"]


def always_code(state, turn):
    return f"Step {turn}.\n```python\nv{turn} = {turn} + 1\nprint(v{turn})\n```"


def test_64_problems_times_4_samples_cost_one_engine_call_per_turn(scripted, sandbox, grader):
    engine = scripted(always_code)
    problems = [{"id": f"p{i}", "question": f"q{i}", "answer": "1"} for i in range(64)]
    trajectories = [t for p in problems for t in agent.new_trajectories(p, 4, PROMPTS["tool"])]
    run_agent(trajectories, engine, sandbox, grader, AgentConfig(max_turns=3))
    assert engine.stats.calls == 3
    assert engine.stats.requests == 64 * 4 * 3
    assert {t["status"] for t in trajectories} == {"max_turns"}
    # every action's code ran, the last one included, and its output came back as the observation
    assert all(len(t["messages"]) == 1 + 3 * 2 for t in trajectories)
    assert trajectories[0]["messages"][-1]["content"] == "```output\n3\n```"


def uses_earlier_state(state, turn):
    if turn == 0:
        return "```python\nx = 20\nprint('set')\n```"
    if turn == 1:
        return "```python\nprint(x + 1)\n```"
    return f"The value is \\boxed{{{last_output(state)}}}"


def test_names_from_turn_one_are_visible_in_turn_two_and_the_answer_is_graded(scripted, sandbox, grader):
    trajectories = agent.new_trajectories({"id": "p", "question": "q", "answer": "21"}, 2, PROMPTS["tool"])
    run_agent(trajectories, scripted(uses_earlier_state), sandbox, grader, AgentConfig(max_turns=6))
    t = trajectories[0]
    assert [m["role"] for m in t["messages"]] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert t["messages"][4]["content"] == "```output\n21\n```"
    assert (t["status"], t["pred"], t["correct"], t["reward"]) == ("answered", "21", True, 1.0)


def test_a_turn_without_code_ends_the_trajectory_as_stopped(scripted, sandbox, grader):
    trajectories = agent.new_trajectories({"id": "p", "question": "q", "answer": "3"}, 1, PROMPTS["tool"])
    run_agent(trajectories, scripted(lambda s, t: "I think it is 3."), sandbox, grader, AgentConfig())
    t = trajectories[0]
    assert (t["status"], t["pred"], t["correct"], t["reward"]) == ("stopped", None, False, -1.0)


def test_without_tools_an_action_is_the_whole_text_and_nothing_runs(scripted, grader):
    text = CODE_ACTION + "\n```output\n42\n```\nSo \\boxed{42}."  # the model writes its own 'output'
    trajectories = agent.new_trajectories({"id": "p", "question": "q", "answer": "42"}, 2, PROMPTS["cot"])
    engine = scripted(lambda s, t: text)
    config = AgentConfig(tools=False)
    assert not config.execute
    run_agent(trajectories, engine, None, grader, config)  # no sandbox at all
    t = trajectories[0]
    assert [m["role"] for m in t["messages"]] == ["user", "assistant"]
    assert t["messages"][1]["content"] == text  # neither cut after its code nor stopped at "```output"
    assert (t["status"], t["pred"], t["correct"], t["reward"]) == ("answered", "42", True, 1.0)
    assert engine.stats.calls == 1
    unanswered = agent.new_trajectories({"id": "q", "question": "q", "answer": "1"}, 1, PROMPTS["cot"])
    run_agent(unanswered, scripted(lambda s, t: CODE_ACTION), None, grader, config)
    assert unanswered[0]["status"] == "stopped"  # code without a tool is text: no tool_call, no observation


def test_a_cut_action_has_status_length_and_the_next_rollout_continues_it(scripted, sandbox, grader):
    long_text = "word " * 40 + "\\boxed{3}"
    trajectories = agent.new_trajectories({"id": "p", "question": "q", "answer": "3"}, 1, PROMPTS["tool"])
    run_agent(trajectories, scripted(lambda s, t: long_text), sandbox, grader, AgentConfig(max_tokens=8))
    assert trajectories[0]["status"] == "length"
    cut = trajectories[0]["messages"][-1]["content"]
    # the policy sees its cut action in the state and finishes it
    engine = scripted(lambda state, t: " and so \\boxed{3}" if state.rstrip().endswith(cut.strip()) else "wrong")
    run_agent(trajectories, engine, sandbox, grader, AgentConfig(max_tokens=8))
    t = trajectories[0]
    assert len(t["messages"]) == 2 and t["messages"][-1]["content"] == cut + " and so \\boxed{3}"
    assert t["status"] == "answered" and t["correct"] is True


def test_observations_can_use_the_tool_role(scripted, sandbox, grader):
    trajectories = agent.new_trajectories({"id": "p", "question": "q"}, 1, PROMPTS["tool"])
    run_agent(trajectories, scripted(always_code), sandbox, grader, AgentConfig(max_turns=2, observation_role="tool"))
    assert [m["role"] for m in trajectories[0]["messages"]] == ["user", "assistant", "tool", "assistant", "tool"]
    assert trajectories[0]["correct"] is None  # no gold answer, no grade


def test_without_execution_a_tool_call_ends_the_run_and_execute_pending_resumes_it(scripted, sandbox, grader):
    trajectories = agent.new_trajectories({"id": "p", "question": "q", "answer": "21"}, 1, PROMPTS["tool"])
    run_agent(trajectories, scripted(uses_earlier_state), None, grader, AgentConfig(execute=False))
    assert trajectories[0]["status"] == "tool_call" and len(trajectories[0]["messages"]) == 2
    assert agent.execute_pending(trajectories, sandbox) == 1
    run_agent(trajectories, scripted(uses_earlier_state), None, grader, AgentConfig(execute=False))
    assert trajectories[0]["status"] == "tool_call" and len(trajectories[0]["messages"]) == 4
    assert agent.execute_pending(trajectories, sandbox) == 1
    # a fresh process would replay the first cell: the sandbox state is rebuilt from the messages
    run_agent(trajectories, scripted(uses_earlier_state), sandbox, grader, AgentConfig())
    assert trajectories[0]["pred"] == "21" and trajectories[0]["correct"] is True


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_the_tiny_model_runs_the_loop_on_both_backends(backend, request, sandbox, grader):
    engine = request.getfixturevalue(f"{backend}_engine")
    problems = [{"id": f"p{i}", "question": f"What is {i}+3?", "answer": str(i + 3)} for i in range(3)]
    trajectories = [t for p in problems for t in agent.new_trajectories(p, 2, PROMPTS["tool"])]
    run_agent(trajectories, engine, sandbox, grader, AgentConfig(max_turns=2, max_tokens=24, temperature=1.0))
    for t in trajectories:
        assert t["status"] in ("answered", "stopped", "length", "max_turns")
        assert t["messages"][-1]["role"] == "assistant" or t["status"] == "max_turns"
        assert "reward" in t and "correct" in t


def test_with_continuous_batching_no_trajectory_waits_for_a_slow_cell_and_the_records_stay_the_same(vllm_engine, grader):
    """On vLLM, scheduled continuously, each trajectory goes on as soon as its own observation is back: the fast
    ones finish while one cell still sleeps, where turn by turn every one of them waits for it. Same seeds,
    same trajectories."""
    import time

    from mathagent.sandbox import Sandbox

    def given(schedule: str) -> tuple[list[dict], dict[str, float]]:
        trajectories = []
        for i in range(4):
            (t,) = agent.new_trajectories({"id": f"p{i}", "question": f"What is {i}+3?", "answer": str(i + 3)}, 1,
                                          PROMPTS["tool"])
            # 4 s: the fast ones must be done 1.5 s before it ends even on a loaded machine (at 3 s they once
            # finished 1.95 s in, 0.1 s too late, while other tests ran beside this one)
            code = "import time\ntime.sleep(4)\nprint(1)" if i == 0 else f"print({i} + 3)"
            t["messages"].append({"role": "assistant", "content": f"```python\n{code}\n```"})
            trajectories.append(t)
        ended_at, start = {}, time.perf_counter()

        def on_turn(report):
            ended_at.update({tid: time.perf_counter() - start for tid in report.ended})

        with Sandbox(timeout=10) as box:
            run_agent(trajectories, vllm_engine, box, grader,
                      AgentConfig(max_turns=3, max_tokens=12, temperature=1.0, schedule=schedule), on_turn=on_turn)
        return trajectories, ended_at

    continuous, continuous_ends = given("continuous")
    turned, turned_ends = given("turns")
    assert max(continuous_ends[f"p{i}-0"] for i in (1, 2, 3)) < continuous_ends["p0-0"] - 1.5
    assert min(turned_ends[f"p{i}-0"] for i in (1, 2, 3)) >= 3.0
    # the same ids and text; the log-probs up to the engine's batch-dependent float32 numerics
    without = lambda ts: [[{k: v for k, v in m.items() if k != "logprobs"} for m in t["messages"]] for t in ts]  # noqa: E731
    assert without(continuous) == without(turned)
    for a, b in zip(continuous, turned):
        for m, n in zip(a["messages"], b["messages"]):
            assert (m.get("logprobs") is None) == (n.get("logprobs") is None)
            if m.get("logprobs"):
                assert m["logprobs"] == pytest.approx(n["logprobs"], abs=1e-4)
    assert [t["status"] for t in continuous] == [t["status"] for t in turned]


def test_each_observation_records_its_cells_outcome_as_data(scripted, grader):
    from mathagent.pairs import error_observation
    from mathagent.metrics import turn_statistics
    from mathagent.sandbox import Sandbox

    cells = ['print("error:", 0.001)', "1 / 0", "import time\ntime.sleep(5)", "print('x' * 500)", "print('done')"]

    def policy(state, turn):
        return f"Step.\n```python\n{cells[turn]}\n```" if turn < len(cells) else "\\boxed{1}"

    with Sandbox(timeout=1.0, max_output_chars=300) as box:
        (t,) = agent.new_trajectories({"id": "p", "question": "q", "answer": "1"}, 1, PROMPTS["tool"])
        run_agent([t], scripted(policy), box, grader, AgentConfig(max_turns=len(cells) + 1, max_tokens=200))
    outcomes = [m["outcome"] for m in t["messages"] if "outcome" in m]
    assert outcomes == [{"status": "ok", "cut": False}, {"status": "error", "cut": False},
                        {"status": "timeout", "cut": False}, {"status": "ok", "cut": True},
                        {"status": "ok", "cut": False}]
    assert turn_statistics(t["messages"])["error_observations"] == 2  # "error: 0.001" is a printed result
    first = {**t, "messages": t["messages"][:3] + [{"role": "assistant", "content": "\\boxed{1}"}]}
    assert "error: 0.001" in first["messages"][2]["content"] and not error_observation(first)


def test_execute_with_release_ends_each_session_right_after_its_cell(sandbox):
    trajectories = [{"id": f"rel-{i}", "messages": [{"role": "user", "content": "q"},
                                                     {"role": "assistant", "content": f"```python\nprint({i})\n```"}]}
                    for i in range(4)]
    assert agent.execute_pending(trajectories, sandbox, release=True) == 4
    assert [t["messages"][-1]["content"] for t in trajectories] == [f"```output\n{i}\n```" for i in range(4)]
    assert not any(f"rel-{i}" in sandbox.live_sessions() for i in range(4))


# ---- self-rewarding correction: the loop's stop and continue decisions on hand-written outputs -------------

def self_correcting(state, outputs):
    """A prompted model: answers 48 with code's help, judges it wrong, revises to 42, judges that correct."""
    asked = state.rsplit("<|im_start|>user\n", 1)[-1]
    if asked.startswith("Perform a self-evaluation"):
        return "[VERIFY] correct." if "\\boxed{42}" in state.rsplit("Perform", 1)[0][-40:] else "[VERIFY] wrong."
    if asked.startswith("Since your most recent answer"):
        return "6 * 7 = 42, so \\boxed{42}."
    return "```python\nprint(6 * 8)\n```" if outputs == 0 else "So \\boxed{48}."


@pytest.mark.parametrize("max_revisions", [0, 1, 2])
def test_a_prompted_model_is_asked_for_its_verdict_and_revises_a_wrong_answer_while_revisions_last(
        scripted, sandbox, max_revisions, grader):
    trajectories = agent.new_trajectories({"id": "p", "question": "6 * 7?", "answer": "42"}, 1, PROMPTS["tool"])
    config = AgentConfig(max_turns=2, self_reward="prompted", max_revisions=max_revisions)
    run_agent(trajectories, scripted(self_correcting), sandbox, grader, config)
    t = trajectories[0]
    roles = [m["role"] for m in t["messages"]]
    # question, code, output, answer 48, verify?, "wrong", (revise?, answer 42, verify?, "correct")
    assert roles[:6] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert t["messages"][5]["content"] == "[VERIFY] wrong."
    assert t["verdicts"] == {"correct": "[VERIFY] correct", "wrong": "[VERIFY] wrong"}
    if max_revisions == 0:  # no revision allowed: the wrong verdict ends it, with its answer
        assert len(roles) == 6
        assert (t["status"], t["pred"], t["correct"], t["reward"]) == ("answered", "48", False, -0.5)
        assert [(a["answer"], a["verdict"], a["correct"]) for a in t["attempts"]] == [("48", "wrong", False)]
    else:  # one revision, judged correct: the trajectory ends whatever revisions are left
        assert len(roles) == 10 and t["messages"][-1]["content"] == "[VERIFY] correct."
        assert (t["status"], t["pred"], t["correct"], t["reward"]) == ("answered", "42", True, 1.0)
        assert [(a["answer"], a["verdict"], a["correct"]) for a in t["attempts"]] == [
            ("48", "wrong", False), ("42", "correct", True)]


def test_an_inline_model_completes_the_verdict_and_the_revision_within_its_own_message(scripted, sandbox, grader):
    def trained(state, outputs):
        tail = state.rsplit("<|im_start|>assistant\n", 1)[-1]
        if tail.endswith("[VERIFY] "):
            return "correct." if tail.count("\\boxed") == 2 else "wrong."
        if tail.endswith("Let's correct it step by step.\n"):
            return "6 * 7 = 42, \\boxed{42}"
        return "It is \\boxed{48}"

    trajectories = agent.new_trajectories({"id": "p", "question": "6 * 7?", "answer": "42"}, 1, PROMPTS["cot"])
    run_agent(trajectories, scripted(trained), None, grader, AgentConfig(self_reward="inline", max_revisions=2, execute=False))
    t = trajectories[0]
    assert [m["role"] for m in t["messages"]] == ["user", "assistant"]
    assert t["messages"][1]["content"] == (
        "It is \\boxed{48}\n\n[VERIFY] wrong. Let's correct it step by step.\n6 * 7 = 42, \\boxed{42}\n\n"
        "[VERIFY] correct.")
    assert (t["status"], t["pred"], t["correct"]) == ("answered", "42", True)
    assert [(a["answer"], a["verdict"]) for a in t["attempts"]] == [("48", "wrong"), ("42", "correct")]


def test_a_model_that_never_judges_keeps_its_answer_and_is_stopped(scripted, sandbox, grader):
    trajectories = agent.new_trajectories({"id": "p", "question": "6 * 7?", "answer": "42"}, 1, PROMPTS["cot"])
    engine = scripted(lambda state, outputs: "Looks fine to me." if "self-evaluation" in state else "\\boxed{42}")
    run_agent(trajectories, engine, None, grader, AgentConfig(self_reward="prompted", execute=False))
    t = trajectories[0]
    assert (t["status"], t["pred"], t["correct"]) == ("stopped", "42", True)
    assert t["attempts"] == [{"index": 0, "answer": "42", "verdict": None, "correct": True}]


def test_an_inline_model_asked_once_for_a_verdict_that_writes_none_ends_unjudged(scripted, grader):
    engine = scripted(lambda state, outputs: "not sure" if state.endswith("[VERIFY] ") else "It is \\boxed{42}")
    trajectories = agent.new_trajectories({"id": "p", "question": "6 * 7?", "answer": "42"}, 1, PROMPTS["cot"])
    run_agent(trajectories, engine, None, grader, AgentConfig(self_reward="inline", execute=False))
    t = trajectories[0]
    assert t["messages"][-1]["content"] == "It is \\boxed{42}\n\n[VERIFY] not sure"
    assert engine.stats.calls == 2
    assert (t["status"], t["pred"], t["correct"]) == ("answered", "42", True)
    assert t["attempts"] == [{"index": 0, "answer": "42", "verdict": None, "correct": True}]


def test_an_inline_verdict_after_an_action_that_holds_code_and_an_answer_is_kept_and_ends_the_trajectory(scripted, grader):
    # A stray block after the answer: the verdict request and its completion go after it, not cut away.
    engine = scripted(lambda state, outputs: "correct." if state.endswith("[VERIFY] ")
                      else "\\boxed{42}\n```python\nprint(1)\n```")
    trajectories = agent.new_trajectories({"id": "p", "question": "6 * 7?", "answer": "42"}, 1, PROMPTS["cot"])
    run_agent(trajectories, engine, None, grader, AgentConfig(self_reward="inline", execute=False))
    t = trajectories[0]
    assert t["messages"][-1]["content"] == "\\boxed{42}\n```python\nprint(1)\n```\n\n[VERIFY] correct."
    assert engine.stats.calls == 2 and t["status"] == "answered"
    assert t["attempts"] == [{"index": 0, "answer": "42", "verdict": "correct", "correct": True}]


@pytest.mark.parametrize("mode", ["prompted", "inline"])
def test_a_model_that_answers_again_instead_of_judging_is_asked_for_a_verdict_only_once(scripted, mode, grader):
    engine = scripted(lambda state, outputs: "\\boxed{7}")  # never a verdict, always another answer
    trajectories = agent.new_trajectories({"id": "p", "question": "6 * 7?", "answer": "42"}, 1, PROMPTS["cot"])
    run_agent(trajectories, engine, None, grader, AgentConfig(self_reward=mode, execute=False, max_revisions=3))
    t = trajectories[0]
    assert engine.stats.calls == 2 and t["status"] == "answered"
    assert [a["verdict"] for a in t["attempts"]] == [None] * len(t["attempts"])


def test_auto_schedule_is_continuous_only_where_generation_leaves_the_cpu_to_the_cells():
    from types import SimpleNamespace

    from mathagent.agent import resolve_schedule

    continuous_gpu = SimpleNamespace(submit=None, on_cpu=False)  # a CUDA vLLM, or servers
    continuous_cpu = SimpleNamespace(submit=None, on_cpu=True)  # vLLM on this CPU
    batch_only = SimpleNamespace(on_cpu=False)  # the hf engine: one batch per call
    assert resolve_schedule("auto", continuous_gpu) == "continuous"
    assert resolve_schedule("auto", continuous_cpu) == "turns"
    assert resolve_schedule("auto", batch_only) == "turns"
    assert resolve_schedule("turns", continuous_gpu) == "turns"
    assert resolve_schedule("continuous", continuous_cpu) == "continuous"


def test_the_objects_alive_when_the_loop_starts_are_out_of_the_collectors_passes_until_it_ends(scripted, sandbox,
                                                                                               grader):
    """A full pass of the cyclic collector over a heap such as vLLM's holds the interpreter for 0.2 s and more,
    with no cell result taken meanwhile: the loop freezes what is alive when it starts and thaws it at the end,
    but leaves a freeze made before it (vLLM's engine core makes one) as it found it."""
    import gc

    seen = []

    def policy(state, turn):
        seen.append(gc.get_freeze_count())
        return CODE_ACTION if turn == 0 else "So \\boxed{42}."

    def rollout():
        run_agent(agent.new_trajectories({"id": "p", "question": "q", "answer": "42"}, 2, PROMPTS["tool"]),
                  scripted(policy), sandbox, grader, AgentConfig(max_turns=3))

    frozen_by_others = gc.get_freeze_count()  # an in-process vLLM of an earlier test froze the heap
    gc.unfreeze()  # only the collector's bookkeeping: every object stays where it is
    try:
        rollout()
        assert seen and min(seen) > 1000
        assert gc.get_freeze_count() == 0
        gc.freeze()
        before = gc.get_freeze_count()
        rollout()
        # a frozen object that dies meanwhile leaves the count; a thaw by the loop would leave it at 0
        assert gc.get_freeze_count() > before // 2
    finally:
        gc.unfreeze()
        if frozen_by_others:
            gc.freeze()


class _Continuous:
    """A continuous-batching engine off this machine's CPU (as a CUDA vLLM or servers): a request's action is
    done as soon as it is submitted, and `step` hands it back; records when each step was called."""

    on_cpu = False

    def __init__(self, tokenizer, clock):
        from mathagent.engines import EngineStats

        self.tokenizer, self.stats, self.clock = tokenizer, EngineStats(), clock
        self.done, self.steps = [], []

    def submit(self, key, request, sampling):
        from mathagent.engines import Completion

        ids = self.tokenizer("So \\boxed{1}.", add_special_tokens=False)["input_ids"]
        self.done.append((key, Completion(text="So \\boxed{1}.", num_tokens=len(ids), finish_reason="stop",
                                          token_ids=ids, logprobs=None)))

    def step(self):
        self.steps.append(self.clock())
        done, self.done = self.done, []
        return done


def test_off_the_cpu_an_action_that_is_done_is_taken_while_other_trajectories_cells_keep_finishing(tiny_tokenizer,
                                                                                                   grader):
    """Holding the engine's step back while cells finish lets a batch grow only where stepping takes the
    cells' cores (an engine on this CPU). Off the CPU the engine has gone on anyway: what it finished is taken
    at once, not after the stream of cell results pauses. Here 12 cells finish one every 20 ms while one
    trajectory's action is done from the start; it is taken before the third cell is back."""
    import threading
    import time
    from concurrent.futures import Future

    class TimedCells:
        """Cell results that come back one every 20 ms, in order of submission (the loop's collaborator)."""

        def __init__(self):
            self.finished = 0

        def reserve(self, n):
            pass

        def forget(self, session):
            pass

        def submit(self, cell):
            from mathagent.sandbox import CellResult

            future = Future()

            def finish():
                time.sleep(0.02 * (int(cell.session.split("-")[0][1:]) + 1))
                self.finished += 1
                future.set_result(CellResult("1", "ok", 0.0))

            threading.Thread(target=finish, daemon=True).start()
            return future

    cells = TimedCells()
    trajectories = []
    for i in range(12):
        (t,) = agent.new_trajectories({"id": f"c{i}", "question": "q", "answer": "1"}, 1, PROMPTS["tool"])
        t["messages"].append({"role": "assistant", "content": "```python\nprint(1)\n```"})
        trajectories.append(t)
    trajectories += agent.new_trajectories({"id": "g", "question": "q", "answer": "1"}, 1, PROMPTS["tool"])
    engine = _Continuous(tiny_tokenizer, lambda: cells.finished)
    run_agent(trajectories, engine, cells, grader, AgentConfig(max_turns=3, schedule="continuous"))
    assert trajectories[-1]["status"] == "answered"
    assert engine.steps[0] < 3
