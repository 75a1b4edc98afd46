"""The batched device sampler on CPU tensors, against the eager sampler (`sampling.sampler.choose`): equal
greedy choices, log-probs, penalties, masks, warped distributions and top-n ties; draws that follow the
warped distribution and do not depend on the batch; the slot lifecycle."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import replace

import pytest
import torch

from llm_serving.sampling.device import TIE_SLACK, DeviceSampler, sample_rows, splitmix64, top_ids, uniforms
from llm_serving.sampling.logits import RowContext, candidates, penalize, warp
from llm_serving.sampling.masks import RowMasks
from llm_serving.sampling.params import FrequencyRule, SamplingParams
from llm_serving.sampling.sampler import Choice, choose, make_generator

CPU = torch.device("cpu")
U64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """The reference: Vigna's splitmix64 `next()` from state `x`, on Python ints."""
    x = (x + 0x9E3779B97F4A7C15) & U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & U64
    return x ^ (x >> 31)


def _int64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _sorted_top(choice: Choice) -> list[tuple[int, float]]:
    """Top tokens in a canonical order (the order among equal log-probs is arbitrary in `choose`)."""
    return sorted(choice.top, key=lambda t: (-t[1], t[0]))


def _random_ids(rng: random.Random, vocab: int, least: int, most: int) -> tuple[int, ...]:
    return tuple(rng.randrange(vocab) for _ in range(rng.randint(least, most)))


