"""Pure planning and checking functions: parts, part names, chunk sizes, ETags, zip time
fields, unsafe entry names, and RFC 3339 times."""

from __future__ import annotations

import hashlib
import random
import struct
import zipfile

import pytest

import master_mapper
import python_unzipper
import python_zipper
from common_s3 import MIB, MigrationError, format_mtime, mtime_ns, parse_mtime

GIB = 1 << 30


# plan_parts

def files(*sizes: int) -> list[tuple[str, int]]:
    return [(f"f{i:03d}", size) for i, size in enumerate(sizes)]


@pytest.mark.parametrize("sizes, max_files, max_bytes, expected", [
    ((1, 1, 1, 1, 1), 2, 100, [("f000", 2, 2), ("f002", 2, 2), ("f004", 1, 1)]),
    ((1, 1, 1, 1), 2, 100, [("f000", 2, 2), ("f002", 2, 2)]),
    ((4, 4, 4), 100, 8, [("f000", 2, 8), ("f002", 1, 4)]),
    ((4, 4, 1), 100, 8, [("f000", 2, 8), ("f002", 1, 1)]),
    ((5, 4), 100, 8, [("f000", 1, 5), ("f001", 1, 4)]),
    ((1, 100, 1), 100, 10, [("f000", 1, 1), ("f001", 1, 100), ("f002", 1, 1)]),
    ((100,), 100, 10, [("f000", 1, 100)]),
    ((100, 100), 100, 10, [("f000", 1, 100), ("f001", 1, 100)]),
    ((0, 0, 0), 2, 10, [("f000", 2, 0), ("f002", 1, 0)]),
    ((3, 3, 3), 1, 100, [("f000", 1, 3), ("f001", 1, 3), ("f002", 1, 3)]),
    ((), 10, 10, []),
])
def test_plan_parts(sizes, max_files, max_bytes, expected):
    assert master_mapper.plan_parts(files(*sizes), max_files=max_files, max_bytes=max_bytes) == expected


def test_plan_parts_accepts_any_iterable():
    gen = (item for item in files(1, 2, 3))
    assert master_mapper.plan_parts(gen, max_files=2, max_bytes=100) == [("f000", 2, 3), ("f002", 1, 3)]


@pytest.mark.parametrize("seed", range(5))
def test_plan_parts_invariants(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, 10, 500, 5000, 20000]) for _ in range(rng.randint(1, 400))]
    max_files, max_bytes = rng.randint(1, 50), rng.randint(1, 10000)
    items = files(*sizes)
    parts = master_mapper.plan_parts(items, max_files=max_files, max_bytes=max_bytes)
    assert sum(n for _, n, _ in parts) == len(items)
    assert sum(b for _, _, b in parts) == sum(sizes)
    start = 0
    for i, (first, n, nbytes) in enumerate(parts):
        assert first == items[start][0]
        assert 1 <= n <= max_files
        assert nbytes == sum(sizes[start:start + n])
        assert nbytes <= max_bytes or n == 1, "only a single oversized file may pass max_bytes"
        start += n
        if i + 1 < len(parts):  # greedy: this part could not have taken the next file
            assert n == max_files or nbytes + sizes[start] > max_bytes
    # Deterministic.
    assert master_mapper.plan_parts(items, max_files=max_files, max_bytes=max_bytes) == parts


# part_names

@pytest.mark.parametrize("n_parts, first, expected", [
    (1, 1, ["Full"]),
    (2, 1, ["Part1", "Part2"]),
    (3, 1, ["Part1", "Part2", "Part3"]),
    (1, 4, ["Part4"]),
    (2, 4, ["Part4", "Part5"]),
    (0, 1, []),
    (0, 7, []),
])
def test_part_names(n_parts, first, expected):
    assert master_mapper.part_names(n_parts, first) == expected


