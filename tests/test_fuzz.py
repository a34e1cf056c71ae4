"""Damaged files. Every file the project reads is fed seeded corruptions (truncated, bytes flipped,
header overwritten, emptied, a directory in its place, another kind of file under its name) and
read through the public entry that reads it. Each case must end in a ConfigError whose message is
one line naming the file, with nothing written, or load exactly what the undamaged file holds.
Bytes flipped inside raw tensor or token data, which no format checksums, may load other values:
such cases are counted, not failed (NaN or infinity is still refused), as are flips that read as
another plausible number in a field no tensor shape shows (UNCHECKED). A case that raises anything
else, runs past SECONDS_PER_CASE or loads other values from damaged structure fails.

FUZZ_CASES=N runs N cases per reader (default 12, under a minute for all of them)."""

import hashlib
import json
import os
import random
import shutil
import signal
import struct
import time
import zipfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import export
import formats
import llama31
from conftest import make_checkpoint
from formats import save_hf, write_datafile
from llama31 import DistributedShardedDataLoader, finetune, load_checkpoint
from tokenizer import ConfigError

CASES = int(os.environ.get("FUZZ_CASES", 12))
SECONDS_PER_CASE = 30
SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=512)


# ----------------------------------------------------------------------------- fixtures: one of each file


def write_byte_tokenizer(path):
    """A Meta-format tokenizer.model of the 256 single bytes: 512 tokens with Meta's 256 specials."""
    import base64
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))


class Evil:
    """A pickle that runs code when unpickled: weights_only loading must refuse it."""

    def __reduce__(self):
        return exec, ("import os; os.environ['FUZZ_PICKLE_RAN'] = '1'",)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_gguf, smollm_path):
    """A Meta checkpoint, an HF one (whole and sharded), GGUFs, token shards and a finetune run to resume."""
    root = tmp_path_factory.mktemp("fuzz")
    meta = root / "meta"
    model = make_checkpoint(meta, seed=0, dtype=torch.float32, **SMALL)
    write_byte_tokenizer(meta / "tokenizer.model")
    hf, sharded = root / "hf", root / "hf_sharded"
    for path, shard_bytes in [(hf, 2**30), (sharded, 300_000)]:
        save_hf(model.state_dict(), model.args.to_params(), path, dtype=torch.float32, max_shard_bytes=shard_bytes)
        shutil.copy(meta / "tokenizer.model", path)
    (hf / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}))
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name in ("train_000.bin", "val.bin"):
        write_datafile(data / name, rng.integers(0, 512, 2000))
    run = root / "run"
    finetune(ckpt_dir=str(meta), out_dir=str(run), train_data=str(data / "train_*.bin"), val_data=str(data / "val.bin"),
             B=2, T=16, max_steps=2, stop_after=1, val_every=0, device="cpu", sample_prompts=[])
    evil = root / "evil.pt"
    torch.save({"x": Evil()}, evil)
    return dict(meta=meta, hf=hf, sharded=sharded, gguf=tiny_gguf, demo=smollm_path, data=data, run=run, evil=evil)


# ----------------------------------------------------------------------------- readers: what each returns


def loaded(llama) -> dict:
    """What a load gives: the configuration, every weight (and quantized buffer), the vocabulary."""
    tok = llama.tokenizer
    return {"args": asdict(llama.model.args), "state": llama.model.state_dict(),
            "vocab": tok and (tok.vocab.mergeable_ranks, tok.special_tokens, tok.bos_id, tok.eos_id)}


def load(path):
    return loaded(load_checkpoint(path, max_seq_len=64, device="cpu", quantize="none"))


def load_kept(path):  # a GGUF's quantized tensors kept quantized
    return loaded(load_checkpoint(path, max_seq_len=64, device="cpu"))


def read_header(path):
    """The demo GGUF as far as load_checkpoint goes before reading its 100 MB of weights: the
    configuration, the vocabulary, and every tensor's name and shape checked against them."""
    args, ckpt = llama31.read_checkpoint(path, max_seq_len=64)
    state = dict(ckpt.read_state())
    if args.tie_embeddings:  # as assemble() does
        state.setdefault("output.weight", state.get("tok_embeddings.weight"))
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in llama31.Transformer(args).state_dict().items()}
        formats.check_state_dict(shapes, state, path, ckpt.source)
    return {"args": asdict(args), "params": ckpt.params, "shapes": {k: v.shape for k, v in ckpt.read_state().items()},
            "vocab": (ckpt.tokenizer.vocab.mergeable_ranks, ckpt.tokenizer.special_tokens)}


