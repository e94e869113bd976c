"""Structured events (issue 20, item 2): with LOG_FORMAT=json an event's numbers are fields of
their own, and the summary carries the exit code at the top; as text, only the line."""

from __future__ import annotations

import io
import json
import logging

from common_s3 import log_event, progress_data, setup_logging


def logged(fmt: str, *args) -> str:
    stream = io.StringIO()
    setup_logging("INFO", fmt, "zipper", "w1")
    handler = logging.getLogger().handlers[0]
    handler.setStream(stream)
    log_event(logging.getLogger("t"), logging.INFO, *args)
    return stream.getvalue()


def test_an_event_is_fields_in_json_and_only_words_as_text():
    line = json.loads(logged("json", "part_uploaded", {"files": 3, "bytes": 4096, "seconds": 0.5},
                             "part uploaded: %d files", 3))
    assert line["event"] == "part_uploaded" and line["worker"] == "w1" and line["script"] == "zipper"
    assert line["fields"] == {"files": 3, "bytes": 4096, "seconds": 0.5}
    assert line["message"] == "part uploaded: 3 files" and "exit_code" not in line
    text = logged("text", "part_uploaded", {"files": 3}, "part uploaded: %d files", 3)
    assert text.rstrip().endswith("zipper part uploaded: 3 files"), text


def test_the_summary_has_its_exit_code_at_the_top():
    line = json.loads(logged("json", "summary", {"exit_code": 3, "units_done": 2}, "summary"))
    assert line["exit_code"] == 3 == line["fields"]["exit_code"]


def test_progress_numbers_give_the_eta_in_seconds():
    snap = {"units_done": 1, "units_total": 4, "units_failed": 0, "units_interrupted": 0, "bytes_done": 100,
            "bytes_total": 400, "bytes_per_s": 50.0, "elapsed_s": 2.0}
    assert progress_data(snap)["eta_s"] == 6.0
    assert progress_data({**snap, "bytes_per_s": 0})["eta_s"] is None