def test_part_names_never_repeat_across_generations():
    first = master_mapper.part_names(3, 1)
    second = master_mapper.part_names(2, 4)
    assert not set(first) & set(second)


# chunk_size_for

@pytest.mark.parametrize("size", [0, 1, 8 * MIB, 5 * GIB, 20 * GIB, 75 * GIB, 100 * GIB + 12345,
                                  1 << 40, 5 * (1 << 40)])
def test_chunk_size(size):
    chunk = python_zipper.chunk_size_for(size)
    assert chunk >= python_zipper.MIN_CHUNK == 16 * MIB
    assert chunk % MIB == 0
    assert -(-size // chunk) <= 9000
    if chunk > python_zipper.MIN_CHUNK:  # the smallest whole MiB that keeps under 9,000 chunks
        assert -(-size // (chunk - MIB)) > 9000


def test_chunk_size_for_twenty_gib():
    chunk = python_zipper.chunk_size_for(20 * GIB)
    assert chunk == 16 * MIB
    assert 20 * GIB / chunk <= 9000


# expected_etag

def test_expected_etag_single_chunk_is_plain_md5():
    digest = hashlib.md5(b"hello").digest()
    assert python_zipper.expected_etag([digest]) == hashlib.md5(b"hello").hexdigest()


@pytest.mark.parametrize("n", [2, 3, 10])
def test_expected_etag_multipart(n):
    digests = [hashlib.md5(bytes([i]) * 100).digest() for i in range(n)]
    want = hashlib.md5(b"".join(digests)).hexdigest() + f"-{n}"
    assert python_zipper.expected_etag(digests) == want


# Zip time fields

@pytest.mark.parametrize("mtime", [-1e10, -1.0, 0.0, 100.0, 315532800.0])
def test_pre_1980_times_clamp(mtime):
    date_time = python_zipper.dos_time(mtime)
    assert date_time[0] == 1980
    zipfile.ZipInfo("x", date_time=date_time)  # accepted by zipfile


@pytest.mark.parametrize("mtime", [1e9, 1e9 + 0.75, 1.6e9, 4102444800.0, 1e12])
def test_dos_time_is_valid_for_zipfile(mtime):
    date_time = python_zipper.dos_time(mtime)
    assert 1980 <= date_time[0] <= 2107
    assert 1 <= date_time[1] <= 12 and 1 <= date_time[2] <= 31
    zipfile.ZipInfo("x", date_time=date_time)


@pytest.mark.parametrize("mtime, stored", [
    (1e9, 1000000000),
    (1e9 + 0.9, 1000000000),
    (0.0, 0),
    (-1.0, -1),
    (-1e10, -2**31),
    (1e12, 2**31 - 1),
    (2**31 - 1, 2**31 - 1),
])
def test_ut_extra(mtime, stored):
    extra = python_zipper.ut_extra(mtime)
    assert len(extra) == 9
    tag, size, flags, value = struct.unpack("<HHBi", extra)
    assert (tag, size, flags) == (0x5455, 5, 1)
    assert value == stored


def test_zip_overhead_grows_with_names():
    short = python_zipper.zip_overhead(["a"])
    longer = python_zipper.zip_overhead(["a" * 100])
    assert longer - short == 2 * 99
    assert python_zipper.zip_overhead([]) > 0
    assert python_zipper.zip_overhead(["日本"]) > python_zipper.zip_overhead(["ab"])


# unsafe_reason

@pytest.mark.parametrize("path", ["../x", "a/../b", "a/..", "..", "/abs", "/", "a//b", "./a", "a/./b",
                                  "a/", ".", "a\0b", "\0", ""])
def test_unsafe_names(path):
    assert python_unzipper.unsafe_reason(path)


@pytest.mark.parametrize("path", ["a b/ c", "#x", "back\\slash", "日本/語", "a", "a/b/c", "..a", "a..",
                                  ".hidden", "dir/.hidden", "...", "a b", "~root", "semi;colon",
                                  "quote'\"", "cafe\u0301"])
def test_safe_names(path):
    assert python_unzipper.unsafe_reason(path) is None


# RFC 3339 times (rclone's ModTime)

@pytest.mark.parametrize("text, seconds, ns", [
    ("2001-09-09T01:46:40.25Z", 1000000000.25, 1000000000250000000),
    ("2001-09-09T03:46:40.25+02:00", 1000000000.25, 1000000000250000000),
    ("2001-09-08T20:46:40.25-05:00", 1000000000.25, 1000000000250000000),
    ("2001-09-09T01:46:40Z", 1000000000.0, 1000000000000000000),
    ("2001-09-09T01:46:40.123456789Z", 1000000000.123456789, 1000000000123456789),
    ("2001-09-09T01:46:40.1234567891Z", 1000000000.1234567891, 1000000000123456789),
    ("2001-09-09T01:46:40.000000001Z", 1000000000.000000001, 1000000000000000001),
    ("1970-01-01T00:00:00Z", 0.0, 0),
    ("1969-12-31T23:59:59.5Z", -0.5, -500000000),
])
def test_parse_mtime_and_mtime_ns(text, seconds, ns):
    assert parse_mtime(text) == pytest.approx(seconds, abs=1e-6)
    assert mtime_ns(text) == ns


@pytest.mark.parametrize("text", ["2001-09-09 01:46:40Z", "2001-09-09T01:46:40", "yesterday", "",
                                  "2001-09-09T01:46:40.Z", "2001-09-09T01:46:40+0200"])
def test_unparsable_times(text):
    with pytest.raises(ValueError):
        parse_mtime(text)
    with pytest.raises(ValueError):
        mtime_ns(text)


@pytest.mark.parametrize("seconds", [0.0, 1e9, 1e9 + 0.25, 1.7e9 + 0.5])
def test_format_mtime_round_trips(seconds):
    assert parse_mtime(format_mtime(seconds)) == pytest.approx(seconds, abs=1e-6)


# check_etag: what an ETag after upload proves, per server style

MULTI = "0" * 32 + "-3"
WHOLE = "a" * 32


@pytest.mark.parametrize("got", [MULTI, WHOLE])
def test_check_etag_accepts_either_form_when_both_are_known(got):
    python_zipper.check_etag("k", got, MULTI, WHOLE)


@pytest.mark.parametrize("got", ["1" * 32 + "-3", "b" * 32])
def test_check_etag_refuses_an_md5_shaped_etag_that_matches_nothing(got):
    with pytest.raises(MigrationError, match="damaged"):
        python_zipper.check_etag("k", got, MULTI, WHOLE)


def test_check_etag_without_the_whole_md5_refuses_a_whole_md5_etag_unless_chunks_were_checked():
    with pytest.raises(MigrationError, match="multipart ETags before"):
        python_zipper.check_etag("k", WHOLE, MULTI, None)
    python_zipper.check_etag("k", WHOLE, MULTI, None, chunks_checked=True)  # the server checked each chunk
    with pytest.raises(MigrationError, match="damaged"):  # a wrong multipart ETag is never excused
        python_zipper.check_etag("k", "1" * 32 + "-3", MULTI, None, chunks_checked=True)


def test_check_etag_lets_an_etag_that_is_no_md5_pass_on_size():
    python_zipper.check_etag("k", "opaque-etag-from-some-service", MULTI, WHOLE)


def test_etag_style_learns_chunked_etags_only_from_a_matching_multipart_upload():
    class Sink:
        multipart = True
        chunk_md5s = [b"\x01" * 16, b"\x02" * 16]
    style = python_zipper.EtagStyle()
    style.learn(Sink(), "f" * 32)  # the whole object's MD5: nothing learnt
    assert not style.chunked
    style.learn(Sink(), python_zipper.expected_etag(Sink.chunk_md5s, multipart=True))
    assert style.chunked