def export_hf(path):
    """Exported weights and config; tokenizer.json is copied as it is, so it must at least be JSON."""
    out = path.parent / "exported"
    try:
        export.export(str(path), str(out), format="hf", dtype="fp32")
    except ConfigError:
        assert not out.exists(), f"{out} written by a failed export"
        raise
    json.loads((out / "tokenizer.json").read_text())
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "tokenizer.json"}


def batches(path):
    loader = DistributedShardedDataLoader(path / "train_*.bin", 2, 16)
    return [loader.next_batch()[0] for _ in range(loader.ntok_total // 32 + 2)] + [loader.largest_token()[0]]


def resume(out):
    before = snapshot(out)
    try:
        result = finetune(out_dir=str(out), resume="latest", max_steps=2, device="cpu", sample_prompts=[])
    except ConfigError:
        assert snapshot(out) == before, f"a failed resume changed {out}"
        raise
    return result["model"].state_dict()


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): p.is_dir() or hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))}


# name: (fixture, the file damaged within it ("": the fixture itself), the public entry that reads it)
READERS = {
    "params.json": ("meta", "params.json", load),
    "consolidated.00.pth": ("meta", "consolidated.00.pth", load),
    "tokenizer.model": ("meta", "tokenizer.model", load),
    "config.json": ("hf", "config.json", load),
    "model.safetensors": ("hf", "model.safetensors", load),
    "safetensors index": ("sharded", "model.safetensors.index.json", load),
    "safetensors shard": ("sharded", "model-00002-of-00003.safetensors", load),
    "tokenizer.json": ("hf", "tokenizer.json", export_hf),
    "gguf": ("gguf", "", load),
    "gguf kept quantized": ("gguf", "", load_kept),
    "demo gguf metadata": ("demo", "", read_header),
    "token shard": ("data", "train_000.bin", batches),
    "train_state.pt": ("run", "step_000001/train_state.pt", resume),
    "latest": ("run", "latest", resume),
}


# ----------------------------------------------------------------------------- where a file's raw data lies


def payload(path: Path, data: bytes) -> list:
    """Byte ranges of raw tensor or token values, which no format checks: a flip there may load."""
    if data[:4] == b"GGUF":
        import gguf
        return [(t.data_offset, t.data_offset + t.n_bytes) for t in gguf.GGUFReader(path).tensors]
    if path.suffix == ".safetensors":
        n = int.from_bytes(data[:8], "little")
        return [(8 + n + lo, 8 + n + hi) for lo, hi in
                (v["data_offsets"] for k, v in json.loads(data[8:8 + n]).items() if k != "__metadata__")]
    if path.suffix == ".bin":  # after the three header ints: reserved bytes, then tokens
        return [(12, len(data))]
    if data[:2] == b"PK":  # torch's zip: each storage is a stored member under data/
        def start(i):  # past the member's local header, whose padding differs from the directory's
            o = i.header_offset
            name_length, extra_length = struct.unpack("<HH", data[o + 26:o + 30])
            return o + 30 + name_length + extra_length
        with zipfile.ZipFile(path) as z:
            return [(start(i), start(i) + i.compress_size) for i in z.infolist() if "/data/" in i.filename]
    return []


def metadata_end(path: Path) -> int:
    import gguf
    return gguf.GGUFReader(path).data_offset


# ----------------------------------------------------------------------------- damage


KINDS = ["truncate", "flip", "header", "flip", "truncate", "empty", "flip", "directory", "wrong type", "flip"]
# ModelArgs fields that no tensor's shape shows: a flipped digit there reads as another plausible value
UNCHECKED = {"norm_eps", "rope_theta", "rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor",
             "rope_original_max_len", "ffn_dim_multiplier", "multiple_of"}


def damage(kind: str, data: bytes, rng: random.Random, others: list, flip_end: int):
    """(damaged bytes, or None for a directory; the flips made, as (offset, xor) pairs)."""
    if kind == "truncate":
        return data[:rng.randrange(len(data))], []
    if kind == "empty":
        return b"", []
    if kind == "directory":
        return None, []
    if kind == "wrong type":  # a file of another format: another file of the same one is no damage
        return rng.choice([o for o in others if o[:4] != data[:4]]), []
    if kind == "header":
        n = rng.randint(4, 64)
        return rng.randbytes(n) + data[n:], []
    # flips anywhere, in the first 4 kB or in the last 4 kB (a zip's directory)
    lo, hi = rng.choice([(0, flip_end), (0, min(flip_end, 4096)), (max(0, flip_end - 4096), flip_end)])
    flips = [(i, rng.randrange(1, 256)) for i in sorted({rng.randrange(lo, hi) for _ in range(rng.randint(1, 4))})]
    return flipped(data, flips), flips


