"""The text prior's model (models/text_prior.py): the one vocabulary's sequences, the loss on the
generated span, constrained decoding, guidance against the empty caption, captioning."""
import numpy as np
import pytest
import torch

from vqtok.models.text_prior import IMAGE_FIRST, TEXT_FIRST, TextPrior, TextPriorConfig
from vqtok.models.vocabulary import Vocabulary

K, GRID, M = 8, (2, 3), 6


def _model(**kw) -> TextPrior:
    vocab = Vocabulary(text_vocab_size=256, text_tokenizer_id="bytes-utf8-v1", codebook_size=K, grid=GRID,
                       image_tokenizer_id="img", max_text_tokens=M)
    torch.manual_seed(0)
    return TextPrior(TextPriorConfig(vocabulary=vocab.to_dict(), n_layer=2, n_head=2, n_embd=32, **kw))


def _ids(text):
    return list(text.encode())


def test_rows_are_the_vocabularys_sequences_padded():
    model = _model()
    v = model.vocab
    tokens = np.arange(6).reshape(1, 2, 3)
    b = model.batch([_ids("hi")], tokens, TEXT_FIRST)
    row = b.seq[0].tolist()
    assert row == [v.pad] * (M - 2 + 1) + v.sequence(_ids("hi"), tokens[0].reshape(-1)).tolist()
    assert len(row) == M + 6 + 4 and b.image_at.tolist() == [M + 3]
    scored = b.weights[0].nonzero()[:, 0].tolist()  # predictions of the 6 image ids and <eoi>
    assert [row[p + 1] for p in scored] == [v.image_offset + c for c in range(6)] + [v.eoi]
    b = model.batch([_ids("hi")], tokens, IMAGE_FIRST)
    row = b.seq[0].tolist()
    assert row[: 2 + 6 + 1 + 2 + 1] == v.sequence(_ids("hi"), tokens[0].reshape(-1), IMAGE_FIRST).tolist()
    assert [row[p + 1] for p in b.weights[0].nonzero()[:, 0].tolist()] == _ids("hi") + [v.eot]


def test_long_captions_are_cut_and_counted_and_dropout_empties_them():
    model = _model()
    b = model.batch([_ids("a much longer caption"), None], np.zeros((2, 6)), TEXT_FIRST, drop=[False, False])
    assert (b.truncated, b.empty) == (1, 1)
    cut = b.seq[0, 2: 2 + M].tolist()  # one <pad>, <bos>, then the caption
    assert cut == _ids("a much longer caption")[:M]  # the first M ids, as the export cuts
    d = model.batch([_ids("hi")], np.zeros((1, 6)), TEXT_FIRST, drop=[True])
    assert d.empty == 1 and d.seq[0].tolist() == model.batch([None], np.zeros((1, 6))).seq[0].tolist()


