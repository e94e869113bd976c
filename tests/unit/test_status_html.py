"""The status page (--status --html FILE): rendered from a fake collect_status() dict."""

import re

import pytest

import common_s3

from common_s3 import (ROOT_LABEL, ConfigError, Heartbeat, HeartbeatRecord, Layout, Runtime, add_sample,
                       render_status_page, split_html_option, throughput_svg, write_status_page)


def beat(script, worker, *, state="running", stale=False, history=(), **extra):
    return {"script": script, "worker": worker, "state": state, "stale": stale, "age_s": 12.0,
            "interval_s": 30, "updated_at": "2026-01-01T10:05:00Z", "units_done": 3, "units_failed": 0,
            "bytes_per_s": 2048.0, "current": ["Photos"], "mode": "claims", "last_error": None,
            "history": [list(h) for h in history], **extra}


def folder(name, **extra):
    return {"folder": name, "stem": name or "~root", "files": 4, "bytes": 4096, "parts": 2, "uploaded": 1,
            "restored": 0, "large": 0, "large_done": 0, "verified": "no", "bytes_to_upload": 2048,
            "bytes_to_restore": 4096, "last_error": "", **extra}


def fake_status():
    history = [("2026-01-01T10:00:00Z", 0), ("2026-01-01T10:00:30Z", 30_000), ("2026-01-01T10:01:00Z", 90_000)]
    return {
        "generation": 1, "mapped_at": "2026-01-01T09:59:00Z", "mode": "claims",
        "folders": [folder("Photos"), folder("<script>alert(1)</script>", last_error="zipper: <b>boom</b>"),
                    folder("Ünïcode & more"), folder("")],
        "heartbeats": {
            "zipper": [beat("zipper", "w1", history=history,
                            aws_secret_access_key="SECRETKEY123", endpoint="http://10.0.0.1:9000")],
            "unzipper": [beat("unzipper", "w2", stale=True, last_error="rclone said <no>"),
                         beat("unzipper", "w3", state="unfinished",
                              last_error="Could not connect to the endpoint URL: https://s3.internal:9000/bkt "
                                         "(key AKIAABCDEFGHIJKLMNOP)")],
        },
        "claims": [{"stage": "zipper", "stem": "Photos", "unit": "Photos_Part1.zip", "worker": "w1",
                    "held_for_s": 40.0, "since_renewal_s": 5.0, "lease_seconds": 300, "stale": False}],
        "generations": [1], "pause": None, "proof": None,
        "history": [{"generation": 1, "state": "mapped", "mapped_at": "2026-01-01T09:59:00Z", "previous": None,
                     "changes": None, "files": 16, "folders": 4, "new_parts": 8, "uploaded": 4, "restored": 0,
                     "verified": 0, "deletions_handled": 0}],
    }


def test_every_folder_present_and_escaped():
    page = render_status_page(fake_status(), "mig/", "2026-01-01T10:06:00Z")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "zipper: &lt;b&gt;boom&lt;/b&gt;" in page and "<b>boom</b>" not in page
    assert "rclone said &lt;no&gt;" in page
    assert "Ünïcode &amp; more" in page
    folders = re.findall(r'<span class="folder">(.*?)</span>', page)
    assert folders == ["Photos", "&lt;script&gt;alert(1)&lt;/script&gt;", "Ünïcode &amp; more", ROOT_LABEL]


def test_self_contained_and_no_credentials():
    page = render_status_page(fake_status(), "mig/", "2026-01-01T10:06:00Z")
    assert "http" not in page.lower()  # no asset link, no endpoint
    assert not re.search(r"<(script|link|img|iframe)\b", page)
    assert "SECRETKEY123" not in page and "10.0.0.1" not in page
    assert "s3.internal" not in page and "AKIAABCDEFGHIJKLMNOP" not in page
    assert "Could not connect to the endpoint URL: [hidden]" in page
    assert "<svg" in page and "<polyline" in page
    assert "stale" in page and "live" in page


def test_no_map_yet():
    status = {"generation": None, "folders": [], "heartbeats": {}, "claims": [], "generations": [],
              "pause": None, "proof": None, "mode": None}
    page = render_status_page(status, "", "2026-01-01T10:06:00Z")
    assert "no complete map yet" in page and "no throughput history yet" in page


