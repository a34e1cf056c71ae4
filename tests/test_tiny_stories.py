"""tiny_stories.py: download (against a loopback HTTP server), safe unpacking, tokenization.

The archive the server hands out is built here in the real TinyStories layout: a tar.gz of
data00.json, data01.json, ..., each a JSON list of objects with a "story" key among others."""

import io
import json
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest

import tiny_stories
from tiny_stories import download_file, prepare, tokenize_stories, unpack
from tokenizer import ConfigError

REPO = Path(__file__).resolve().parents[1]

SHARDS = [
    ["Once upon a time, there was a little cat named Tom.", "  Lily saw a big red ball.\nShe was happy.  ",
     "The sun said: \"Good morning!\" 🌞", "A story that mentions <|end_of_text|> as plain text."],
    ["Ben had a toy car. It was fast.", "\n\nThe dog and the bird became friends.\n", "Mia liked to sing."],
    ["Sam found a shiny stone by the river.", "The end."],
]


def story_record(story: str) -> dict:
    return {"story": story, "instruction": {"prompt:": "Write a short story...", "words": ["cat", "ball"],
                                            "features": ["Dialogue"]},
            "summary": "A short story.", "source": "GPT-4"}


def make_archive(shards=SHARDS) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for i, stories in enumerate(shards):
            add_file(tf, f"data{i:02d}.json", json.dumps([story_record(s) for s in stories]).encode())
    return buf.getvalue()