def _masks(rows: Sequence[int], vocab: int, seed: int) -> RowMasks:
    """Random allowed-token masks of `rows`, each allowing at least token `row`."""
    words = (vocab + 31) // 32
    bits = torch.randint(
        -(2**31), 2**31, (len(rows), words), dtype=torch.int32, generator=torch.manual_seed(seed)
    )
    for j, r in enumerate(rows):
        bits[j, r // 32] |= 1 << (r % 32)
    return RowMasks(rows=tuple(rows), bits=bits)


def _admitted(rows: Sequence[RowContext], vocab: int, slots: Sequence[int] | None = None) -> DeviceSampler:
    chosen = list(range(len(rows))) if slots is None else list(slots)
    sampler = DeviceSampler(max(chosen) + 1, vocab, CPU)
    for slot, row in zip(chosen, rows, strict=True):
        sampler.admit(slot, row.params, row.prompt_ids, row.output_ids)
    return sampler


def test_uniforms_are_splitmix64_of_seed_and_position() -> None:
    assert _splitmix64(0) == 0xE220A8397B1DCDAF  # splitmix64's published first output from state 0
    seeds = [0, 1, 42, 2**63 - 1, 2**63, U64, 12345678901234567890]
    positions = [0, 1, 7, 2**40, 3, 1000, 5]
    mixed = splitmix64(torch.tensor([_int64(s) for s in seeds]))
    assert mixed.tolist() == [_int64(_splitmix64(s)) for s in seeds]
    got = uniforms(torch.tensor([_int64(s) for s in seeds]), torch.tensor(positions))
    want = [
        (_splitmix64((_splitmix64(s) + p) & U64) >> 40) / 2**24 for s, p in zip(seeds, positions, strict=True)
    ]
    assert got.dtype == torch.float32
    assert got.tolist() == want


def test_uniforms_cover_the_unit_interval_evenly() -> None:
    u = uniforms(torch.arange(50_000), torch.zeros(50_000, dtype=torch.long))
    assert float(u.min()) >= 0.0
    assert float(u.max()) < 1.0
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    assert all(abs(c - 5000) < 5 * math.sqrt(5000) for c in counts.tolist())


def test_top_ids_breaks_ties_by_lowest_id() -> None:
    x = torch.tensor(
        [[1.0, 3.0, -0.0, 3.0, 0.0, -2.0, 3.0, 0.0], [-1.0, -1.0, -5.0, float("-inf"), -1.0, 2, 2, 0]]
    )
    assert top_ids(x, 5).tolist() == [[1, 3, 6, 0, 2], [5, 6, 7, 0, 1]]
    assert top_ids(x, 5).tolist() == x.sort(dim=-1, descending=True, stable=True).indices[:, :5].tolist()


def _penalized_rows(vocab: int, seed: int) -> list[RowContext]:
    rng = random.Random(seed)
    rows = []
    for i in range(10):
        params = SamplingParams(
            do_sample=i % 3 == 2,
            seed=i,
            top_k=(0, 7, 40)[i % 3],
            top_p=(1.0, 0.8)[i % 2],
            repetition_penalty=(1.0, 1.5, 0.7, 1.0)[i % 4],
            frequency_penalty=(0.0, 0.5, -1.0)[i % 3] if i != 5 else 0.0,
            frequency_rule=(FrequencyRule.TGI, FrequencyRule.OPENAI)[(i // 2) % 2],
            top_n_tokens=(0, 1, 3, 5)[i % 4],
        )
        rows.append(RowContext(params, _random_ids(rng, vocab, 1, 20), _random_ids(rng, vocab, 0, 20)))
    return rows


def test_greedy_rows_choose_what_choose_chooses() -> None:
    """Penalties (both frequency rules), masks and top-n on greedy rows, with sampled rows in the batch."""
    vocab = 257
    for seed in range(4):
        rows = _penalized_rows(vocab, seed)
        logits = torch.randn(len(rows), vocab, generator=torch.manual_seed(seed)) * 3
        masks = _masks([1, 4, 6, 8], vocab, seed)
        want = choose(logits, rows, [make_generator(r.params.seed) for r in rows], masks)
        got = _admitted(rows, vocab).sample(logits, range(len(rows)), masks)
        for row, g, w in zip(rows, got, want, strict=True):
            if not row.params.do_sample:
                assert (g.token, g.logprob) == (w.token, w.logprob)
            assert _sorted_top(g) == _sorted_top(w)
        for j in masks.allowed(vocab).logical_not().nonzero().tolist():
            assert got[masks.rows[j[0]]].token != j[1]


def test_processed_distributions_equal_penalize_and_warp() -> None:
    vocab = 300
    for seed, top_k in [(0, 0), (1, 12), (2, 50)]:
        rng = random.Random(seed)
        rows = []
        for i in range(8):
            params = SamplingParams(
                do_sample=i != 3,
                seed=i,
                temperature=(1.0, 0.7, 1.6)[i % 3],
                top_k=(top_k, 5, 20)[i % 3] if top_k else 0,  # 0: the whole vocabulary is sorted
                top_p=(1.0, 0.9, 0.5)[i % 3],
                typical_p=(1.0, 0.8)[(i // 2) % 2],
                repetition_penalty=(1.0, 1.3)[i % 2],
                frequency_penalty=(0.0, 0.4)[(i // 3) % 2],
            )
            rows.append(RowContext(params, _random_ids(rng, vocab, 1, 30), _random_ids(rng, vocab, 0, 10)))
        logits = torch.randn(len(rows), vocab, generator=torch.manual_seed(seed)) * 2
        masks = _masks([0, 5], vocab, seed)
        scores = penalize(logits, rows)
        masks.apply(scores)
        dist = _admitted(rows, vocab).distributions(logits, range(len(rows)), masks)
        assert torch.equal(dist.logprobs, scores.log_softmax(dim=-1))
        sampled = [i for i, r in enumerate(rows) if r.params.do_sample]
        warpers = [rows[i].params for i in sampled]
        values, ids = candidates(scores[sampled], warpers)
        assert dist.warped is not None
        assert dist.ids is not None
        assert dist.warped.shape[1] == (vocab if top_k == 0 else max(top_k, 20))
        warped = warp(values, warpers).log_softmax(dim=-1)
        assert torch.equal(dist.warped[sampled], warped)
        kept = warped.isfinite()  # masked tokens (-inf) are tied: their order does not matter
        assert torch.equal(dist.ids[sampled][kept], ids[kept])


def test_warpers_leave_the_rows_that_do_not_ask_alone() -> None:
    """A row at top-p / typical-p 1 next to rows that warp: its tail survives, even where the float32 mass
    before it rounds to 1."""
    vocab = 64
    logits = torch.full((3, vocab), -15.0)
    logits[:, 0] = 10.0
    logits[:, 1:4] = torch.tensor([2.0, 1.0, 0.5])
    rows = [
        RowContext(SamplingParams(do_sample=True, seed=1), (1,), ()),
        RowContext(SamplingParams(do_sample=True, seed=2, top_p=0.5), (1,), ()),
        RowContext(SamplingParams(do_sample=True, seed=3, typical_p=0.5), (1,), ()),
    ]
    dist = _admitted(rows, vocab).distributions(logits, range(3))
    params = [r.params for r in rows]
    values, _ = candidates(penalize(logits, rows), params)
    assert dist.warped is not None
    assert torch.equal(dist.warped, warp(values, params).log_softmax(dim=-1))
    assert bool(dist.warped[0].isfinite().all())


def _chi_square_bound(df: int) -> float:
    """The chi-square value exceeded with probability 1e-4 (Wilson-Hilferty; z = 3.719)."""
    return df * (1 - 2 / (9 * df) + 3.719 * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(do_sample=True, temperature=0.7, top_k=8, top_p=0.9),
        SamplingParams(do_sample=True, temperature=1.3),
        SamplingParams(do_sample=True, typical_p=0.6, repetition_penalty=1.4),
    ],
)
def test_draws_follow_the_warped_distribution(params: SamplingParams) -> None:
    """20000 seeds of one row in one batch: token frequencies against the processed distribution."""
    vocab, draws = 16, 20_000
    logits = torch.randn(1, vocab, generator=torch.manual_seed(3)) * 1.5
    prompt = (2, 3, 3)
    [probs] = penalize(logits, [RowContext(params, prompt, ())])
    values, ids = candidates(probs.unsqueeze(0), [params])
    expected = torch.zeros(vocab).index_put_((ids[0],), warp(values, [params]).softmax(dim=-1)[0])
    sampler = DeviceSampler(draws, vocab, CPU)
    for seed in range(draws):
        sampler.admit(seed, replace(params, seed=seed), prompt)
    got = sampler.launch(logits.expand(draws, vocab), range(draws)).tokens
    counts = torch.bincount(got, minlength=vocab).double()
    possible = expected > 0
    assert counts[~possible].sum() == 0
    assert int(possible.sum()) > 2
    chi2 = float(((counts - draws * expected) ** 2 / (draws * expected))[possible].sum())
    assert chi2 < _chi_square_bound(int(possible.sum()) - 1)


def test_draws_of_one_seed_over_positions_follow_the_distribution() -> None:
    vocab, draws = 8, 3000
    params = SamplingParams(do_sample=True, seed=123, temperature=0.9)
    logits = torch.randn(1, vocab, generator=torch.manual_seed(4))
    expected = (logits[0] / 0.9).softmax(dim=-1).double()
    sampler = DeviceSampler(1, vocab, CPU)
    sampler.admit(0, params, (1,))
    tokens = [sampler.launch(logits, [0]).tokens for _ in range(draws)]
    counts = torch.bincount(torch.cat(tokens), minlength=vocab).double()
    chi2 = float(((counts - draws * expected) ** 2 / (draws * expected)).sum())
    assert chi2 < _chi_square_bound(vocab - 1)


def _tied_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Logits on a coarse grid (as a low-precision model's, only more so): many exact ties."""
    return (torch.randn(rows, vocab, generator=torch.manual_seed(seed)) * 8).round() / 4


TARGET = SamplingParams(
    do_sample=True,
    seed=2**64 - 5,
    temperature=0.8,
    top_k=20,
    top_p=0.9,
    repetition_penalty=1.2,
    top_n_tokens=2,
)
OTHERS = [
    SamplingParams(),
    SamplingParams(do_sample=True, seed=1, top_k=5),
    SamplingParams(do_sample=True, seed=2),  # no top-k: the whole vocabulary is sorted
    SamplingParams(do_sample=True, seed=3, typical_p=0.7, top_n_tokens=4),
    SamplingParams(frequency_penalty=1.0, frequency_rule=FrequencyRule.OPENAI, top_n_tokens=1),
    SamplingParams(do_sample=True, seed=4, temperature=1e-40),
    SamplingParams(do_sample=True, seed=5, top_k=100, top_p=0.5),
]


DEVICES = [
    CPU,
    pytest.param(
        torch.device("cuda"), marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_draws_do_not_depend_on_the_batch(device: torch.device) -> None:
    """The same request, alone and at a shuffled place among 2 or 7 others (other slots too): same choices."""
    vocab, steps = 500, 24
    target_logits = _tied_logits(steps, vocab, 0)

    def run(batch: int, seed: int) -> list[Choice]:
        rng = random.Random(seed)
        others = rng.sample(OTHERS, batch - 1)
        slots = rng.sample(range(16), batch)
        sampler = DeviceSampler(16, vocab, device)
        for slot, params in zip(slots, [TARGET, *others], strict=True):
            sampler.admit(slot, params, (1, 2, 3, 2))
        out = []
        for step in range(steps):
            order = rng.sample(range(batch), batch)
            logits = _tied_logits(batch, vocab, 100 + seed * steps + step)
            logits[order.index(0)] = target_logits[step]
            choices = sampler.sample(logits.to(device), [slots[i] for i in order])
            out.append(choices[order.index(0)])
        return out

    alone = run(1, 0)
    assert len({c.token for c in alone}) > 3
    for batch, seed in [(1, 1), (3, 2), (3, 3), (8, 4), (8, 5)]:
        assert run(batch, seed) == alone


def test_top_n_lists_every_token_tied_with_the_nth() -> None:
    vocab = 64
    logits = torch.full((4, vocab), -3.0)
    logits[0, [5, 9, 2]] = 2.0
    logits[0, [7, 8]] = 1.0
    logits[1, [1, 3, 4, 6]] = 1.5
    logits[2, : 3 * TIE_SLACK] = 0.5  # more tokens tied with the first than the copied window holds
    logits[3, [10, 11]] = 4.0
    rows = [
        RowContext(SamplingParams(top_n_tokens=1), (), ()),
        RowContext(SamplingParams(do_sample=True, seed=1, top_k=10, top_n_tokens=2), (), ()),
        RowContext(SamplingParams(do_sample=True, seed=2, top_n_tokens=1), (), ()),
        RowContext(SamplingParams(top_n_tokens=3), (), ()),
    ]
    want = choose(logits, rows, [make_generator(r.params.seed) for r in rows])
    got = _admitted(rows, vocab).sample(logits, range(4))
    assert [len(c.top) for c in got] == [3, 4, 3 * TIE_SLACK, vocab]
    for g, w in zip(got, want, strict=True):
        assert _sorted_top(g) == _sorted_top(w)
    assert got[0].token == 2  # ties: the lowest id
    assert want[0].token in (2, 5, 9)


def test_greedy_rows_mixed_with_sampled_rows_are_as_alone() -> None:
    vocab = 200
    logits = torch.randn(6, vocab, generator=torch.manual_seed(7))
    rows = [
        RowContext(SamplingParams(top_n_tokens=2), (1, 2), ()),
        RowContext(SamplingParams(do_sample=True, seed=9, top_p=0.8), (), ()),
        RowContext(SamplingParams(do_sample=False, temperature=0.5, top_k=3), (4,), ()),  # warpers ignored
        RowContext(SamplingParams(do_sample=True, seed=3, temperature=1e-40, top_n_tokens=3), (), ()),
        RowContext(SamplingParams(repetition_penalty=3.0), (int(logits[4].argmax()),), ()),
        RowContext(SamplingParams(do_sample=True, seed=4, top_k=1), (), ()),
    ]
    together = _admitted(rows, vocab).sample(logits, range(6))
    for i, row in enumerate(rows):
        [alone] = _admitted([row], vocab).sample(logits[i : i + 1], [0])
        assert together[i] == alone
    assert together[0].token == int(logits[0].argmax())
    assert together[2].token == int(logits[2].argmax())
    assert together[4].token != int(logits[4].argmax())
    assert (together[3].token, together[3].logprob) == (int(logits[3].argmax()), 0.0)
    assert together[5].token == int(logits[5].argmax())
    assert together[3].top == ((int(logits[3].argmax()), 0.0),)


def test_slot_counts_follow_admit_append_and_release() -> None:
    vocab = 40
    params = SamplingParams(do_sample=True, seed=11, repetition_penalty=1.8, frequency_penalty=0.6)
    prompt = (1, 2, 2, 30)
    logits = torch.randn(8, vocab, generator=torch.manual_seed(1)) * 2
    sampler = DeviceSampler(3, vocab, CPU)
    sampler.admit(1, params, prompt)
    output: list[int] = []
    for step in range(4):
        row = RowContext(params, prompt, tuple(output))
        want = penalize(logits[step : step + 1], [row]).log_softmax(dim=-1)
        assert torch.equal(sampler.distributions(logits[step : step + 1], [1]).logprobs, want)
        output.append(sampler.sample(logits[step : step + 1], [1])[0].token)

    # The slot goes to another request: nothing of the first one is left in its counts.
    other = SamplingParams(frequency_penalty=2.0, frequency_rule=FrequencyRule.OPENAI, repetition_penalty=1.1)
    sampler.release(1)
    sampler.admit(1, other, (5,), (7, 7))
    want = penalize(logits[:1], [RowContext(other, (5,), (7, 7))]).log_softmax(dim=-1)
    assert torch.equal(sampler.distributions(logits[:1], [1]).logprobs, want)
    with pytest.raises(KeyError):
        sampler.sample(logits[:1], [0])
    with pytest.raises(ValueError, match="40"):
        sampler.sample(logits[:1, :32], [1])

    # Preempted after 4 tokens, re-admitted elsewhere with them: the draws go on as if never stopped.
    sampler.admit(2, params, prompt, output)
    later = [sampler.sample(logits[s : s + 1], [2])[0].token for s in range(4, 8)]
    straight = DeviceSampler(1, vocab, CPU)
    straight.admit(0, params, prompt)
    assert [straight.sample(logits[s : s + 1], [0])[0].token for s in range(8)] == output + later

    # A token chosen elsewhere counts through `append`.
    greedy = SamplingParams(repetition_penalty=1e9)
    sampler.admit(0, greedy, ())
    top = int(logits[0].argmax())
    sampler.append([0], torch.tensor([top]))
    assert sampler.sample(logits[:1], [0])[0].token != top


def test_watermark_rows_go_to_the_eager_sampler() -> None:
    vocab = 128
    logits = torch.randn(4, vocab, generator=torch.manual_seed(5))
    rows = [
        RowContext(SamplingParams(do_sample=True, seed=1, top_k=10), (3,), ()),
        RowContext(SamplingParams(do_sample=True, seed=2, watermark=True, top_n_tokens=2), (3, 4), ()),
        RowContext(SamplingParams(top_n_tokens=1), (3,), ()),
        RowContext(SamplingParams(watermark=True), (9,), (1,)),
    ]
    assert not DeviceSampler.supports(rows[1].params)
    sampler = DeviceSampler(4, vocab, CPU)
    with pytest.raises(ValueError, match="watermark"):
        sampler.admit(0, rows[1].params, (3, 4))
    sampler.admit(0, rows[0].params, (3,))
    sampler.admit(2, rows[2].params, (3,))
    masks = _masks([2, 3], vocab, 0)
    generators = [make_generator(r.params.seed) for r in rows]
    got = sample_rows(sampler, logits, rows, [0, None, 2, None], generators, masks)

    eager_masks = RowMasks(rows=(1,), bits=masks.bits[1:])
    want_eager = choose(logits[[1, 3]], [rows[1], rows[3]], [make_generator(2), None], eager_masks)
    assert [got[1], got[3]] == want_eager
    device = DeviceSampler(4, vocab, CPU)
    device.admit(0, rows[0].params, (3,))
    device.admit(2, rows[2].params, (3,))
    assert [got[0], got[2]] == device.sample(logits[[0, 2]], [0, 2], RowMasks(rows=(1,), bits=masks.bits[:1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares CPU with CUDA")
def test_cuda_draws_equal_cpu_draws() -> None:
    vocab = 1000
    cuda = torch.device("cuda")
    seeds = torch.tensor([_int64(s) for s in (0, 7, 2**63, U64)])
    positions = torch.tensor([0, 5, 9, 2**33])
    assert torch.equal(uniforms(seeds, positions), uniforms(seeds.to(cuda), positions.to(cuda)).cpu())
    rows = [RowContext(p, (1, 2, 3), ()) for p in [TARGET, *OTHERS]]
    on_cpu = _admitted(rows, vocab)
    on_gpu = DeviceSampler(len(rows), vocab, cuda)
    for slot, row in enumerate(rows):
        on_gpu.admit(slot, row.params, row.prompt_ids)
    for step in range(8):
        logits = torch.randn(len(rows), vocab, generator=torch.manual_seed(step)) * 2
        want = on_cpu.sample(logits, range(len(rows)))
        got = on_gpu.sample(logits.to(cuda), range(len(rows)))
        assert [c.token for c in got] == [c.token for c in want]
        for g, w in zip(got, want, strict=True):
            assert math.isclose(g.logprob, w.logprob, rel_tol=1e-4, abs_tol=1e-5)