def test_throughput_lines_break_at_gaps():
    history = [("2026-01-01T10:00:00Z", 0), ("2026-01-01T10:00:30Z", 3000),
               ("2026-01-01T12:00:00Z", 3000), ("2026-01-01T12:00:30Z", 6000)]
    svg = throughput_svg({"zipper": [beat("zipper", "w1", history=history)]})
    assert svg.count("<polyline") == 2


@pytest.mark.parametrize("argv, expected", [
    (["--status"], (["--status"], None)),
    (["--status", "--html", "p.html"], (["--status"], "p.html")),
    (["--html", "p.html", "--status"], (["--status"], "p.html")),
])
def test_split_html_option(argv, expected):
    assert split_html_option(argv) == expected


@pytest.mark.parametrize("argv, words", [
    (["--html", "p.html"], "only with --status"),
    (["--status", "--html"], "needs a file"),
    (["--status", "--html", "--verify"], "needs a file"),
])
def test_split_html_option_refuses(argv, words):
    with pytest.raises(ConfigError, match=words):
        split_html_option(argv)


def test_write_status_page(tmp_path):
    path = tmp_path / "status.html"
    write_status_page(str(path), "<p>x</p>")
    assert path.read_text() == "<p>x</p>"
    assert [p.name for p in tmp_path.iterdir()] == ["status.html"]
    with pytest.raises(ConfigError, match="--html"):
        write_status_page(str(tmp_path / "missing" / "status.html"), "x")


def test_add_sample_stays_bounded_and_spans_the_run():
    history: list = []
    for i in range(2000):
        history = add_sample(history, i, limit=288)
        assert len(history) <= 288
    assert history[0] == 0 and history[-1] == 1999
    assert history == sorted(history)
    assert history[-10:] == list(range(1990, 2000))  # recent samples kept at full resolution


def test_heartbeat_history_goes_on_from_the_previous_run(records, make_cfg):
    cfg = make_cfg()
    layout = Layout(cfg.prefix)
    first = Runtime()
    beat = Heartbeat(records, layout, cfg, first)
    first.progress.bytes_done = 1000
    beat.write("running")
    first.progress.bytes_done = 5000
    beat.write("finished")
    second = Runtime()
    beat = Heartbeat(records, layout, cfg, second)
    second.progress.bytes_done = 200
    beat.write("running")
    body = records.get_json(layout.heartbeat(cfg.script, cfg.worker_id))
    assert [moved for _t, moved in body["history"]] == [1000, 5000, 5200]
    assert HeartbeatRecord.from_json("k", body).history == body["history"]


def test_status_html_publishes_the_page_and_logs_its_link_once(records, make_cfg, s3, caplog):
    cfg = make_cfg(STATUS_HTML="1", STATUS_LINK_HOURS="2")
    records.cfg = cfg
    layout = Layout(cfg.prefix)
    with caplog.at_level("INFO", logger="common_s3"):
        with Heartbeat(records, layout, cfg, Runtime()):
            pass  # published once as it starts (its own thread), once as it ends
    got = s3.get_object(Bucket=cfg.bucket, Key=layout.status_page)
    assert got["ContentType"].startswith("text/html")
    page = got["Body"].read().decode()
    assert page.startswith("<!DOCTYPE html>") and "unit-worker" in page and "testing" not in page
    assert "finished" in page  # the last publish comes after the last heartbeat
    links = [r.getMessage() for r in caplog.records if r.getMessage().startswith("status page: ")]
    assert len(links) == 1 and "X-Amz-Signature=" in links[0] and "X-Amz-Expires=7200" in links[0]
    assert "for 2 h, STATUS_LINK_HOURS" in links[0]
    # The page is not taken for a worker's heartbeat.
    assert common_s3.collect_status(records, layout)["heartbeats"].keys() == {"zipper"}


def test_a_link_carrying_a_session_token_is_not_logged(records, make_cfg, monkeypatch):
    cfg = make_cfg(STATUS_HTML="1")
    monkeypatch.setattr(records, "presigned_get",
                        lambda key, s: f"https://h/{key}?X-Amz-Security-Token=TOKEN&X-Amz-Signature=x")
    line = common_s3.StatusPublisher(records, Layout(cfg.prefix), cfg).link_line()
    assert "TOKEN" not in line and "not logged" in line


@pytest.mark.parametrize("hours", ["0", "169", "soon"])
def test_status_link_hours_is_checked(make_cfg, hours):
    with pytest.raises(ConfigError, match="STATUS_LINK_HOURS"):
        make_cfg(STATUS_LINK_HOURS=hours)
