"""Data pipeline: packed token files, tokenizer, prepare-data, built-in corpus, sample stream."""

import argparse
import json
import random
import struct

import numpy as np
import pandas as pd
import pytest
import torch

from megamix.data import (
    BlendedSamples,
    IndexedDataset,
    IndexedDatasetWriter,
    SampleStream,
    TokenWindows,
    Tokenizer,
    ensure_builtin,
    prepare_data,
    train_tokenizer,
)
from megamix.data import builtin, prepare
from megamix.errors import CheckpointError, DataError

WORDS = (
    "the of and to in is was for on that with as by at from his her an which or be are this it have not "
    "they were had but one their river mountain small light quickly over under garden city naïve café 東京"
).split()


def english_like_lines(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 18))).capitalize() + "." for _ in range(count)]


LINES = english_like_lines(300)


def write_dataset(prefix, documents, vocab_size=1000) -> IndexedDataset:
    with IndexedDatasetWriter(str(prefix), vocab_size) as writer:
        for document in documents:
            writer.add_document(document)
    return IndexedDataset(str(prefix))


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    return train_tokenizer(LINES, tmp_path_factory.mktemp("tok") / "tok", vocab_size=320).path


# --- packed token files ---------------------------------------------------------------


@pytest.mark.parametrize("vocab_size, dtype", [(1000, np.uint16), (65536, np.uint16), (70000, np.int32)])
def test_indexed_round_trip(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, vocab_size, size=n) for n in (5, 0, 1, 37, 2)]
    dataset = write_dataset(tmp_path / "d", documents, vocab_size)
    assert dataset.dtype == dtype
    assert dataset.num_documents == 5
    assert dataset.num_tokens == 45
    for i, document in enumerate(documents):
        np.testing.assert_array_equal(dataset.document(i), document)
    np.testing.assert_array_equal(dataset.tokens, np.concatenate(documents))


def test_index_bytes_follow_megatron_layout(tmp_path):
    write_dataset(tmp_path / "d", [[1, 2, 3], [4], [5, 6]])
    expected = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<QBQQ", 1, 8, 3, 4)
        + struct.pack("<3i", 3, 1, 2)
        + struct.pack("<3q", 0, 6, 8)
        + struct.pack("<4q", 0, 1, 2, 3)
    )
    assert (tmp_path / "d.idx").read_bytes() == expected
    assert (tmp_path / "d.bin").read_bytes() == np.arange(1, 7, dtype="<u2").tobytes()


def corrupt_truncated_idx(prefix):
    idx = prefix.with_suffix(".idx")
    idx.write_bytes(idx.read_bytes()[:-3])


def corrupt_magic(prefix):
    idx = prefix.with_suffix(".idx")
    idx.write_bytes(b"XXXXXXXXX" + idx.read_bytes()[9:])


def corrupt_bin_size(prefix):
    with open(prefix.with_suffix(".bin"), "ab") as f:
        f.write(b"\x00\x00")


def remove_bin(prefix):
    prefix.with_suffix(".bin").unlink()


@pytest.mark.parametrize("damage", [corrupt_truncated_idx, corrupt_magic, corrupt_bin_size, remove_bin])
def test_damaged_files_raise_data_error_naming_the_file(tmp_path, damage):
    prefix = tmp_path / "d"
    write_dataset(prefix, [[1, 2, 3], [4, 5]])
    damage(prefix)
    with pytest.raises(DataError, match=str(prefix)):
        IndexedDataset(str(prefix))


def test_missing_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        IndexedDataset(str(tmp_path / "nothing"))


def test_failed_write_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(str(tmp_path / "d"), 100) as writer:
            writer.add_document([1, 2])
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_ids_outside_vocabulary(tmp_path):
    with pytest.raises(DataError, match="outside the vocabulary"):
        with IndexedDatasetWriter(str(tmp_path / "d"), 100) as writer:
            writer.add_document([5, 100])


# --- tokenizer ------------------------------------------------------------------------


