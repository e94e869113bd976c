"""Key stems (sanitize_name, assign_stems) and the key layout on S3."""

from __future__ import annotations

import itertools
import re
import unicodedata

import pytest

from common_s3 import ROOT_STEM, FolderIndex, Layout, assign_stems, local_name, sanitize_name

PREFIX = "work_files_zips/"
AWKWARD = ["A B", "A_B", "A/B", "a", "A", "X", "X_unzip", "X_mapper", "X_unzip_mapper", "100%",
           "#x", "%23x", "caf\u00e9", "cafe\u0301", "日本", "日本語/x", "~root", "_parts", "_map",
           "a b c", "a_b c", "a b_c", "a_b_c", "back\\slash", "quote'\"", "semi;colon", "tab\tx",
           "new\nline", "Photos", "Photos_2020", "x" * 240, "x" * 241, "漢" * 400]


def reference_sanitize(name: str) -> str:
    """The original rule, written out byte by byte."""
    out = []
    for byte in unicodedata.normalize("NFC", name).encode("utf-8"):
        char = chr(byte)
        if char.isascii() and (char.isalnum() or char in "_.-~"):
            out.append(char)
        else:
            out.append(f"%{byte:02X}")
    return "".join(out).replace("%20", "_").replace("%2F", "_")


# sanitize_name

@pytest.mark.parametrize("name, stem", [
    ("A B", "A_B"),
    ("A/B", "A_B"),
    ("A_B", "A_B"),
    ("100%", "100%25"),
    ("#x", "%23x"),
    ("a+b", "a%2Bb"),
    ("a:b", "a%3Ab"),
    ("a~b_c-d.e", "a~b_c-d.e"),
    ("caf\u00e9", "caf%C3%A9"),
    ("cafe\u0301", "caf%C3%A9"),
    ("日本", "%E6%97%A5%E6%9C%AC"),
    ("ß", "%C3%9F"),
    ("a\nb", "a%0Ab"),
    ("%20", "%2520"),
    ("A%2FB", "A%252FB"),
    ("quote'\"", "quote%27%22"),
    ("", ""),
])
def test_sanitize_name(name, stem):
    assert sanitize_name(name) == stem


@pytest.mark.parametrize("name", AWKWARD)
def test_sanitize_name_matches_the_original_rule(name):
    assert sanitize_name(name) == reference_sanitize(name)


def test_nfd_and_nfc_give_the_same_stem():
    nfc, nfd = "Réunion é", unicodedata.normalize("NFD", "Réunion é")
    assert nfc != nfd
    assert sanitize_name(nfc) == sanitize_name(nfd) == "R%C3%A9union_%C3%A9"


@pytest.mark.parametrize("name", AWKWARD)
def test_stem_is_plain_ascii_without_slash(name):
    stem = sanitize_name(name)
    assert stem.isascii()
    assert "/" not in stem
    assert re.fullmatch(r"[A-Za-z0-9_.\-~%]*", stem)


# assign_stems

def test_spaces_and_underscores_get_distinct_stems():
    stems = assign_stems(["A_B", "A B"])
    assert stems["A B"] == "A_B"  # " " (0x20) sorts before "_" (0x5F): it keeps the plain stem
    assert stems["A_B"] != "A_B"
    assert stems["A_B"].startswith("A_B~")


def test_three_way_collision():
    stems = assign_stems(["A/B", "A B", "A_B"])
    assert len({stems["A/B"], stems["A B"], stems["A_B"]}) == 3
    assert stems["A B"] == "A_B"


@pytest.mark.parametrize("other", ["X_unzip", "X_mapper"])
def test_progress_keys_never_shared(other):
    stems = assign_stems(["X", other])
    assert stems["X"] == "X"
    assert stems[other] != other
    layout = Layout(PREFIX)
    keys = [layout.legacy_progress(stems[n], s) for n in ("X", other)
            for s in ("zipper", "unzipper", "mapper")]
    assert len(set(keys)) == len(keys)


def test_progress_conflict_with_a_longer_name_sorting_first():
    # "X_unzip" is taken first by an earlier generation; the new "X" must step aside.
    stems = assign_stems(["X", "X_unzip"], previous={"X_unzip": "X_unzip"})
    assert stems["X_unzip"] == "X_unzip"
    assert stems["X"] != "X"


