"""Logits processors, sampling and stopping on hand-made tensors."""

from __future__ import annotations

import math

import torch

from llm_serving.engine.request import FinishReason
from llm_serving.sampling.logits import RowContext, candidates, penalize, top_p, typical_p
from llm_serving.sampling.params import FrequencyRule, SamplingParams, StoppingParams
from llm_serving.sampling.sampler import choose, make_generator
from llm_serving.sampling.stopping import check_stop

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])


def row(prompt: tuple[int, ...] = (), output: tuple[int, ...] = (), **params: object) -> RowContext:
    return RowContext(SamplingParams(**params), prompt, output)  # type: ignore[arg-type]


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    out = penalize(LOGITS, [row(prompt=(0, 3), repetition_penalty=2.0)])
    assert out[0].tolist() == [1.0, 1.0, 0.5, -2.0, -3.0]


def test_frequency_penalty_tgi_counts_prompt_and_output_over_their_length() -> None:
    """TGI: `penalty * count / len(prompt + output)`; here counts 2, 1, 1 over 4 tokens."""
    out = penalize(LOGITS, [row(prompt=(1,), output=(0, 0, 2), frequency_penalty=0.5)])
    assert out[0].tolist() == [1.75, 0.875, 0.375, -1.0, -3.0]
    rewarded = penalize(LOGITS, [row(prompt=(1,), output=(0, 0, 2), frequency_penalty=-2.0)])
    assert rewarded[0].tolist() == [3.0, 1.5, 1.0, -1.0, -3.0]


def test_frequency_penalty_openai_counts_output_only() -> None:
    out = penalize(
        LOGITS,
        [row(prompt=(1,), output=(0, 0, 2), frequency_penalty=0.5, frequency_rule=FrequencyRule.OPENAI)],
    )
    assert out[0].tolist() == [1.0, 1.0, 0.0, -1.0, -3.0]


def test_frequency_rules_mix_in_one_batch() -> None:
    rows = [
        row(prompt=(1,), output=(0,), frequency_penalty=1.0),
        row(prompt=(1,), output=(0,), frequency_penalty=1.0, frequency_rule=FrequencyRule.OPENAI),
    ]
    out = penalize(LOGITS.repeat(2, 1), rows)
    assert out[0].tolist() == [1.5, 0.5, 0.5, -1.0, -3.0]
    assert out[1].tolist() == [1.0, 1.0, 0.5, -1.0, -3.0]


def test_rows_are_processed_independently() -> None:
    both = penalize(LOGITS.repeat(2, 1), [row(prompt=(0,), repetition_penalty=2.0), row()])
    assert both[1].tolist() == LOGITS[0].tolist()
    assert both[0].tolist() == penalize(LOGITS, [row(prompt=(0,), repetition_penalty=2.0)])[0].tolist()


def test_top_k_candidates_are_sorted_and_masked_per_row() -> None:
    params = [SamplingParams(do_sample=True, top_k=2), SamplingParams(do_sample=True, top_k=3)]
    values, ids = candidates(LOGITS.repeat(2, 1), params)
    assert ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert math.isinf(values[0, 2])
    assert not math.isinf(values[1, 2])


def test_top_p_keeps_the_nucleus() -> None:
    values = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    kept = top_p(values.clone(), [SamplingParams(top_p=0.7)])
    assert [not math.isinf(v) for v in kept[0].tolist()] == [True, True, False, False]
    assert not math.isinf(top_p(values.clone(), [SamplingParams(top_p=0.01)])[0, 0])


def test_typical_p_drops_the_unlikely_tail() -> None:
    values = torch.tensor([[math.log(0.6), math.log(0.3), math.log(0.09), math.log(0.01)]])
    kept = typical_p(values.clone(), [SamplingParams(typical_p=0.5)])
    assert math.isinf(kept[0, 3])


def test_greedy_choice_and_top_tokens() -> None:
    [choice] = choose(LOGITS, [row(top_n_tokens=2)], [None])
    assert choice.token == 0
    assert [t for t, _ in choice.top] == [0, 1]
    assert math.isclose(choice.logprob, float(LOGITS.log_softmax(-1)[0, 0]), rel_tol=1e-6)


