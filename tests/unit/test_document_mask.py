"""Document masking: a packed sequence with the mask computes, for every document, exactly what
that document computes alone (positions restart, no attention across documents)."""

from __future__ import annotations

import torch

from models.gpt import GPT, GPTConfig, document_ids, document_mask, document_positions

EOS = 0


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)).eval()


def _packed(lengths: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    docs = [
        torch.cat([torch.randint(1, 64, (n - 1,), generator=g), torch.tensor([EOS])])
        for n in lengths
    ]
    return torch.cat(docs)[None], docs


def test_ids_positions_and_mask():
    x = torch.tensor([[5, 6, EOS, 7, EOS, 8, 9]])
    doc = document_ids(x, EOS)
    assert doc.tolist() == [[0, 0, 0, 1, 1, 2, 2]]  # an EOS ends its own document
    assert document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    m = document_mask(doc)[0, 0]
    assert m[4].tolist() == [False, False, False, True, True, False, False]
    assert m[3, 4].item() is False  # causal inside a document


@torch.no_grad()
def test_packed_with_mask_equals_each_document_alone():
    model = _model()
    x, docs = _packed([5, 9, 3, 12, 3])
    doc = document_ids(x, EOS)
    logits = model(x, positions=document_positions(doc), attn_mask=document_mask(doc))
    start = 0
    for d in docs:
        alone = model(d[None])
        torch.testing.assert_close(logits[:, start : start + len(d)], alone, rtol=1e-5, atol=1e-5)
        start += len(d)
    # losses of the in-document targets, packed vs one by one
    ce = torch.nn.functional.cross_entropy
    keep = doc[0, 1:] == doc[0, :-1]  # target in the same document
    packed = ce(logits[0, :-1][keep], x[0, 1:][keep], reduction="sum")
    alone = sum(ce(model(d[None])[0, :-1], d[1:], reduction="sum") for d in docs)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # control: without the mask the later documents see the earlier ones
    plain = model(x)
    assert (plain[:, 5:14] - model(docs[1][None])).abs().max() > 1e-3