def test_every_key_is_distinct_for_awkward_names():
    layout = Layout(PREFIX)
    stems = assign_stems(AWKWARD)
    assert len(set(stems.values())) == len(stems)
    keys = []
    for stem in stems.values():
        keys += [layout.list_txt(stem), layout.large_json(stem), layout.part_object(stem, "Full"),
                 layout.part_object(stem, "Part1"), layout.part_object(stem, "Part12")]
        keys += [layout.legacy_progress(stem, s) for s in ("zipper", "unzipper", "mapper")]
    assert len(set(keys)) == len(keys)


def test_root_unit():
    assert assign_stems([]) == {"": ROOT_STEM}
    assert assign_stems(["a"])[""] == "~root"


def test_folder_named_like_the_root_stem():
    stems = assign_stems(["~root"])
    assert stems[""] == "~root"
    assert stems["~root"] != "~root"


def test_previous_stems_are_kept():
    first = assign_stems(["A_B"])
    assert first["A_B"] == "A_B"
    # "A B" is new and sorts first, but "A_B" keeps the stem it already has.
    second = assign_stems(["A B", "A_B"], previous=first)
    assert second["A_B"] == "A_B"
    assert second["A B"] != "A_B"
    assert second["A B"].startswith("A_B~")


def test_previous_stem_is_kept_even_when_unusual():
    stems = assign_stems(["A_B"], previous={"A_B": "A_B~deadbeef"})
    assert stems["A_B"] == "A_B~deadbeef"


@pytest.mark.parametrize("retired_name, retired_stem, new_name", [
    ("Old Name", "Old_Name", "Old_Name"),
    ("gone", "X", "X_unzip"),
    ("gone", "X_mapper", "X"),
])
def test_retired_stems_are_never_reused(retired_name, retired_stem, new_name):
    stems = assign_stems([new_name], previous={retired_name: retired_stem})
    assert retired_name not in stems
    assert stems[new_name] != retired_stem
    layout = Layout(PREFIX)
    old = {layout.legacy_progress(retired_stem, s) for s in ("zipper", "unzipper", "mapper")}
    new = {layout.legacy_progress(stems[new_name], s) for s in ("zipper", "unzipper", "mapper")}
    assert not old & new


@pytest.mark.parametrize("name", ["漢" * 400, "x" * 241, "a b " * 200, "é" * 300])
def test_long_names_get_short_stems(name):
    stem = assign_stems([name])[name]
    assert len(stem.encode("utf-8")) <= 240
    assert stem.isascii()
    assert "/" not in stem


def test_long_names_sharing_a_beginning_stay_distinct():
    a, b = "漢" * 400, "漢" * 399 + "字"
    stems = assign_stems([a, b])
    assert stems[a] != stems[b]
    assert len(stems[a].encode()) <= 240 and len(stems[b].encode()) <= 240


def test_a_name_at_the_limit_keeps_its_plain_stem():
    assert assign_stems(["x" * 240])["x" * 240] == "x" * 240
    assert assign_stems(["x" * 241])["x" * 241] != "x" * 241


def test_assign_stems_is_deterministic():
    names = list(AWKWARD)
    first = assign_stems(names)
    assert assign_stems(names) == first
    assert assign_stems(list(reversed(names))) == first
    assert assign_stems(names + names) == first
    for perm in itertools.islice(itertools.permutations(["A B", "A_B", "A/B", "X", "X_unzip"]), 30):
        assert assign_stems(perm) == assign_stems(["A B", "A_B", "A/B", "X", "X_unzip"])


def test_hash_suffix_depends_on_the_name_only():
    # The same colliding name gets the same stem whatever else is in the folder list.
    one = assign_stems(["A B", "A_B"])["A_B"]
    two = assign_stems(["A B", "A_B", "zzz", "Photos"])["A_B"]
    assert one == two


# Layout

@pytest.fixture
def layout():
    return Layout(PREFIX)


def test_original_keys(layout):
    assert layout.part_object("Backup.zip", "Part1") == PREFIX + "Backup.zip_Part1.zip"
    assert layout.part_object("F", "Full") == PREFIX + "F_Full.zip"
    assert layout.list_txt("F") == PREFIX + "F_List.txt"
    assert layout.large_json("F") == PREFIX + "F_LargeFiles.json"
    assert layout.folder_list == PREFIX + "_index/folder_list.txt"
    assert layout.legacy_progress("F", "zipper") == PREFIX + "_progress/F_progress.json"
    assert layout.legacy_progress("F", "unzipper") == PREFIX + "_progress/F_unzip_progress.json"
    assert layout.legacy_progress("F", "mapper") == PREFIX + "_progress/F_mapper_progress.json"


