import numpy as np
import pytest
from tokenizers import Tokenizer

from data_prep import encode
from data_prep.encode import encode_texts, encoding_tokenizer

from .conftest import make_docs, reference_stream


@pytest.mark.parametrize("bos", [None, 2])
def test_texts_tokenized_in_slices_give_the_stream_of_one_document_at_a_time(tok, monkeypatch, bos):
    docs = [d for d in make_docs(80, seed=4) if d.strip()]
    expected, starts = reference_stream(tok, docs, bos_id=bos)
    enc = encoding_tokenizer(Tokenizer.from_str(tok.to_str()))  # a copy: `tok` is shared by the session
    for chars in (1, 50, 1 << 18):  # a slice per document, a few documents, all at once
        monkeypatch.setattr(encode, "ENCODE_CHARS", chars)
        tokens, lengths = encode_texts(enc, docs, 0, bos, "uint16")
        assert tokens.dtype == np.uint16 and tokens.tolist() == expected
        assert (np.cumsum(lengths) - lengths).tolist() == starts
    tokens, lengths = encode_texts(enc, [], 0, bos, "uint32")
    assert tokens.dtype == np.uint32 and len(tokens) == len(lengths) == 0
