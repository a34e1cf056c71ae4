"""Document masking: in a packed sequence a document attends only to itself."""

import torch

from conftest import random_model
from llama31 import document_mask

BOS = 128000


def test_document_mask_is_causal_within_documents_only():
    tokens = torch.tensor([[BOS, 5, 6, BOS, 7, 8, 9]])
    got = document_mask(tokens, BOS)[0, 0].int().tolist()
    want = [[1 if j <= i and (i < 3) == (j < 3) else 0 for j in range(7)] for i in range(7)]
    assert got == want


def test_packed_document_scores_as_it_would_alone():
    model = random_model(max_seq_len=64)
    torch.manual_seed(1)
    doc_a = [BOS] + torch.randint(0, 128000, (9,)).tolist()
    doc_b = [BOS] + torch.randint(0, 128000, (12,)).tolist()
    packed = torch.tensor([doc_a + doc_b])
    inputs, targets = packed[:, :-1], packed[:, 1:]
    alone = model.forward_inference(torch.tensor([doc_b]))[0]
    with torch.no_grad():
        h = model.trunk(packed, 0, document_mask(packed, BOS))
        masked = model.output(h).float()[0, len(doc_a):]
        unmasked = model.output(model.trunk(packed)).float()[0, len(doc_a):]
    assert torch.allclose(masked, alone, atol=1e-4)
    assert not torch.allclose(unmasked, alone, atol=1e-2)  # without the mask doc B sees doc A
    # and the loss path takes the same mask
    loss_masked = model.forward_loss(inputs, targets, mask=document_mask(inputs, BOS))
    loss_plain = model.forward_loss(inputs, targets)
    assert loss_masked.item() != loss_plain.item()
