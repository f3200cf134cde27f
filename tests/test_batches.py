"""Batches: the plan of the steps (seeded epochs, whole batches) and a micro-batch's forward passes."""

import pytest

from mathagent import batches
from mathagent.chat import right_pad
from mathagent.errors import UserError
from mathagent.train_config import TrainConfig


def test_a_micro_batch_runs_in_groups_of_similar_length():
    lengths = [481, 138, 254, 427, 151, 367, 300, 384]
    groups = batches.length_groups(lengths, 0.8)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert all(lengths[i] >= 0.8 * lengths[group[0]] for i in group)
    assert [[lengths[i] for i in g] for g in groups] == [[481, 427], [384, 367], [300, 254], [151, 138]]


def test_every_process_runs_as_many_forward_passes_as_the_one_with_the_most():
    """Under DDP and FSDP a forward pass is a collective: a process whose micro-batch groups into fewer lengths
    splits its largest group until it runs as many passes as the others (or the run hangs)."""
    lengths = [481, 138, 254, 427, 151, 367, 300, 384]
    assert batches.forward_groups(lengths) == batches.length_groups(lengths)
    alone = batches.forward_groups([200, 190, 180, 170, 100])
    assert [len(g) for g in alone] == [4, 1]
    groups = batches.forward_groups([200, 190, 180, 170, 100], same_passes=lambda n: max(n, 4))
    assert len(groups) == 4 and sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    assert [len(g) for g in groups] == [1, 1, 2, 1]


def test_epochs_may_be_fractional_and_each_takes_whole_batches_in_its_own_seeded_order():
    def plan(epochs, n=10, batch_size=3, max_steps=None):
        config = TrainConfig(model="tiny", output_dir="o", epochs=epochs, batch_size=batch_size,
                                      max_steps=max_steps)
        return batches.make_plan(n, config, world=1)

    assert plan(1).steps_per_epoch == 3 and plan(1).total_steps == 3  # the 10th example waits for another epoch
    assert plan(2).total_steps == 6 and plan(0.5).total_steps == 2 and plan(0.1).total_steps == 1
    assert plan(0.3, n=10, batch_size=1).total_steps == 3  # not 4: 0.3 x 10 is 3.0000000000000004
    assert plan(2, max_steps=5).total_steps == 5
    first, second = plan(2).step(0)[0][0] + plan(2).step(1)[0][0] + plan(2).step(2)[0][0], plan(2).step(3)[0][0]
    assert len(set(first)) == 9 and first[:3] != second
    for bad in (0, -1, float("nan")):
        with pytest.raises(UserError, match="epochs"):
            TrainConfig(model="tiny", output_dir="o", epochs=bad)


def test_rows_are_right_padded_with_an_attention_mask_over_the_real_tokens():
    ids, attention = right_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and attention.tolist() == [[1, 1, 1], [1, 0, 0]]
    sequences = [batches.Encoded([5, 6, 7], [0, 1, 1]), batches.Encoded([8], [0])]
    batch = batches.collate(sequences, pad_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["action_mask"].tolist() == [[0, 1, 1], [0, 0, 0]]
