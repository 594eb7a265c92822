import torch

import tiny
from fixture_corpus import fixture_distribution
from jtc_lens.harness.corpora import get_corpus
from jtc_lens.harness.encoding import batches, encode_all
from jtc_lens.harness.engine import Engine, EvalRequest
from jtc_lens.harness.metrics import r2_per_item, r2_pooled, r2_weights, r2w_per_item
from jtc_lens.harness.models import build_lens_model
from jtc_lens.harness.protocols import ProtocolConfig, build_items
from jtc_lens.harness.squared_errors import SquaredErrors

DIST = fixture_distribution()


def test_errors_kept_on_disk_reduce_to_the_in_memory_sums():
    torch.manual_seed(0)
    N, L, d = 7, 3, 5
    in_memory = torch.zeros(N, L, d, dtype=torch.float64)
    with SquaredErrors(N, L, d) as errors:
        # item 2 has positions in two batches, item 6 none
        for owner in (torch.tensor([0, 0, 1, 2]), torch.tensor([2, 3, 3, 3, 4]), torch.tensor([5])):
            sq = torch.rand(L, len(owner), d) * 10
            errors.add(owner, sq)
            in_memory.index_add_(0, owner, sq.permute(1, 0, 2).double())
        var = torch.rand(d) + 0.1
        weighted = errors.weighted_sums(r2_weights(var))
        again = errors.weighted_sums(r2_weights(2 * var))  # a second read sees the same errors
    n = torch.tensor([2.0, 1, 2, 3, 1, 1, 1])
    torch.testing.assert_close(1 - weighted[..., 0] / n[:, None], r2_per_item(in_memory, n, var), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(1 - weighted[..., 1] / n[:, None], r2w_per_item(in_memory, n, var), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(again, weighted / 2, rtol=1e-6, atol=1e-9)
    assert weighted[6].abs().sum() == 0


def test_engine_r2_of_id_is_the_coefficient_of_determination_of_the_set():
    """Per-item r^2 and r2w of the logit lens, averaged over the set, against r^2 computed directly from the
    states (paper protocol: one position per item, so the item mean is the pooled value)."""
    lens = build_lens_model(*tiny.build("llama"))
    protocol = ProtocolConfig("paper", seed=5)
    items = build_items(get_corpus(DIST), "validation", protocol, limit=24)
    responses = Engine(lens, batch_size=5).run([EvalRequest("id", DIST, "validation", protocol, it) for it in items])
    encoded, skipped = encode_all(items, lens.tokenizer, protocol, lens.masked)
    assert not skipped
    states = []
    with torch.no_grad():
        for batch in batches(encoded, 5, lens.pad_id):
            states.append(lens.capture(batch.input_ids, batch.attention_mask, batch.rows, batch.cols).double())
    states = torch.cat(states, dim=1)  # (L+1, P, d)
    L = lens.num_layers
    for weighted, m in ((False, "r2"), (True, "r2w")):
        expected = r2_pooled(states[:L], states[L], weighted=weighted)
        got = torch.tensor([sum(r[f"{m}.L{l}"] for r in responses) / len(responses) for l in range(L)], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert float(expected[0]) < 0.9  # id at the embedding is far from the last state: the test can fail