def test_same_seed_same_samples_in_any_batch() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(do_sample=True, temperature=1.5, top_k=20, top_p=0.9)

    def run(batch: int) -> list[int]:
        gens = [make_generator(7)] + [make_generator(i) for i in range(batch - 1)]
        out = []
        for _ in range(10):
            rows = [RowContext(params, (), ())] * batch
            out.append(choose(logits[:batch], rows, gens)[0].token)
        return out

    assert run(1) == run(4)


def test_stopping_order_and_stop_strings() -> None:
    p = StoppingParams(max_new_tokens=3, stop=("END",))
    assert check_stop(5, 3, "abc", "c", p, {5}) is FinishReason.LENGTH
    assert check_stop(5, 1, "abc", "c", p, {5}) is FinishReason.EOS_TOKEN
    assert check_stop(1, 1, "the END", "ND", p, {5}) is FinishReason.STOP_SEQUENCE
    assert check_stop(1, 1, "the END and more", " more", p, {5}) is None
    assert check_stop(5, 1, "x", "x", StoppingParams(max_new_tokens=9, ignore_eos=True), {5}) is None


def test_extreme_valid_parameters_give_a_distribution() -> None:
    """Any positive float32 temperature or penalty is valid: the logprobs stay finite (no NaN, no 500)."""
    cases: list[dict[str, float]] = [
        {"temperature": 1e-40},
        {"temperature": 3e38},
        {"repetition_penalty": 1e-40},
        {"repetition_penalty": 3e38},
        {
            "temperature": 1e-40,
            "repetition_penalty": 1e-40,
            "top_p": 0.5,
            "typical_p": 0.5,
            "top_n_tokens": 3,
        },
    ]
    for params in cases:
        for do_sample in (True, False):
            rows = [RowContext(SamplingParams(do_sample=do_sample, seed=0, **params), (1, 3), ())]  # type: ignore[arg-type]
            [choice] = choose(LOGITS, rows, [make_generator(0)])
            assert math.isfinite(choice.logprob), params
            assert all(math.isfinite(lp) for _, lp in choice.top), params
    [cold] = choose(LOGITS, [row(do_sample=True, temperature=1e-40)], [make_generator(0)])
    assert (cold.token, cold.logprob) == (0, 0.0)


def test_top_tokens_removed_by_a_warper_are_not_listed() -> None:
    """TGI lists top tokens from the warped distribution and drops the ones a warper removed (-inf)."""
    [choice] = choose(LOGITS, [row(do_sample=True, top_p=0.01, top_n_tokens=3)], [make_generator(0)])
    assert choice.top == ((0, 0.0),)
    [typical] = choose(LOGITS, [row(do_sample=True, typical_p=0.2, top_n_tokens=5)], [make_generator(0)])
    assert 0 < len(typical.top) < 5
    assert all(math.isfinite(lp) for _, lp in typical.top)


def test_sampled_top_tokens_are_the_processed_distribution() -> None:
    """The nucleus of [0.5, 0.3, 0.15, 0.05] at 0.7 is the first two, renormalized: 0.625 and 0.375."""
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    [choice] = choose(logits, [row(do_sample=True, top_p=0.7, top_n_tokens=3)], [make_generator(0)])
    assert [t for t, _ in choice.top] == [0, 1]
    assert [round(math.exp(lp), 5) for _, lp in choice.top] == [0.625, 0.375]
    assert choice.token in (0, 1)
    assert choice.logprob == dict(choice.top)[choice.token]


def test_top_tokens_include_ties_with_the_last() -> None:
    """TGI's `batch_top_tokens`: tokens tied with the n-th are listed too, greedy or sampled."""
    logits = torch.tensor([[1.0, 3.0, 1.0, 1.0, 0.0]])
    [greedy] = choose(logits, [row(top_n_tokens=2)], [None])
    assert greedy.top[0][0] == 1
    assert sorted(t for t, _ in greedy.top[1:]) == [0, 2, 3]
    [sampled] = choose(logits, [row(do_sample=True, temperature=0.5, top_n_tokens=2)], [make_generator(1)])
    assert len(sampled.top) == 4
    [alone] = choose(logits, [row(top_n_tokens=1)], [None])
    assert alone.top == ((1, float(logits.log_softmax(-1)[0, 1])),)
