import json
import os

import pytest

from mathagent.errors import UserError
from mathagent.records import (
    InvalidCounter,
    RecordWriter,
    check_messages,
    check_problem_or_trajectory,
    check_prompt,
    finished_records,
    format_observation,
    is_observation,
    read_finished,
    read_records,
    split_finished,
    split_prompt,
)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_records_are_read_with_unknown_fields_kept(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", ['{"id": 1, "question": "q", "answer": "5", "level": 3}', "", '{"id": "b", "question": "r"}'])
    records = list(read_records(path, required=("id", "question")))
    assert records == [{"id": "1", "question": "q", "answer": "5", "level": 3}, {"id": "b", "question": "r"}]


def test_a_malformed_line_names_the_file_and_the_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", ['{"id": 1, "question": "q"}', '{"id": 2, "question": '])
    with pytest.raises(UserError, match=r"p\.jsonl:2: malformed JSON"):
        list(read_records(path, required=("id", "question")))


def test_a_missing_field_names_the_file_the_line_and_the_field(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", ['{"id": 1, "question": "q"}', '{"id": 2}'])
    with pytest.raises(UserError, match=r"p\.jsonl:2: missing required field 'question'"):
        list(read_records(path, required=("id", "question")))


def test_bad_messages_are_rejected_with_the_field_path(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ['{"id": 1, "messages": [{"role": "user"}]}'])
    with pytest.raises(UserError, match=r"t\.jsonl:1: field 'messages\[0\]'"):
        list(read_records(path))


def test_rollout_input_check_tells_problems_from_trajectories():
    assert check_problem_or_trajectory({"id": "a", "question": "q"}) is None
    assert check_problem_or_trajectory({"id": "a", "messages": []}) == "missing required field 'problem_id'"
    assert check_problem_or_trajectory({"id": "a"}) == "missing required field 'question'"


def test_skip_invalid_counts_and_skips(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", ["not json", '{"id": 1, "question": "q"}', '{"question": "no id"}'])
    invalid = InvalidCounter()
    records = list(read_records(path, required=("id", "question"), skip_invalid=True, invalid=invalid))
    assert [r["id"] for r in records] == ["1"]
    assert invalid.count == 2 and invalid.examples[0].startswith(f"{path}:1:")


def test_a_missing_input_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        list(read_records(str(tmp_path / "nope.jsonl")))


def test_the_output_appears_only_when_the_writer_closes_cleanly(tmp_path):
    target = tmp_path / "out.jsonl"
    with RecordWriter(str(target)) as writer:
        writer.write({"id": "a"})
        assert not target.exists()
    assert json.loads(target.read_text()) == {"id": "a"}


def test_a_failed_run_leaves_the_old_output_untouched_and_its_records_for_resume(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text('{"id": "old"}\n')
    with pytest.raises(RuntimeError):
        with RecordWriter(str(target)) as writer:
            writer.write({"id": "new"})
            raise RuntimeError("killed")
    assert target.read_text() == '{"id": "old"}\n'
    assert sorted(r["id"] for r in read_finished(str(target))) == ["new", "old"]


def test_resume_drops_a_cut_last_line_of_a_killed_run(tmp_path):
    target = tmp_path / "out.jsonl"
    (tmp_path / ".out.jsonl.abc.tmp").write_text('{"id": "a"}\n{"id": "b", "mess')
    assert [r["id"] for r in read_finished(str(target))] == ["a"]
    with RecordWriter(str(target), keep=read_finished(str(target))) as writer:
        writer.write({"id": "b"})
    assert [json.loads(x)["id"] for x in target.read_text().splitlines()] == ["a", "b"]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_observations_are_the_non_assistant_messages_after_the_first_action():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": format_observation("5\n")},
    ]
    assert [is_observation(messages, i) for i in range(4)] == [False, False, False, True]
    assert messages[3]["content"] == "```output\n5\n```"


# ---- hostile bytes, duplicate ids, output paths (what a careless user or a hostile record does) ----------


def test_bad_bytes_and_deep_nesting_are_a_file_line_error_not_a_traceback(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"id": 1, "question": "q"}\n{"id": 2, "question": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"p\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 27\)"):
        list(read_records(str(path), required=("id", "question")))
    path.write_text('{"id": 1, "question": "q"}\n' + "[" * 100_000 + "\n")
    with pytest.raises(UserError, match=r"p\.jsonl:2: malformed JSON: nested too deeply"):
        list(read_records(str(path)))
    path.write_text('{"id": ' + "9" * 5000 + "}\n")
    with pytest.raises(UserError, match=r"p\.jsonl:1: malformed JSON"):
        list(read_records(str(path)))
    invalid = InvalidCounter()
    path.write_bytes(b'\xff\xfe\n' + b"[" * 100_000 + b'\n{"id": "ok"}\n')
    assert [r["id"] for r in read_records(str(path), skip_invalid=True, invalid=invalid)] == ["ok"]
    assert invalid.count == 2
    # --resume reads a killed run's leftovers with the same tolerance
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "a"}\n\xff\n' + b"[" * 100_000 + b"\n")
    assert read_finished(str(out)) == [{"id": "a"}]


def test_duplicate_ids_are_refused_where_a_stage_keys_on_them(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ['{"id": "a"}', '{"id": "b"}', '{"id": "a"}'])
    with pytest.raises(UserError, match=r"t\.jsonl:3: duplicate id 'a' \(first on line 1\)"):
        list(read_records(path, unique_ids=True))
    assert len(list(read_records(path))) == 3


def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        RecordWriter(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        RecordWriter(str(tmp_path / "missing" / "out.jsonl"))
    with pytest.raises(UserError, match="/proc"):
        RecordWriter("/proc/out.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_a_second_writer_of_the_same_output_refuses_at_once_and_the_first_finishes(tmp_path):
    out = tmp_path / "out.jsonl"
    first = RecordWriter(str(out))
    first.write({"id": "a"})
    with pytest.raises(UserError, match="another run is writing it"):
        RecordWriter(str(out))
    first.write({"id": "b"})
    first.close()
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    # a killed run's leftover is not in use: the next writer takes over and removes it on a clean close
    killed = RecordWriter(str(out))
    killed.write({"id": "c"})
    killed.close(ok=False)  # the process died: its temporary file stays, its lock went with it
    with RecordWriter(str(out)) as writer:
        writer.write({"id": "d"})
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_an_output_file_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with RecordWriter(str(tmp_path / "out.jsonl")) as writer:
            writer.write({"id": "a"})
    finally:
        os.umask(old)
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == 0o640


def test_the_prompt_is_every_message_before_the_first_action():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": "```python\nprint(5)\n```"}, {"role": "user", "content": "```output\n5\n```"},
                {"role": "assistant", "content": "\\boxed{5}"}]
    prompt, response = split_prompt(messages)
    assert prompt == messages[:2] and response == messages[2:]
    assert split_prompt(messages[:2]) == (messages[:2], [])
    assert [is_observation(messages, i) for i in range(5)] == [False, False, False, True, False]


def test_messages_are_checked_in_one_place_for_every_stage():
    assert check_messages([{"role": "user", "content": "q"}]) is None
    assert check_messages([]) == "field 'messages' must be a non-empty list of messages"
    assert check_messages([{"role": "user"}], "chosen") == "field 'chosen[0]' must be an object with string 'role' and 'content'"
    assert "must start with an assistant message" in check_messages([{"role": "user", "content": "q"}], "chosen",
                                                                      starts_with_action=True)
    assert check_prompt([{"role": "user", "content": "q"}]) is None
    assert "has an assistant message" in check_prompt([{"role": "assistant", "content": "a"}])


def test_resume_keeps_an_input_only_when_all_its_trajectories_are_finished(tmp_path):
    out = tmp_path / "out.jsonl"
    write_lines(out, ['{"id": "a-0", "done": 1}', '{"id": "a-1", "done": 1}', '{"id": "b-0", "done": 1}'])
    finished = finished_records(str(out), resume=True)
    assert set(finished) == {"a-0", "a-1", "b-0"}
    assert finished_records(str(out), resume=False) == {} and finished_records("-", resume=True) == {}
    groups = [[{"id": "a-0"}, {"id": "a-1"}], [{"id": "b-0"}, {"id": "b-1"}]]
    kept, todo = split_finished(groups, finished)
    assert kept == [{"id": "a-0", "done": 1}, {"id": "a-1", "done": 1}] and todo == [groups[1]]