def test_caption_dropout_empties_text_first_captions_in_training_only(monkeypatch):
    """caption_dropout p: about p of the text-first rows train with the empty caption (the branch
    guidance mixes against); image-first rows keep theirs (it is their target); eval drops none."""
    model = _model(caption_dropout=0.3)
    seen = []
    real = model.batch

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    monkeypatch.setattr(model, "batch", spy)
    n = 2000
    caps, grids = [_ids("hi")] * n, np.zeros((n, 6))
    model.train()
    model.loss(caps, grids, [TEXT_FIRST, IMAGE_FIRST] * (n // 2), generator=torch.Generator().manual_seed(0))
    rows = seen[-1].seq
    emptied = (rows[:, M + 1] == model.vocab.bos).tolist()  # <bos> right before <boi>: no caption ids between
    assert 0.25 < np.mean(emptied[0::2]) < 0.35
    assert not any(emptied[1::2]) and seen[-1].empty == sum(emptied)
    model.eval()
    model.loss(caps, grids, TEXT_FIRST)
    assert seen[-1].empty == 0


def test_text_loss_weight_scores_the_caption():
    v = _model().vocab
    model = _model(text_loss_weight=0.5)
    b = model.batch([_ids("hi")], np.zeros((1, 6)), TEXT_FIRST)
    w = b.weights[0]
    assert sorted(set(w.tolist())) == [0.0, 0.5, 1.0]
    assert [b.seq[0, p + 1].item() for p in (w == 0.5).nonzero()[:, 0].tolist()] == _ids("hi")
    assert v.bos in b.seq[0].tolist()


def test_generation_draws_only_image_ids_and_the_cache_changes_nothing():
    model = _model().eval()
    caps = [_ids("red"), _ids("blue"), None]
    g1 = model.generate(caps, cfg_scale=2.0, generator=torch.Generator().manual_seed(1))
    g2 = model.generate(caps, cfg_scale=2.0, generator=torch.Generator().manual_seed(1), use_cache=False)
    assert g1.shape == (3, 2, 3) and g1.min() >= 0 and g1.max() < K
    assert torch.equal(g1, g2)


def test_guidance_mixes_against_the_empty_caption(monkeypatch):
    """cfg_scale s: uncond + s (cond - uncond), the unconditional branch being the empty caption's prefix."""
    model = _model().eval()
    seen = []
    real = model._decode

    def spy(prefix, *a, **k):
        seen.append(prefix.clone())
        return real(prefix, *a, **k)

    monkeypatch.setattr(model, "_decode", spy)
    model.generate([_ids("hi")], cfg_scale=3.0)
    empty = model.batch([None], np.zeros((1, 6))).seq[0, : M + 3]
    assert torch.equal(seen[0][1], empty) and not torch.equal(seen[0][0], empty)
    model.generate([_ids("hi")], cfg_scale=3.0, negative_ids=[_ids("no")])
    assert torch.equal(seen[1][1], model.batch([_ids("no")], np.zeros((1, 6))).seq[0, : M + 3])


def _fit(model, captions, grids, orders, steps=300):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model.loss(captions, grids, orders)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_a_small_model_learns_text_to_image_and_back():
    """Two captions, two grids: the model learns which grid each caption means (text-first) and
    which caption each grid has (image-first), with guidance and greedy captions."""
    model = _model(caption_dropout=0.2)
    grids = np.array([[0, 1, 2, 3, 4, 5], [7, 7, 6, 6, 5, 5]])
    caps = [_ids("up"), _ids("down")]
    captions = caps * 2
    _fit(model, captions, np.concatenate([grids, grids]), [TEXT_FIRST] * 2 + [IMAGE_FIRST] * 2)
    g = model.generate(caps, cfg_scale=2.0, top_k=1)
    assert g.reshape(2, -1).tolist() == grids.tolist()
    assert model.caption(grids) == caps
    with_caption = model.image_nats(caps, grids).sum()
    without = model.image_nats([None, None], grids).sum()
    assert with_caption < without  # the caption carries information about the image


def test_the_bundle_round_trips_with_its_text_tokenizer(tmp_path, bundle):
    """Prior.load gives back a text prior (kind "text"), its text tokenizer inside; a BPE's file id
    survives, and samples from prompts decode through the image tokenizer."""
    from vqtok.models.prior import Prior
    from vqtok.models.text_tokenizer import TextTokenizer, train_bpe
    from vqtok.models.tokenizer import Tokenizer

    tok = Tokenizer.load(bundle)
    bpe = TextTokenizer.from_hf(train_bpe(["a dark shirt", "a light boot", "a bag"] * 20, 300))
    for text in (TextTokenizer.load("bytes"), bpe):
        vocab = Vocabulary(text_vocab_size=text.vocab_size, text_tokenizer_id=text.id,
                           codebook_size=tok.config.codebook_size, grid=tok.grid, image_tokenizer_id=tok.id,
                           max_text_tokens=16)
        model = TextPrior(TextPriorConfig(vocabulary=vocab.to_dict(), n_layer=1, n_head=2, n_embd=16, orders="both"), text)
        model.save(tmp_path / text.kind, tokenizer_path=str(bundle))
        back = Prior.load(tmp_path / text.kind)
        assert isinstance(back, TextPrior) and back.text.id == text.id and back.vocab == vocab
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
        s = back.sample(["a dark shirt", "a bag"], n=2, seed=0)
        assert s.prompts == ["a dark shirt"] * 2 + ["a bag"] * 2 and s.images.shape[0] == 4
        assert torch.equal(s.images, tok.decode(s.tokens))
        assert torch.equal(back.sample(["a dark shirt", "a bag"], n=2, seed=0).tokens, s.tokens)  # seeded
        assert len(back.captions(s.tokens, seed=0)) == 4
    with pytest.raises(ValueError, match="not this prior's"):
        TextPrior(back.cfg, TextTokenizer.load("bytes"))


def test_guided_logits_are_uncond_plus_scale_times_the_difference(monkeypatch):
    """The logits sampled from at the first image position are uncond + s (cond - uncond) on the
    image ids (and -inf elsewhere), computed here by hand from the two prefixes."""
    import vqtok.models.text_prior as tp

    model = _model().eval()
    v = model.vocab
    at = model.image_start[TEXT_FIRST]
    cond = model.batch([_ids("red")], np.zeros((1, 6))).seq[:, :at]
    uncond = model.batch([None], np.zeros((1, 6))).seq[:, :at]
    with torch.no_grad():
        lc, lu = model(cond, image_at=at)[:, -1], model(uncond, image_at=at)[:, -1]
    seen = []

    def first_logits(logits, *a):
        seen.append(logits.clone())
        return logits.argmax(-1)

    monkeypatch.setattr(tp, "sample_next", first_logits)
    for s in (1.0, 3.0, 7.0):
        seen.clear()
        model.generate([_ids("red")], cfg_scale=s)
        got = seen[0][0]
        want = (lu + s * (lc - lu))[0]
        img = slice(v.image_offset, v.image_offset + K)
        assert torch.allclose(got[img], want[img], atol=1e-5)
        assert torch.isinf(got[: v.image_offset]).all()