def project_keys(layout: Layout, stem: str) -> list[str]:
    return [layout.map_root, layout.generation(1), layout.plan(1), layout.index(12),
            layout.manifest(3, stem), layout.part_record(stem, "Full"),
            layout.part_entries(stem, "Part2"), layout.parts_of(stem),
            layout.large_record(stem, "0" * 32), layout.larges_of(stem),
            layout.restored_record(stem, "Full"), layout.restored_of(stem),
            layout.verified_record(7, stem), layout.verified_of(7),
            layout.report("20260101T000000Z-unzipper-1"), layout.probe]


@pytest.mark.parametrize("name", AWKWARD)
def test_project_keys_cannot_collide_with_original_keys(layout, name):
    stem = sanitize_name(name)
    originals = [layout.list_txt(stem), layout.large_json(stem), layout.part_object(stem, "Full"),
                 layout.part_object(stem, "Part1")]
    for key in originals:
        assert "/" not in key[len(PREFIX):]
    for key in project_keys(layout, stem):
        assert key.startswith(PREFIX + "_")
        assert re.match(re.escape(PREFIX) + r"_[a-z]+/", key), key
        assert key not in originals


def test_generation_keys_are_zero_padded(layout):
    assert layout.generation(1) == PREFIX + "_map/g000001/"
    assert layout.plan(1) == PREFIX + "_map/g000001/plan.json"
    assert layout.manifest(2, "F") == PREFIX + "_map/g000002/folders/F.jsonl.gz"
    assert layout.verified_record(3, "F") == PREFIX + "_verified/g000003/F.json"
    # Lexical order of generations is numeric order.
    assert sorted([layout.generation(10), layout.generation(9)]) == [layout.generation(9),
                                                                   layout.generation(10)]


def test_a_stem_is_never_a_bare_prefix_of_another_folders_records(layout):
    # "Photos" is a prefix of "Photos_2020", but their record folders are distinct.
    assert not layout.part_record("Photos_2020", "Full").startswith(layout.parts_of("Photos"))
    assert not layout.large_record("Photos_2020", "x").startswith(layout.larges_of("Photos"))
    assert not layout.restored_record("Photos_2020", "Full").startswith(layout.restored_of("Photos"))


@pytest.mark.parametrize("prefix", ["", "p/", "deep/er/prefix-"])
def test_prefix_is_prepended_verbatim(prefix):
    layout = Layout(prefix)
    assert layout.part_object("F", "Full") == prefix + "F_Full.zip"
    assert layout.part_record("F", "Full") == prefix + "_parts/F/Full.json"


# Local files named after a stem (WORK_DIR/.tmp/<script>/...)

LONG = ["x" * 230, "x" * 238, "x" * 240, "x" * 241, "漢" * 400, "長い名前" * 100, "a b " * 200]
# Every pattern the scripts use, with the longest generation number and sqlite's own suffixes.
LOCAL_PATTERNS = [("g999999", "sqlite"), ("g999999", "verify.sqlite"), ("prev.sqlite",),
                  ("manifest.gz",), ("list.txt",), ("Part999999",), ("Part999999", "recheck"),
                  ("dirs",)]


@pytest.mark.parametrize("name", LONG, ids=lambda n: f"{len(n)}x{n[0]}")
def test_local_names_fit_any_file_system(name):
    stem = assign_stems([name])[name]
    for parts in LOCAL_PATTERNS:
        base = local_name(stem, *parts)
        assert "/" not in base
        for suffix in ("", "-journal", "-wal", "-shm", ".files", ".new"):
            assert len((base + suffix).encode("utf-8")) <= 255, base + suffix


def test_local_names_are_distinct_per_stem():
    stems = assign_stems(AWKWARD + ["x" * 200 + "a", "x" * 200 + "b"]).values()
    names = {local_name(stem, "g1", "sqlite") for stem in stems}
    assert len(names) == len(stems)
    assert local_name("F", "Full") != local_name("F", "Part1")


@pytest.mark.parametrize("name", LONG, ids=lambda n: f"{len(n)}x{n[0]}")
def test_folder_index_at_a_local_name_opens_and_closes(tmp_path, name):
    stem = assign_stems([name])[name]
    index = FolderIndex(str(tmp_path / local_name(stem, "g999999", "verify.sqlite")))
    index.add("a.txt", "f", 1, "2001-09-09T01:46:40Z")
    index.commit()
    assert index.get("a.txt")["size"] == 1
    index.close()
    assert list(tmp_path.iterdir()) == []