def test_tokenizer_round_trips_any_text(tokenizer_path):
    tokenizer = Tokenizer.load(tokenizer_path)
    assert tokenizer.vocab_size == 320
    assert tokenizer.eos_id >= 0 and tokenizer.bos_id >= 0
    texts = ["  two leading spaces,  double  gaps ", "unseen: Ωμέγα ✓ 🙂\ttab\nnewline", ""]
    for text, ids in zip(texts, tokenizer.encode_batch(texts)):
        assert ids == tokenizer.encode(text)
        assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("contents", [None, b"not a sentencepiece model"])
def test_tokenizer_load_errors(tmp_path, contents):
    path = tmp_path / "tok.model"
    if contents is not None:
        path.write_bytes(contents)
    with pytest.raises(DataError, match=str(path)):
        Tokenizer.load(path)


@pytest.mark.parametrize("texts, vocab_size, message", [
    (LINES[:20], 50_000, r"vocab size 50000 .* at most \d+ pieces"),
    (LINES[:20], 100, r"vocab size 100 .* at least \d+ pieces"),
    (["", ""], 300, "empty"),
])
def test_train_tokenizer_errors_are_data_errors(tmp_path, texts, vocab_size, message):
    with pytest.raises(DataError, match=message):
        train_tokenizer(texts, tmp_path / "tok", vocab_size)


# --- prepare-data ---------------------------------------------------------------------


def write_txt(path, lines):
    # A blank line is an empty document, which prepare skips.
    path.write_text("\n".join(lines[:10] + [""] + lines[10:]) + "\n")


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps({"id": i, "body": line}) + "\n" for i, line in enumerate(lines)))


def write_parquet(path, lines):
    pd.DataFrame({"body": lines, "id": range(len(lines))}).to_parquet(path)


@pytest.mark.parametrize("suffix, write", [(".txt", write_txt), (".jsonl", write_jsonl), (".parquet", write_parquet)])
def test_prepare_decodes_to_the_original_documents(tmp_path, tokenizer_path, suffix, write):
    source = tmp_path / f"input{suffix}"
    write(source, LINES)
    info = prepare_data([str(source)], str(tmp_path / "out"), tokenizer=tokenizer_path, text_key="body")
    dataset = IndexedDataset(info.prefix)
    tokenizer = Tokenizer.load(info.tokenizer_path)
    assert info.num_documents == dataset.num_documents == len(LINES)
    assert info.num_tokens == dataset.num_tokens
    for i, line in enumerate(LINES):
        document = dataset.document(i)
        assert document[-1] == tokenizer.eos_id
        assert tokenizer.decode(document[:-1]) == line
    metadata = json.loads(open(info.metadata_path).read())
    assert metadata["num_tokens"] == info.num_tokens and metadata["eos_id"] == tokenizer.eos_id


def test_prepare_trains_a_tokenizer_and_reuses_it(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(LINES[:150]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in LINES[150:]))
    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]
    trained = prepare_data(inputs, str(tmp_path / "trained"), vocab_size=400)
    assert Tokenizer.load(trained.tokenizer_path).vocab_size == trained.vocab_size == 400
    reused = prepare_data(inputs, str(tmp_path / "reused"), tokenizer=trained.tokenizer_path)
    assert (tmp_path / "trained.bin").read_bytes() == (tmp_path / "reused.bin").read_bytes()
    assert reused.num_documents == len(LINES)


def test_prepare_over_old_files_uses_the_new_tokenizer(tmp_path, tokenizer_path):
    write_txt(tmp_path / "in.txt", LINES)
    prepare_data([str(tmp_path / "in.txt")], str(tmp_path / "out"), vocab_size=400)
    info = prepare_data([str(tmp_path / "in.txt")], str(tmp_path / "out"), tokenizer=tokenizer_path)
    assert info.vocab_size == 320
    assert Tokenizer.load(tokenizer_path).decode(IndexedDataset(info.prefix).document(0)[:-1]) == LINES[0]


