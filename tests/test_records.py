import json
import os

import pytest

from mathagent.errors import UserError
from mathagent.records import (
    InvalidCounter,
    RecordWriter,
    check_problem_or_trajectory,
    format_observation,
    is_observation,
    read_finished,
    read_records,
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
