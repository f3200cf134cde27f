"""The training objectives: records to examples, M-KTO's KL pairs, the options each objective checks (their
losses in training: tests/test_training.py, tests/test_prm.py)."""

import pytest
from test_training import HAND_PAIRS, encoded

from mathagent import objectives
from mathagent.chat import DEFAULT_MAX_LENGTH, tokenize_conversation
from mathagent.errors import UserError
from mathagent.train_config import TrainConfig


def test_an_example_longer_than_max_length_is_dropped_and_counted_never_cut(tiny_model, tiny_tokenizer):
    lengths = [len(tokenize_conversation(tiny_tokenizer, p["prompt"] + p[side]).input_ids)
               for p in HAND_PAIRS for side in ("chosen", "rejected")]
    shortest_pair = min(range(len(HAND_PAIRS)), key=lambda i: max(lengths[2 * i : 2 * i + 2]))
    limit = max(lengths[2 * shortest_pair : 2 * shortest_pair + 2])
    assert limit < max(lengths)  # the other pair has a longer sequence
    config = TrainConfig(model=tiny_model, output_dir="unused", max_length=limit)
    examples, report = encoded(objectives.PairObjective(config), tiny_tokenizer, HAND_PAIRS)
    assert [e.id for e in examples] == [HAND_PAIRS[shortest_pair]["id"]] and report.too_long == 1
    for seq, side in zip(examples[0].sequences, ("chosen", "rejected"), strict=True):  # whole, answers included
        whole = tokenize_conversation(tiny_tokenizer, HAND_PAIRS[shortest_pair]["prompt"] + HAND_PAIRS[shortest_pair][side])
        assert seq.input_ids == whole.input_ids
    kto = TrainConfig(model=tiny_model, output_dir="unused", max_length=limit, loss="kto")
    examples, report = encoded(objectives.KTOObjective(kto), tiny_tokenizer, HAND_PAIRS)
    assert all(len(e.sequences[0].input_ids) <= limit for e in examples) and len(examples) + report.too_long == 4
    assert TrainConfig(model="tiny", output_dir="o").max_length == DEFAULT_MAX_LENGTH


def test_an_m_kto_kl_partner_never_shares_the_prompt_of_its_example():
    prompts = ["p1", "p1", "p2", "p3", "p3", "p1"]
    for micro in ([0, 1, 2], [1, 0], [3, 4], [5, 0, 1, 2], [2, 3]):
        partners = objectives.kl_partners(micro, prompts)
        assert [i for i, _ in partners] == micro
        assert all(prompts[i] != prompts[j] for i, j in partners), (micro, partners)
    assert objectives.kl_partners([2, 3], prompts) == [(2, 3), (3, 2)]  # the other example of the micro-batch
    assert objectives.kl_partners([0, 1], prompts) == [(0, 2), (1, 2)]  # the next example with another prompt
    with pytest.raises(UserError, match="two different prompts"):
        objectives.kl_partners([0, 1], ["p", "p"])


@pytest.mark.parametrize("objective, options, option, message", [
    (objectives.PairObjective, {"loss": "kto"}, "loss", "loss 'kto': choose from sigmoid, ipo, hinge, kto"),
    (objectives.KTOObjective, {"loss": "kto", "nll_weight": 0.5}, "nll_weight", "nll_weight applies to the pair"),
    (objectives.PRMObjective, {"labels": "bogus"}, "labels", "labels 'bogus': choose from hard, soft"),
    (objectives.PRMObjective, {"steps_mode": "bogus"}, "steps_mode", "steps_mode 'bogus': choose from"),
])
def test_an_objective_refuses_an_option_it_cannot_train_with_naming_the_option(objective, options, option, message):
    with pytest.raises(UserError, match=message) as raised:
        objective(TrainConfig(model="tiny", output_dir="unused", **options))
    assert raised.value.options == (option,)
