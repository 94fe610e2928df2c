"""Sources: local JSONL / JSON / Parquet files and hub-layout directories through ``datasets.load_dataset``;
bad rows named by file, line or record, and field; skip mode; JSONL writing."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlmf.data.formats import DataError, FeedbackExample, PreferencePair, PromptOnly
from rlmf.data.sources import LoadReport, load_feedback, load_pairs, load_prompts, read_rows, write_jsonl

HH = "\n\nHuman: Name a colour.\n\nAssistant:"
PAIRS = [PreferencePair(f"P{i}:", f" good {i}", f" bad {i}") for i in range(4)]
CHAT_ROWS = [{"prompt": [{"role": "user", "content": f"q{i}"}],
              "chosen": [{"role": "assistant", "content": "yes"}],
              "rejected": [{"role": "assistant", "content": "no"}]} for i in range(3)]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def write_parquet(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


# --- local files ------------------------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "out" / "pairs.jsonl"
    assert write_jsonl(path, PAIRS) == 4
    pairs, report = load_pairs(path)
    assert pairs == PAIRS
    assert (report.rows, report.loaded, report.skipped) == (4, 4, 0)
    assert str(report) == f"loaded 4 of 4 rows from {path}"


def test_jsonl_locations_are_one_based_lines_and_skip_blank_lines(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ['{"prompt": "a"}', "", '{"prompt": "b"}'])
    assert list(read_rows(path)) == [(f"{path}:1", {"prompt": "a"}), (f"{path}:3", {"prompt": "b"})]


def test_jsonl_bad_field_names_file_line_and_field(tmp_path):
    lines = [json.dumps(p.to_row()) for p in PAIRS * 4] + ['{"prompt": "P", "chosen": 3, "rejected": "r"}']
    path = write_lines(tmp_path / "train.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(info.value) == f"{path}:17: field 'chosen' must be a string or a list of messages, got int"


def test_jsonl_invalid_json(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(PAIRS[0].to_row()), '{"prompt": "P", "chosen": '])
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(info.value) == f"{path}:2: invalid JSON: Expecting value (column 27)"


def test_jsonl_row_that_is_not_an_object(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ['["P", "c", "r"]'])
    with pytest.raises(DataError) as info:
        list(read_rows(path))
    assert str(info.value) == f"{path}:1: row must be a JSON object with fields, got list"


def test_json_list_and_data_object(tmp_path):
    rows = [p.to_row() for p in PAIRS]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(rows))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": rows, "version": 1}))
    assert load_pairs(listed)[0] == PAIRS
    assert load_pairs(wrapped)[0] == PAIRS


def test_json_bad_record_names_the_zero_based_record(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([PAIRS[0].to_row(), {"prompt": "P", "chosen": "c", "rejected": 1.5}]))
    with pytest.raises(DataError) as info:
        load_pairs(path)
    assert str(info.value) == (f"{path}: record 1 (0-based): field 'rejected' must be a string or a list of "
                               "messages, got float")


def test_json_file_errors(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"prompt": "P",\n}]')
    with pytest.raises(DataError, match=r"broken\.json:3: invalid JSON: Expecting property name"):
        load_pairs(broken)
    scalar = tmp_path / "scalar.json"
    scalar.write_text('"just a string"')
    with pytest.raises(DataError) as info:
        load_pairs(scalar)
    assert str(info.value) == f'{scalar}: a .json data file must hold a list of rows or {{"data": [rows]}}, got str'


def test_parquet_with_chat_messages(tmp_path):
    path = write_parquet(str(tmp_path / "chat.parquet"), CHAT_ROWS)
    pairs, _ = load_pairs(path)
    assert pairs[2] == PreferencePair("\n\nHuman: q2\n\nAssistant:", " yes", " no", CHAT_ROWS[2]["prompt"],
                                      CHAT_ROWS[2]["chosen"], CHAT_ROWS[2]["rejected"])


def test_parquet_bad_record(tmp_path):
    rows = [{"prompt": "P", "completion": " c", "label": label} for label in (1, 0, 3)]
    path = write_parquet(str(tmp_path / "fb.parquet"), rows)
    with pytest.raises(DataError) as info:
        load_feedback(path)
    assert str(info.value) == f"{path}: record 2 (0-based): field 'label' must be a bool or 0/1, got int 3"


def test_feedback_and_prompts_from_jsonl(tmp_path):
    path = tmp_path / "fb.jsonl"
    write_jsonl(path, [FeedbackExample("P:", " c", True), {"prompt": "Q:", "completion": " d", "label": 0}])
    assert load_feedback(path)[0] == [FeedbackExample("P:", " c", True), FeedbackExample("Q:", " d", False)]
    assert load_prompts(path)[0] == [PromptOnly("P:"), PromptOnly("Q:")]


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file or directory$"):
        load_pairs(str(tmp_path / "missing.jsonl"))
    csv = tmp_path / "t.csv"
    csv.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match=r"t\.csv: unsupported file type; use a \.jsonl, \.json, \.parquet file"):
        load_pairs(csv)
    jsonl = write_lines(tmp_path / "t.jsonl", [json.dumps(PAIRS[0].to_row())])
    with pytest.raises(DataError, match="apply only to hub datasets"):
        load_pairs(jsonl, subset="harmless")
    empty = write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows$"):
        load_pairs(empty)
    with pytest.raises(ValueError, match="on_bad_row='ignore' is not one of"):
        load_pairs(jsonl, on_bad_row="ignore")


# --- skip mode --------------------------------------------------------------------------------------------------


def test_skip_mode_counts_and_keeps_the_first_reasons(tmp_path):
    good = json.dumps(PAIRS[0].to_row())
    bad = ['{"prompt": "P", "chosen": 3, "rejected": "r"}', "not json",
           '{"prompt": "", "chosen": "c", "rejected": "r"}', '{"prompt": "P"}',
           '{"prompt": "P", "chosen": "c", "rejected": []}', '{"prompt": "P", "chosen": "c"}']
    path = write_lines(tmp_path / "t.jsonl", [good] + bad + [good])
    pairs, report = load_pairs(path, on_bad_row="skip")
    assert pairs == [PAIRS[0], PAIRS[0]]
    assert (report.rows, report.loaded, report.skipped) == (8, 2, 6)
    assert report.skip_reasons == [
        f"{path}:2: field 'chosen' must be a string or a list of messages, got int",
        f"{path}:3: invalid JSON: Expecting value (column 1)",
        f"{path}:4: field 'prompt' is empty",
        f"{path}:5: field 'chosen' is missing (preference rows have 'prompt', 'chosen' and 'rejected', or HH-style "
        "only 'chosen' and 'rejected'; found fields: 'prompt')",
        f"{path}:6: field 'rejected' is an empty list of messages",
    ]
    assert str(report).startswith(f"loaded 2 of 8 rows from {path}; skipped 6 bad rows: {path}:2: field 'chosen'")
    assert str(report).endswith(", ...")


def test_skip_mode_with_nothing_left_is_an_error(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ['{"prompt": "P"}'])
    with pytest.raises(DataError, match=r"loaded 0 of 1 rows .*skipped 1 bad rows.*: no usable rows$"):
        load_pairs(path, on_bad_row="skip")


def test_load_report_str():
    assert str(LoadReport("s", rows=3, loaded=2, skipped=1, skip_reasons=["s:2: x"])) == (
        "loaded 2 of 3 rows from s; skipped 1 bad rows: s:2: x")


# --- hub layout through datasets.load_dataset -------------------------------------------------------------------


@pytest.fixture
def hub_repo(tmp_path):
    """A directory laid out like a hub dataset repo with train and test splits."""
    root = tmp_path / "org__prefs"
    write_parquet(str(root / "data" / "train-00000-of-00001.parquet"), [p.to_row() for p in PAIRS])
    write_parquet(str(root / "data" / "test-00000-of-00001.parquet"),
                  [PAIRS[0].to_row(), {"prompt": "P", "chosen": "", "rejected": None}])
    return str(root)


def test_hub_splits(hub_repo, offline_datasets):
    assert load_pairs(hub_repo, split="train")[0] == PAIRS
    with pytest.raises(DataError) as info:
        load_pairs(hub_repo, split="test")
    assert str(info.value) == (f"{hub_repo} (split 'test'): record 1 (0-based): field 'rejected' is null "
                               "(preference rows have 'prompt', 'chosen' and 'rejected', or HH-style only 'chosen' "
                               "and 'rejected')")
    pairs, report = load_pairs(hub_repo, split="test", on_bad_row="skip")
    assert pairs == [PAIRS[0]] and report.skipped == 1


def test_hub_unknown_split(hub_repo, offline_datasets):
    with pytest.raises(DataError) as info:
        load_pairs(hub_repo, split="validation")
    assert str(info.value).startswith(f"{hub_repo} (split 'validation'): cannot load dataset: ValueError: ")
    assert "validation" in str(info.value) and "train" in str(info.value)


def test_hub_subsets_from_readme_configs(tmp_path, offline_datasets):
    root = tmp_path / "org__hh"
    for subset in ("harmless", "helpful"):
        prompt = f"\n\nHuman: {subset}?\n\nAssistant:"
        rows = [{"chosen": prompt + " yes", "rejected": prompt + " no"}]
        write_parquet(str(root / subset / "train-00000-of-00001.parquet"), rows)
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: harmless\n  data_files:\n  - split: train\n    path: harmless/train-*\n"
        "- config_name: helpful\n  data_files:\n  - split: train\n    path: helpful/train-*\n"
        "---\n# HH-like\n")
    pairs, _ = load_pairs(str(root), subset="helpful", split="train", transcripts="raw")
    assert pairs == [PreferencePair("\n\nHuman: helpful?\n\nAssistant:", " yes", " no")]
    assert load_prompts(str(root), subset="harmless", transcripts="raw")[0] == [
        PromptOnly("\n\nHuman: harmless?\n\nAssistant:")]
    assert load_prompts(str(root), subset="harmless")[0] == [
        PromptOnly("\n\nHuman: harmless?\n\nAssistant:", [{"role": "user", "content": "harmless?"}])]
    with pytest.raises(DataError, match=r"\(subset 'nope', split 'train'\): cannot load dataset: ValueError: .*nope"):
        load_pairs(str(root), subset="nope")


def test_hub_data_dir_folders(tmp_path, offline_datasets):
    # HH-RLHF's layout: plain folders and no configs, selected with data_dir.
    root = tmp_path / "org__hh_plain"
    for folder in ("harmless-base", "helpful-base"):
        (root / folder).mkdir(parents=True)
        write_lines(root / folder / "train.jsonl",
                    [json.dumps({"chosen": f"{HH} {folder}", "rejected": f"{HH} no"})])
    pairs, report = load_pairs(str(root), data_dir="helpful-base", transcripts="raw")
    assert pairs == [PreferencePair(HH, " helpful-base", " no")]
    assert report.source == str(root)
    assert len(load_pairs(str(root))[0]) == 2  # without data_dir, every folder


def test_hub_id_offline_is_a_data_error(offline_datasets):
    with pytest.raises(DataError, match=r"^no-such-org/no-such-dataset \(split 'train'\): cannot load dataset"):
        load_pairs("no-such-org/no-such-dataset")