def add_file(tf, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


class LoopbackServer:
    """Serves one payload on 127.0.0.1 and records the Range header of each request.
    status: answer every request with this error instead. cut_at: on the first `cuts` requests,
    send only this many bytes (after announcing them all) and drop the connection. honour_range:
    answer a Range request with 206 and the rest of the payload, else with all of it (200).
    After max_requests requests, answer 503."""

    def __init__(self, payload: bytes, status=None, cut_at=None, cuts=1, honour_range=True, max_requests=10):
        self.payload, self.ranges = payload, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a stuck client cannot hang the test

            def do_GET(self):
                server.ranges.append(self.headers.get("Range"))
                if server.status or len(server.ranges) > max_requests:
                    self.send_error(server.status or 503)
                    return
                body, code, extra = server.payload, 200, {}
                rng = self.headers.get("Range")
                if rng and server.honour_range:
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    code, body = 206, body[start:]
                    extra["Content-Range"] = f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}"
                self.send_response(code)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(len(body)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                if server.cut_at is not None and len(server.ranges) <= server.cuts:
                    self.wfile.write(body[:server.cut_at])
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.status, self.cut_at, self.cuts, self.honour_range = status, cut_at, cuts, honour_range
        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/TinyStories_all_data.tar.gz"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def serve():
    servers = []

    def start(payload, **behaviour):
        servers.append(LoopbackServer(payload, **behaviour))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def fetch(url, path, **kw):
    # 1 KiB chunks: a cut after a whole number of KiB keeps every byte sent, so resumes are exact
    return download_file(url, path, retry_wait=0, timeout=10, chunk_size=1024, **kw)


def big_payload() -> bytes:
    """An archive with 20 kB of incompressible bytes after it, to cut the transfer well inside."""
    return make_archive() + np.random.default_rng(0).bytes(20_000)


# -----------------------------------------------------------------------------
# download


def test_download_fetches_the_whole_file(serve, tmp_path):
    payload = make_archive()
    server = serve(payload)
    path = fetch(server.url, tmp_path / "a.tar.gz")
    assert path.read_bytes() == payload
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar.gz"]
    assert server.ranges == [None]


def test_download_resumes_with_a_range_request_after_the_connection_is_cut(serve, tmp_path):
    payload = big_payload()
    server = serve(payload, cut_at=5 * 1024)
    path = fetch(server.url, tmp_path / "a.tar.gz")
    assert path.read_bytes() == payload
    assert server.ranges == [None, "bytes=5120-"]


def test_download_resumes_a_part_file_left_by_an_earlier_run(serve, tmp_path):
    payload = make_archive()
    (tmp_path / "a.tar.gz.part").write_bytes(payload[:100])
    server = serve(payload)
    assert fetch(server.url, tmp_path / "a.tar.gz").read_bytes() == payload
    assert server.ranges == ["bytes=100-"]
    assert not (tmp_path / "a.tar.gz.part").exists()


def test_download_renames_a_part_file_that_was_already_complete(serve, tmp_path):
    payload = make_archive()
    (tmp_path / "a.tar.gz.part").write_bytes(payload)
    server = serve(payload)  # answers 416 with the full size
    assert fetch(server.url, tmp_path / "a.tar.gz").read_bytes() == payload


def test_download_starts_over_when_the_server_ignores_range(serve, tmp_path):
    payload = make_archive()
    (tmp_path / "a.tar.gz.part").write_bytes(b"x" * 100)
    server = serve(payload, honour_range=False)
    assert fetch(server.url, tmp_path / "a.tar.gz").read_bytes() == payload


def test_download_skips_a_file_already_downloaded(serve, tmp_path):
    (tmp_path / "a.tar.gz").write_bytes(b"done")
    server = serve(b"other")
    assert fetch(server.url, tmp_path / "a.tar.gz").read_bytes() == b"done"
    assert server.ranges == []


@pytest.mark.parametrize("status", [404, 500])
def test_a_server_error_is_a_clear_error_and_leaves_no_file(serve, tmp_path, status):
    server = serve(b"", status=status)
    with pytest.raises(ConfigError, match=f"downloading {server.url} failed: HTTP {status}") as e:
        fetch(server.url, tmp_path / "a.tar.gz")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_download_cut_on_every_try_gives_up_keeping_only_the_part_file(serve, tmp_path):
    server = serve(big_payload(), cut_at=1024, cuts=99)
    with pytest.raises(ConfigError, match="failed after 3 attempts .*a.tar.gz.part keeps the 3072 bytes "
                                          "received, run again to resume"):
        fetch(server.url, tmp_path / "a.tar.gz", retries=2)
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar.gz.part"]
    assert server.ranges == [None, "bytes=1024-", "bytes=2048-"]


def test_a_server_error_after_a_cut_keeps_the_part_file_for_the_next_run(serve, tmp_path):
    server = serve(big_payload(), cut_at=1024, max_requests=1)  # cut, then 503
    with pytest.raises(ConfigError, match="HTTP 503.*a.tar.gz.part keeps the 1024 bytes received"):
        fetch(server.url, tmp_path / "a.tar.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar.gz.part"]


# -----------------------------------------------------------------------------
# unpack


def test_unpack_extracts_the_json_shards(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(make_archive())
    dest = unpack(archive, tmp_path / "json")
    assert sorted(p.name for p in dest.iterdir()) == ["data00.json", "data01.json", "data02.json"]
    assert [r["story"] for r in json.loads((dest / "data01.json").read_text())] == SHARDS[1]
    assert not (tmp_path / "json.tmp").exists()


def evil_member(tf, kind):
    if kind in ("dotdot", "absolute"):
        add_file(tf, "../evil.json" if kind == "dotdot" else "/tmp/llama31-evil.json", b"[]")
    else:
        info = tarfile.TarInfo("link.json")
        info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)


@pytest.mark.parametrize("kind, why", [("dotdot", "outside the target"), ("absolute", "absolute path"),
                                       ("symlink", "link"), ("hardlink", "link")])
def test_unpack_refuses_members_that_could_escape(tmp_path, kind, why):
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        add_file(tf, "data00.json", b"[]")
        evil_member(tf, kind)
    with pytest.raises(ConfigError, match=why) as e:
        unpack(archive, tmp_path / "out" / "json")
    assert str(archive) in str(e.value)
    assert list((tmp_path / "out").iterdir()) == []  # nothing half-unpacked left behind
    assert not (tmp_path / "out" / "evil.json").exists() and not (tmp_path / "evil.json").exists()


def test_unpack_of_a_corrupt_archive_is_a_clear_error(tmp_path):
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(make_archive()[:200])
    with pytest.raises(ConfigError, match="could not unpack .*a.tar.gz .*delete it"):
        unpack(archive, tmp_path / "json")
    assert not (tmp_path / "json").exists()


# -----------------------------------------------------------------------------
# tokenize (the whole pipeline runs once for this module, with two worker processes)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("tinystories")
    server = LoopbackServer(make_archive())
    try:
        results = prepare(server.url, out, workers=2)
    finally:
        server.close()
    return out, results


def read_shard(path):
    """(header ints, tokens) read straight from the file."""
    return np.fromfile(path, dtype="<i4", count=256), np.fromfile(path, dtype="<u4", offset=1024)


def split_stories(tokens, tokenizer):
    """Cut a token stream into BOS ... EOS documents, checking the framing, and decode each."""
    starts = np.flatnonzero(tokens == tokenizer.bos_id).tolist()
    assert starts[0] == 0
    docs = [tokens[a:b] for a, b in zip(starts, starts[1:] + [len(tokens)])]
    assert all(d[-1] == tokenizer.eos_id and tokenizer.eos_id not in d[1:-1] for d in docs)
    return [tokenizer.decode(d[1:-1].tolist()) for d in docs]


def test_shard_0_becomes_val_and_the_rest_train(prepared):
    out, results = prepared
    names = [Path(p).name for p, _, _ in results]
    assert names == ["TinyStories_val.bin", "TinyStories_train_001.bin", "TinyStories_train_002.bin"]
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(names)
    assert [n for _, n, _ in results] == [len(s) for s in SHARDS]


def test_tokenized_shards_decode_back_to_the_stripped_stories(prepared, tokenizer):
    out, _ = prepared
    files = ["TinyStories_val.bin", "TinyStories_train_001.bin", "TinyStories_train_002.bin"]
    for name, stories in zip(files, SHARDS):
        decoded = split_stories(read_shard(out / name)[1], tokenizer)
        assert sorted(decoded) == sorted(s.strip() for s in stories)


def test_tokenized_shards_have_the_right_header(prepared):
    out, results = prepared
    for path, _, ntok in results:
        header, tokens = read_shard(path)
        assert list(header[:3]) == [20240801, 7, len(tokens)] and not header[3:].any()
        assert ntok == len(tokens) and Path(path).stat().st_size == 1024 + 4 * len(tokens)


def test_tokenized_shards_load_in_the_data_loader(prepared):
    from llama31 import DistributedShardedDataLoader
    out, results = prepared
    loader = DistributedShardedDataLoader(str(out / "TinyStories_train_*.bin"), B=1, T=4)
    assert loader.ntok_total == sum(n for p, _, n in results if "train" in p)


def test_each_shard_is_shuffled_with_a_fixed_seed(tokenizer):
    stories = [f"Story number {i}." for i in range(30)]
    first = tokenize_stories(stories, tokenizer, seed=1337)
    assert tokenize_stories(stories, tokenizer, seed=1337) == first
    decoded = split_stories(np.array(first, dtype=np.uint32), tokenizer)
    assert decoded != stories and sorted(decoded) == sorted(stories)
    assert tokenize_stories(stories, tokenizer, seed=1338) != first


def test_whitespace_only_stories_are_dropped(tokenizer):
    tokens = tokenize_stories(["  ", "A cat.", "\n"], tokenizer, seed=0)
    assert list(tokens) == tokenizer.encode("A cat.", bos=True, eos=True)


def test_a_json_shard_without_stories_is_a_clear_error(tmp_path):
    bad = tmp_path / "data00.json"
    bad.write_text(json.dumps([{"text": "no story key"}]))
    with pytest.raises(ConfigError, match="data00.json is not a JSON list of"):
        tiny_stories.read_stories(bad)


# -----------------------------------------------------------------------------
# command line


def test_help_documents_the_options_and_outputs():
    out = subprocess.run([sys.executable, "tiny_stories.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    for text in ["--url", "--out_dir", "--tokenizer_path", "--workers", "TinyStories_val.bin",
                 "TinyStories_train_0NN.bin", "20240801"]:
        assert text in out


@pytest.mark.parametrize("kwargs, problem", [({"workers": 0}, "--workers must be at least 1"),
                                             ({"tokenizer_path": "missing.model"}, "missing.model does not exist")])
def test_bad_options_fail_before_downloading(serve, tmp_path, kwargs, problem):
    server = serve(make_archive())
    with pytest.raises(ConfigError, match=problem):
        prepare(server.url, tmp_path / "ts", **kwargs)
    assert server.ranges == []


def test_cli_reports_a_server_error_as_one_line(serve, tmp_path, capsys):
    server = serve(b"", status=404)
    with pytest.raises(SystemExit) as e:
        tiny_stories.main(["--url", server.url, "--out_dir", str(tmp_path / "ts")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: downloading ") and "HTTP 404" in err[-1]