def flipped(data: bytes, flips) -> bytes:
    out = bytearray(data)
    for i, x in flips:
        out[i] ^= x
    return bytes(out)


class Hang(BaseException):
    pass


def alarm(signum, frame):
    raise Hang()


def attempt(entry, root: Path, name: str):
    """What the entry makes of a damaged file: ('error', message) passes if the message is one line
    naming the file; ('loaded', result) is compared by the caller; anything else fails."""
    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(SECONDS_PER_CASE)
    try:
        return "loaded", entry(root)
    except ConfigError as e:
        message = str(e)
        return ("error", message) if "\n" not in message and name in message else ("unclear error", message)
    except Hang:
        return "hang", ""
    except BaseException as e:  # a traceback for the user (tiktoken's panics are BaseExceptions)
        if isinstance(e, KeyboardInterrupt):
            raise
        import traceback
        return "traceback", f"{type(e).__name__}: {e}".splitlines()[0] + " @ " + \
            traceback.extract_tb(e.__traceback__)[-1].name
    finally:
        signal.alarm(0)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
            a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def only_unchecked_values_differ(got, want) -> bool:
    """The same weights and vocabulary; the configuration differs only in UNCHECKED fields."""
    def strip(result):
        return {k: ({f: v for f, v in result[k].items() if f not in UNCHECKED} if k in ("args", "params") else
                    result[k]) for k in result}
    return isinstance(got, dict) and isinstance(want, dict) and "args" in want and same(strip(got), strip(want))


@pytest.mark.slow
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf dequantizing a damaged scale; the NaN is refused
def test_a_damaged_file_is_one_clear_error_or_loads_the_same(files, reader, tmp_path):
    fixture, rel, entry = READERS[reader]
    source = files[fixture]
    work = tmp_path / "case"

    def write(damaged):  # a fresh copy of the fixture with the damaged file in it; its root
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        root = work / source.name  # (a resumed run's out dir keeps its name)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, root)
        path = root / rel if rel else root
        if damaged is None:
            path.unlink()
            path.mkdir()
        else:
            path.write_bytes(damaged)
        return root, path.name

    root, name = write((source / rel if rel else source).read_bytes())
    data = (root / rel if rel else root).read_bytes()
    want = entry(root)
    ranges = payload(root / rel if rel else root, data)
    flip_end = metadata_end(root) if fixture == "demo" else len(data)
    others = [files["meta"].joinpath("params.json").read_bytes(), files["evil"].read_bytes(),
              files["gguf"].read_bytes(), files["hf"].joinpath("model.safetensors").read_bytes(),
              files["meta"].joinpath("tokenizer.model").read_bytes(), files["data"].joinpath("val.bin").read_bytes()]
    tally, failures = Counter(), []
    t0 = time.time()
    for i in range(CASES):
        rng = random.Random(f"{reader} {i}")
        kind = KINDS[i % len(KINDS)]
        damaged, flips = damage(kind, data, rng, others, flip_end)
        outcome, got = attempt(entry, *write(damaged))
        if outcome == "loaded":
            structure = [(o, x) for o, x in flips if not any(lo <= o < hi for lo, hi in ranges)]
            if same(got, want):
                outcome = "same"
            elif structure != flips and same(attempt(entry, *write(flipped(data, structure))), ("loaded", want)):
                outcome = "payload"  # only the flips in raw tensor or token bytes change what loads
            elif flips and only_unchecked_values_differ(got, want):
                outcome = "value"  # a plausible other number: no checksum tells
            else:
                outcome, got = "loaded other values", ""
        tally[outcome if outcome in ("error", "same", "payload", "value") else "FAIL"] += 1
        if outcome not in ("error", "same", "payload", "value"):
            failures.append(f"case {i} ({kind}{f' at {[o for o, _ in flips]}' if flips else ''}): {outcome} {got}")
    print(f"\n{reader}: {CASES} cases, {dict(tally)}, {time.time() - t0:.1f}s")
    assert not failures, f"{reader}:\n" + "\n".join(failures)


# ----------------------------------------------------------------------------- hostile headers: fail fast