def test_prepare_without_documents_writes_nothing(tmp_path, tokenizer_path):
    (tmp_path / "in.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare_data([str(tmp_path / "in.txt")], str(tmp_path / "out"), tokenizer=tokenizer_path)
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()


def test_prepare_with_two_workers_writes_identical_files(tmp_path, tokenizer_path):
    write_txt(tmp_path / "in.txt", english_like_lines(3000, seed=1))
    for workers in (1, 2):
        output = str(tmp_path / f"w{workers}")
        prepare_data([str(tmp_path / "in.txt")], output, tokenizer=tokenizer_path, workers=workers)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()


@pytest.mark.parametrize("setup, kwargs, message", [
    (None, {"inputs": ["missing.txt"]}, "does not exist"),
    ("in.csv", {"inputs": ["in.csv"]}, "unsupported type"),
    ("in.jsonl", {"inputs": ["in.jsonl"], "text_key": "content"}, "no field 'content'"),
    ("in.jsonl", {"inputs": ["in.jsonl"], "text_key": "id"}, "not text"),
    ("in.txt", {"inputs": ["in.txt"], "vocab_size": 300}, "exactly one"),
    ("in.txt", {"inputs": ["in.txt"], "tokenizer": None}, "exactly one"),
])
def test_prepare_input_errors(tmp_path, tokenizer_path, monkeypatch, setup, kwargs, message):
    monkeypatch.chdir(tmp_path)
    if setup:
        write_jsonl(tmp_path / setup, LINES[:5])
    kwargs = {"tokenizer": tokenizer_path, **kwargs}
    with pytest.raises(DataError, match=message):
        prepare_data(output_prefix=str(tmp_path / "out"), **kwargs)


def test_prepare_data_cli(tmp_path, tokenizer_path, capsys):
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    write_txt(tmp_path / "in.txt", LINES)
    args = parser.parse_args([str(tmp_path / "in.txt"), "--output", str(tmp_path / "o"), "--tokenizer", tokenizer_path])
    assert prepare.run(args) == 0
    assert f"{len(LINES)} documents" in capsys.readouterr().out
    assert IndexedDataset(str(tmp_path / "o")).num_documents == len(LINES)
    for missing_choice in ([], ["--tokenizer", "t.model", "--vocab-size", "300"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["in.txt", "--output", "out", *missing_choice])


# --- built-in corpus ------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin_prefix(tmp_path_factory) -> str:
    return ensure_builtin(tmp_path_factory.mktemp("cache"), vocab_size=4096)


def test_builtin_corpus_is_prepared(builtin_prefix):
    dataset = IndexedDataset(builtin_prefix)
    tokenizer = Tokenizer.load(builtin_prefix + ".model")
    assert tokenizer.vocab_size == 4096
    assert dataset.num_tokens > 200_000
    assert "Python" in tokenizer.decode(dataset.tokens[:100_000])


def test_builtin_corpus_is_reused(builtin_prefix, monkeypatch):
    def fail(*args):
        raise AssertionError("prepared again")

    monkeypatch.setattr(builtin, "prepare_builtin", fail)
    cache_dir = builtin_prefix.rsplit("/", 2)[0]
    assert ensure_builtin(cache_dir, vocab_size=4096) == builtin_prefix


def test_builtin_race_keeps_the_winners_files(tmp_path, monkeypatch):
    final_dir = tmp_path / f"builtin-{builtin.VERSION}-300"

    def lose_race(directory, vocab_size):
        (directory / "stdlib.bin").write_bytes(b"loser")
        final_dir.mkdir()
        (final_dir / "stdlib.bin").write_bytes(b"winner")

    monkeypatch.setattr(builtin, "prepare_builtin", lose_race)
    assert ensure_builtin(tmp_path, vocab_size=300) == str(final_dir / "stdlib")
    assert (final_dir / "stdlib.bin").read_bytes() == b"winner"
    assert [path.name for path in tmp_path.iterdir()] == [final_dir.name]


def test_builtin_documents_are_deterministic():
    documents = builtin.builtin_documents()
    assert documents == builtin.builtin_documents()
    assert 1_000_000 < sum(map(len, documents)) <= builtin.MAX_CHARS


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGAMIX_CACHE", str(tmp_path))
    assert builtin.default_cache_dir() == tmp_path


# --- sample stream --------------------------------------------------------------------


def counting_dataset(prefix, num_tokens, first=0) -> IndexedDataset:
    """Tokens first, first + 1, ...: a window's first token tells which window it is."""
    ids = np.arange(first, first + num_tokens)
    return write_dataset(prefix, np.array_split(ids, 7), vocab_size=first + num_tokens)


def test_token_windows_overlap_by_one_token(tmp_path):
    windows = TokenWindows(counting_dataset(tmp_path / "d", 101), seq_len=10)
    assert len(windows) == 10
    np.testing.assert_array_equal(windows.windows(np.array([0, 9])), [np.arange(0, 11), np.arange(90, 101)])


def test_short_dataset_error_names_file_and_sizes(tmp_path):
    dataset = counting_dataset(tmp_path / "d", 10)
    with pytest.raises(DataError, match=rf"{dataset.bin_path} has 10 tokens.*seq_len \+ 1 = 11"):
        TokenWindows(dataset, seq_len=10)


@pytest.fixture
def two_datasets(tmp_path):
    return [(counting_dataset(tmp_path / "a", 1000), 0.7), (counting_dataset(tmp_path / "b", 500, first=5000), 0.3)]


def test_samples_do_not_depend_on_batching(two_datasets):
    samples = BlendedSamples(two_datasets, seq_len=16, seed=3)
    whole = samples.get(0, 10)
    assert whole.dtype == torch.long and whole.shape == (10, 17)
    assert torch.equal(whole, torch.cat([samples.get(0, 4), samples.get(4, 6)]))
    assert torch.equal(whole[7:], BlendedSamples(two_datasets, seq_len=16, seed=3).get(7, 3))
    assert not torch.equal(whole, BlendedSamples(two_datasets, seq_len=16, seed=4).get(0, 10))


def test_stream_resumes_from_its_state(two_datasets):
    stream = SampleStream(BlendedSamples(two_datasets, seq_len=16, seed=0))
    stream.next_batch(5)
    state = stream.state_dict()
    expected = [stream.next_batch(3) for _ in range(4)]
    resumed = SampleStream(BlendedSamples(two_datasets, seq_len=16, seed=0))
    resumed.load_state_dict(state)
    assert state == {"consumed": 5}
    assert all(torch.equal(resumed.next_batch(3), batch) for batch in expected)
    with pytest.raises(CheckpointError):
        resumed.load_state_dict({"consumed": -1})


def test_blend_matches_weights_at_every_prefix(two_datasets):
    samples = BlendedSamples(two_datasets, seq_len=16, seed=0).get(0, 1000)
    from_first = np.cumsum((samples[:, 0] < 5000).numpy())
    expected = 0.7 * np.arange(1, 1001)
    assert np.abs(from_first - expected).max() <= 1
    assert from_first[-1] == 700


def test_every_epoch_visits_every_window_once(tmp_path):
    dataset = counting_dataset(tmp_path / "d", 16 * 37 + 1)
    first_tokens = BlendedSamples([(dataset, 1.0)], seq_len=16, seed=0).get(0, 3 * 37)[:, 0].numpy()
    epochs = first_tokens.reshape(3, 37) // 16
    for epoch in epochs:
        assert sorted(epoch) == list(range(37))
    assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_blend_weights_raise_data_error(tmp_path, weight):
    dataset = counting_dataset(tmp_path / "d", 100)
    with pytest.raises(DataError, match="blend weight"):
        BlendedSamples([(dataset, 1.0), (dataset, weight)], seq_len=8, seed=0)
