"""Convert's arguments are checked when made, each error naming its flag."""

import pytest

from data_prep.convert_args import ConvertArgs, parse_size, resolve_dtype
from data_prep.errors import DataPrepError


def test_parse_size_accepts_bytes_and_units():
    assert parse_size(1000) == 1000 and parse_size("64mb") == 64 << 20 and parse_size("1.5kb") == 1536
    with pytest.raises(DataPrepError):
        parse_size("5gb")  # over the 4 GiB MDS offset limit


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(dtype="int8"), r"--dtype 'int8': expected auto, uint16 or uint32"),
        (dict(compression="gzip"), r"--compression 'gzip': expected zstd or none"),
        (dict(workers=0), r"--workers 0: must be at least 1"),
        (dict(docs_per_part=0), r"--docs-per-part 0: must be at least 1"),
        (dict(max_docs=0), r"--max-docs 0: must be at least 1"),
    ],
)
def test_bad_values_are_refused_by_flag(change, message):
    with pytest.raises(DataPrepError, match=message):
        ConvertArgs(["a.jsonl"], "out", "tok.json", 8, **change)


def test_parsed_fields_and_all_cores_by_default():
    args = ConvertArgs(["a.jsonl"], "out", "tok.json", 8, slice="1/4")
    assert args.size_limit == 64 << 20 and args.slice_ix == (1, 4) and args.workers >= 1


def test_dtype_is_the_smallest_that_holds_the_vocabulary():
    assert resolve_dtype("auto", 1 << 16) == "uint16" and resolve_dtype("auto", (1 << 16) + 1) == "uint32"
    with pytest.raises(DataPrepError, match="--dtype uint16 cannot hold the ids of a vocabulary of 65,537"):
        resolve_dtype("uint16", (1 << 16) + 1)
