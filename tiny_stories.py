"""
Download TinyStories and tokenize it with the Llama 3 tokenizer into token shards for llama31.py.

    python tiny_stories.py                          # everything goes into ./tinystories/
    python tiny_stories.py --out_dir data --workers 8

Three steps; a rerun skips a finished download or unpack and resumes an unfinished download:
1. download TinyStories_all_data.tar.gz (about 1.5 GB). Bytes go to a .part file; a cut
   connection, or an earlier run that was interrupted, resumes with an HTTP Range request, and the
   archive gets its real name only once its size matches what the server announced.
2. unpack it into OUT/TinyStories_all_data/ (data00.json .. data49.json, each a JSON list of
   {"story": ..., ...}), refusing any member that would land outside that directory.
3. tokenize the JSON shards in parallel processes: each story is stripped and wrapped as
   <|begin_of_text|> story <|end_of_text|>, the stories of a shard are shuffled with a fixed seed
   (1337 + shard index), and each shard becomes one .bin file, written atomically:
       data00.json -> OUT/TinyStories_val.bin            (the validation split)
       dataNN.json -> OUT/TinyStories_train_0NN.bin      (the training split)
   Tokenization always runs, overwriting earlier .bin files.

A .bin shard is a header of 256 int32 (magic 20240801, version 7, token count) followed by the
tokens as uint32; llama31.DistributedShardedDataLoader reads them, for example with the pattern
OUT/TinyStories_train_*.bin.
"""

import argparse
import json
import os
import random
import re
import shutil
import sys
import tarfile
import time
import zlib
from array import array
from multiprocessing import Pool
from pathlib import Path

import requests
from tqdm import tqdm

from formats import write_datafile
from errors import ConfigError
from tokenizer import Tokenizer, find_tokenizer_model

URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
ARCHIVE_NAME = "TinyStories_all_data.tar.gz"
JSON_DIR_NAME = "TinyStories_all_data"
SHUFFLE_SEED = 1337


# -----------------------------------------------------------------------------
# download: resumable, verified, renamed only when complete


class IncompleteDownload(Exception):
    """The transfer ended early or the server answered a resume oddly; worth another try."""


def parse_content_range(value):
    """'bytes START-END/TOTAL' (or 'bytes */TOTAL') -> (START or None, TOTAL or None)."""
    m = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    return start, int(m.group(2)) if m.group(2) != "*" else None


def download_once(url: str, part: Path, timeout: float, chunk_size: int):
    """One request: append to `part` from where it ends (or start it afresh), and check that it
    ends up exactly as long as the server said. Raises IncompleteDownload when it does not."""
    have = part.stat().st_size if part.exists() else 0
    # identity: we want the archive's bytes as stored, and byte counts that match Content-Length
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        if resp.status_code == 416 and have:
            _, total = parse_content_range(resp.headers.get("Content-Range"))
            if total == have:  # an earlier run got every byte but stopped before the rename
                return
            part.unlink()
            raise IncompleteDownload(f"the server refused to resume at byte {have}; starting over")
        if resp.status_code == 206:
            start, total = parse_content_range(resp.headers.get("Content-Range"))
            if start != have:
                part.unlink()
                raise IncompleteDownload(f"asked to resume at byte {have}, the server sent from "
                                         f"{start}; starting over")
            mode = "ab"
        elif resp.status_code == 200:  # a fresh download, or a server that ignores Range
            have, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise ConfigError(f"downloading {url} failed: HTTP {resp.status_code} {resp.reason}; "
                              f"check --url, or run again later if the server is down")
        with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=part.name[:-len(".part")]) as bar:
            for chunk in resp.iter_content(chunk_size):
                f.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if total is None:
        print(f"note: the server did not say how long {url} is, so its size is unchecked", file=sys.stderr)
    elif got != total:
        if got > total:
            part.unlink()
        raise IncompleteDownload(f"got {got} of {total} bytes")


def download_file(url: str, path, retries: int = 5, retry_wait: float = 2.0, timeout: float = 60.0,
                  chunk_size: int = 1 << 18) -> Path:
    """Download url to path, resuming from path.part if an earlier run left one and after each
    connection cut (up to `retries` times). A file under `path` is always complete. A cut loses
    the chunk being read (urllib3 drops a short read), so chunks stay small."""
    path = Path(path)
    if path.exists():
        print(f"{path} already downloaded", file=sys.stderr)
        return path
    part = path.with_name(path.name + ".part")
    problem = None
    for attempt in range(retries + 1):
        if attempt:
            print(f"download interrupted ({problem}); resuming (retry {attempt} of {retries})", file=sys.stderr)
            time.sleep(retry_wait * attempt)
        try:
            download_once(url, part, timeout, chunk_size)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                IncompleteDownload) as e:
            problem = e
            continue
        except ConfigError as e:  # an HTTP error status: retrying right away would not help
            raise ConfigError(f"{e}{kept_note(part)}") from None
        except requests.RequestException as e:  # a malformed URL, an unsupported scheme, ...
            raise ConfigError(f"cannot download {url} ({e}); check --url") from None
        os.replace(part, path)
        return path
    raise ConfigError(f"downloading {url} failed after {retries + 1} attempts ({problem}){kept_note(part)}")


def kept_note(part: Path) -> str:
    if not part.exists():
        return ""
    return f"; {part} keeps the {part.stat().st_size} bytes received, run again to resume"


# -----------------------------------------------------------------------------
# unpack: only plain files and directories, only inside the target directory


