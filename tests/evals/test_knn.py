"""Chunked weighted k-NN equals the brute-force computation; accuracy on separable data."""

import pytest
import torch

from opera.errors import OperaError
from opera.evals.knn import knn_accuracy, knn_scores, knn_scores_bruteforce


@pytest.mark.parametrize("query_chunk,bank_chunk,k", [(7, 13, 5), (64, 500, 20), (3, 4, 20), (1000, 1000, 200), (5, 33, 1)])
def test_chunked_equals_bruteforce(query_chunk, bank_chunk, k):
    g = torch.Generator().manual_seed(k + query_chunk)
    bank = torch.randn(157, 24, generator=g) * 3
    labels = torch.randint(0, 6, (157,), generator=g)
    queries = torch.randn(41, 24, generator=g)
    ref = knn_scores_bruteforce(bank, labels, queries, 6, k=k, temperature=0.07)
    got = knn_scores(bank, labels, queries, 6, k=k, temperature=0.07, query_chunk=query_chunk, bank_chunk=bank_chunk)
    assert got.shape == (41, 6)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # the bank streamed block by block from the CPU and a float16 bank give the same neighbours
    streamed = knn_scores(bank, labels, queries, 6, k=k, query_chunk=query_chunk, bank_chunk=bank_chunk, bank_on_device=False)
    torch.testing.assert_close(streamed, ref, rtol=1e-5, atol=1e-6)


def test_votes_are_temperature_weighted_similarities():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.2]])
    scores = knn_scores(bank, labels, q, 2, k=2, temperature=0.5)
    sims = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    top = sims[0].topk(2)
    expected = torch.zeros(2)
    for s, i in zip(top.values, top.indices):
        expected[labels[i]] += torch.exp(s / 0.5)
    torch.testing.assert_close(scores[0], expected)


def test_separable_clusters_are_classified_perfectly():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 10
    bank_y = torch.arange(4).repeat(50)
    bank = centers[bank_y] + torch.randn(200, 16, generator=g)
    q_y = torch.arange(4).repeat(10)
    q = centers[q_y] + torch.randn(40, 16, generator=g)
    acc = knn_accuracy(bank, bank_y, q, q_y, 4, k=20, query_chunk=16, bank_chunk=64)
    assert acc["top1"] == 100.0 and acc["top5"] == 100.0


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(OperaError, match="k must be at least 1"):
        knn_scores(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 3), 2, k=0)
    with pytest.raises(OperaError, match="feature sizes differ"):
        knn_scores(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), torch.randn(2, 4), 2)