def gguf_file(path, kv=(), tensors=(), pad=64):
    """A GGUF file written by hand: kv is (key, type, packed value) and tensors (name, dims, type,
    offset), so that counts and lengths can say anything."""
    def string(s):
        return struct.pack("<Q", len(s)) + s
    body = b"".join(string(k) + struct.pack("<I", t) + v for k, t, v in kv)
    body += b"".join(string(n) + struct.pack(f"<I{len(d)}Q", len(d), *d) + struct.pack("<IQ", t, o)
                     for n, d, t, o in tensors)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + body + b"\0" * pad)
    return path


ARCH = (b"general.architecture", 8, struct.pack("<Q", 5) + b"llama")
HOSTILE_GGUFS = {
    "array of 2**60 int32": [ARCH, (b"tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, 2**60))],
    "array of 2**40 strings": [ARCH, (b"tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2**40))],
    "array of 2**22 + 1 bytes": [ARCH, (b"x", 9, struct.pack("<IQ", 0, 2**22 + 1))],
    "string of 2**62 bytes": [(b"general.architecture", 8, struct.pack("<Q", 2**62) + b"llama")],
}


def max_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("case", [*HOSTILE_GGUFS, "tensor of 2**62 floats"])
def test_a_gguf_header_declaring_huge_arrays_or_tensors_fails_fast_without_allocating(tmp_path, case):
    path = tmp_path / "hostile.gguf"
    if case in HOSTILE_GGUFS:
        gguf_file(path, HOSTILE_GGUFS[case])
    else:
        gguf_file(path, [ARCH], [(b"token_embd.weight", [2**31, 2**31], 0, 0)])
    rss, t0 = max_rss_mb(), time.time()
    with pytest.raises(ConfigError, match=f"could not read {path} as GGUF") as e:
        load_checkpoint(path, device="cpu")
    assert time.time() - t0 < 2 and max_rss_mb() - rss < 100
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("header", [
    struct.pack("<Q", 2**62) + b"{}",
    json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [2**40, 2**30], "data_offsets": [0, 2**62]}}),
], ids=["header of 2**62 bytes", "tensor of 2**70 floats"])
def test_a_safetensors_header_declaring_huge_sizes_fails_fast_without_allocating(files, tmp_path, header):
    shutil.copytree(files["hf"], tmp_path / "hf")
    if isinstance(header, str):
        header = struct.pack("<Q", len(header)) + header.encode()
    (tmp_path / "hf" / "model.safetensors").write_bytes(header + b"\0" * 64)
    rss, t0 = max_rss_mb(), time.time()
    with pytest.raises(ConfigError, match="could not read .*model.safetensors as safetensors"):
        load_checkpoint(tmp_path / "hf", device="cpu")
    assert time.time() - t0 < 2 and max_rss_mb() - rss < 100


@pytest.mark.parametrize("where", ["meta/consolidated.00.pth", "run/step_000001/train_state.pt"])
def test_a_checkpoint_whose_pickle_runs_code_is_refused_in_one_line(files, tmp_path, where):
    for name in ("meta", "run"):
        shutil.copytree(files[name], tmp_path / name)
    shutil.copy(files["evil"], tmp_path / where)
    os.environ.pop("FUZZ_PICKLE_RAN", None)
    with pytest.raises(ConfigError, match=f"could not read {tmp_path / where} as a torch checkpoint") as e:
        if where.startswith("meta"):
            load_checkpoint(tmp_path / "meta", device="cpu")
        else:
            finetune(out_dir=str(tmp_path / "run"), resume="latest", device="cpu", sample_prompts=[])
    assert "\n" not in str(e.value) and "FUZZ_PICKLE_RAN" not in os.environ


# ----------------------------------------------------------------------------- the CLI: one line, status 2


def test_the_cli_reports_a_damaged_file_in_one_line_with_status_2(files, tmp_path, capsys):
    # the two tracebacks: params.json with bytes that are not UTF-8, a GGUF string likewise
    shutil.copytree(files["meta"], tmp_path / "meta")
    params = tmp_path / "meta" / "params.json"
    params.write_bytes(params.read_bytes().replace(b'"dim"', b'"d\xbbm"'))
    gguf_path = tmp_path / "tiny.gguf"
    gguf_path.write_bytes(files["gguf"].read_bytes().replace(b"<|end_of_text|>", b"<|end_of_t\xffxt|>"))
    for path in (tmp_path / "meta", gguf_path):
        with pytest.raises(SystemExit) as e:
            llama31.main(["--ckpt_dir", str(path), "--prompts", "Hi", "--max_gen_len", "1", "--device", "cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
        assert (params.name if path.is_dir() else gguf_path.name) in err