def check_member(member: tarfile.TarInfo, dest: Path, archive):
    """Refuse a member that could write outside dest: absolute paths, '..', links, devices."""
    why = None
    if os.path.isabs(member.name):
        why = "is an absolute path"
    elif not (dest / member.name).resolve().is_relative_to(dest.resolve()):
        why = "points outside the target directory"
    elif member.issym() or member.islnk():
        why = f"is a link (to {member.linkname!r})"
    elif not (member.isfile() or member.isdir()):
        why = "is not a plain file or directory"
    if why:
        raise ConfigError(f"{archive} holds {member.name!r}, which {why}; refusing to unpack it "
                          f"(is this the TinyStories archive? delete it and run again)")


def unpack(archive, dest) -> Path:
    """Extract archive into dest. It is unpacked into dest.tmp and renamed when done, so dest
    only exists once complete; an existing dest is kept as it is."""
    archive, dest = Path(archive), Path(dest)
    if dest.is_dir():
        print(f"{dest} already unpacked", file=sys.stderr)
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The 'data' filter (Python >= 3.11.4) is a second guard behind check_member.
    extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with tarfile.open(archive, "r:*") as tf:
            for member in tqdm(tf, desc=f"unpacking {archive.name}", unit=" files"):
                check_member(member, tmp, archive)
                tf.extract(member, tmp, **extra)
        os.replace(tmp, dest)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"could not unpack {archive} ({e}); delete it and run again to download "
                          f"it afresh") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# -----------------------------------------------------------------------------
# tokenize: one process per JSON shard at a time, one .bin per JSON shard


def shard_output_name(index: int) -> str:
    return "TinyStories_val.bin" if index == 0 else f"TinyStories_train_{index:03d}.bin"


def read_stories(json_path) -> list:
    try:
        examples = json.loads(Path(json_path).read_text(encoding="utf-8"))
        return [ex["story"] for ex in examples]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{json_path} is not a JSON list of {{'story': ...}} objects ({e!r}); "
                          f"delete the unpacked directory and run again") from None


def tokenize_stories(stories, tokenizer: Tokenizer, seed: int) -> array:
    """BOS story EOS for each non-empty stripped story, in an order shuffled by `seed`."""
    stories = [s.strip() for s in stories]
    random.Random(seed).shuffle(stories)
    tokens = array("I")  # 4 bytes a token; a list of Python ints would take 7 times as much
    for story in stories:
        if story:
            tokens.extend(tokenizer.encode(story, bos=True, eos=True))
    return tokens


def tokenize_shard(job):
    """Worker: one JSON shard -> one .bin shard. Returns (output path, stories kept, tokens).
    Loading the tokenizer per shard costs well under a second, against minutes of encoding."""
    index, json_path, out_path, tokenizer_path = job
    stories = read_stories(json_path)
    tokenizer = Tokenizer(tokenizer_path)
    ntok = write_datafile(out_path, tokenize_stories(stories, tokenizer, SHUFFLE_SEED + index))
    return out_path, sum(1 for s in stories if s.strip()), ntok


def tokenize(json_dir, out_dir, tokenizer_path, workers: int):
    """Tokenize every *.json in json_dir (sorted; the first is val, the rest train) with
    `workers` processes. Returns [(path, stories, tokens)] in shard order."""
    json_files = sorted(Path(json_dir).glob("*.json"))
    if not json_files:
        raise ConfigError(f"no .json shards in {json_dir}; delete it and run again to unpack afresh")
    jobs = [(i, str(p), str(Path(out_dir) / shard_output_name(i)), str(tokenizer_path))
            for i, p in enumerate(json_files)]
    with Pool(workers) as pool:
        results = list(tqdm(pool.imap_unordered(tokenize_shard, jobs), total=len(jobs),
                            desc="tokenizing", unit=" shard"))
    order = {job[2]: job[0] for job in jobs}
    return sorted(results, key=lambda r: order[r[0]])


# -----------------------------------------------------------------------------
# the whole pipeline, and its command line


def prepare(url: str = URL, out_dir="tinystories", tokenizer_path=None, workers=None):
    """Download, unpack and tokenize; returns [(path, stories, tokens)] of the .bin files."""
    out_dir = Path(out_dir)
    tokenizer_path = find_tokenizer_model(tokenizer_path)  # fail before a long download
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out_dir {out_dir} is a file; give a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = download_file(url, out_dir / ARCHIVE_NAME)
    json_dir = unpack(archive, out_dir / JSON_DIR_NAME)
    return tokenize(json_dir, out_dir, tokenizer_path, workers)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="tiny_stories.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=URL, help="where to download TinyStories_all_data.tar.gz "
                        "(default: the Hugging Face copy)")
    parser.add_argument("--out_dir", default="tinystories",
                        help="directory for the archive, the unpacked JSON and the .bin shards (default: %(default)s)")
    parser.add_argument("--tokenizer_path", default=None,
                        help="Llama 3 tokenizer.model (default: the copy in the llama-models package)")
    parser.add_argument("--workers", type=int, default=None,
                        help="tokenizer processes (default: one per CPU core)")
    args = parser.parse_args(argv)
    try:
        results = prepare(args.url, args.out_dir, args.tokenizer_path, args.workers)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for path, nstories, ntok in results:
        print(f"{path}: {nstories:,} stories, {ntok:,} tokens")
    print(f"train on {Path(args.out_dir) / 'TinyStories_train_*.bin'}, "
          f"validate on {Path(args.out_dir) / 'TinyStories_val.bin'}")


if __name__ == "__main__":
    main()
