import json

import pytest
from tokenizers import Tokenizer, models

from data_prep.errors import DataPrepError
from data_prep.tokenizer import load_tokenizer, train_tokenizer

from .conftest import make_docs, write_jsonl


def test_trained_tokenizer_reserves_special_tokens_round_trips_and_is_deterministic(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(200))
    info = train_tokenizer([str(corpus)], 350, str(tmp_path / "a.json"), progress=False)
    again = train_tokenizer([str(corpus)], 350, str(tmp_path / "b.json"), progress=False)
    assert info.sha256 == again.sha256
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()

    tok = Tokenizer.from_file(str(tmp_path / "a.json"))
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|mask|>") == 1
    assert info.eos_id == 0 and info.vocab_size == tok.get_vocab_size() == 350
    for text in ["Hello, wörld — ça va?\n\tTabs  and  spaces 123", "ñu kaloé", "漢字 and emoji 🎉"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
    # The special tokens are single tokens, never split.
    assert tok.encode("a<|mask|>b", add_special_tokens=False).tokens[1] == "<|mask|>"


def test_train_reads_txt_with_doc_sep_and_rejects_tiny_vocab(tmp_path):
    (tmp_path / "x.txt").write_text("\n\n".join(make_docs(50)), encoding="utf-8")
    info = train_tokenizer(
        [str(tmp_path / "x.txt")], 300, str(tmp_path / "t.json"), doc_sep="\n\n", progress=False
    )
    assert info.vocab_size == 300
    with pytest.raises(DataPrepError, match="--vocab-size 100 is too small"):
        train_tokenizer([str(tmp_path / "x.txt")], 100, str(tmp_path / "u.json"), progress=False)


def test_model_folder_config_names_eos_and_bos(tmp_path, tokenizer_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|mask|>"}, "bos_token": "<s>"}), encoding="utf-8"
    )
    _, info = load_tokenizer(str(folder), bos=True)
    assert (info.eos_token, info.eos_id) == ("<|mask|>", 1)
    assert info.bos_token == "<s>" and info.bos_id == 2
    # --eos-token wins over the folder's config; a bare file falls back to well-known names.
    assert load_tokenizer(str(folder), eos_token="<s>")[1].eos_id == 2
    assert load_tokenizer(str(tokenizer_path))[1].eos_token == "<|endoftext|>"


def test_tokenizer_errors_are_clear(tmp_path):
    with pytest.raises(DataPrepError, match="tokenizer file or folder not found: .*missing.json"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataPrepError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
    no_eos = tmp_path / "noeos.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(no_eos))
    with pytest.raises(DataPrepError, match="has no EOS token.*--eos-token"):
        load_tokenizer(str(no_eos))
    with pytest.raises(DataPrepError, match="--eos-token 'zzz' is not in the vocabulary"):
        load_tokenizer(str(no_eos), eos_token="zzz")
    with pytest.raises(DataPrepError, match="no BOS token"):
        load_tokenizer(str(no_eos), eos_token="a", bos=True)
