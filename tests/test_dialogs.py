"""Finetuning on conversations (dialogs.py): each dialog written as Meta's and HF's chat templates
write it, the loss over the assistant's tokens alone equal to HF's with -100 labels, packed rows
that score each dialog as if alone, the checks before training, the cache, the run's record, and
runs that train (DDP, LoRA, resume, the demo's style)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FINETUNE_SHAPE, make_checkpoint
from test_finetune import max_difference, torchrun

import dialogs
import llama31
from formats import save_hf
from llama31 import ConfigError, Llama, finetune
from tokenizer import ChatFormat

REPO = Path(__file__).resolve().parents[1]
THREE_TURNS = [{"role": "system", "content": "Answer briefly."},
               {"role": "user", "content": "What is the capital of Italy?"},
               {"role": "assistant", "content": "Rome."},
               {"role": "user", "content": "And of Spain?"},
               {"role": "assistant", "content": "Madrid."},
               {"role": "user", "content": "And of Japan?"},
               {"role": "assistant", "content": "Tokyo."}]


def write(path, dialogs_):
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs_))
    return path


def qa(i):
    return [{"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}. Anything else?"}]


# -----------------------------------------------------------------------------
# a dialog's tokens and which of them count


def test_a_three_turn_dialog_is_what_llama_models_writes(tokenizer):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    tokens, _, _ = dialogs.encode(tokenizer, ChatFormat("llama3"), THREE_TURNS)
    theirs = MetaChatFormat(MetaTokenizer.get_instance()).encode_dialog_prompt(
        [RawMessage(**m) for m in THREE_TURNS]).tokens
    header = tokenizer.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", bos=False, eos=False,
                              allowed_special="all")
    assert theirs[-len(header):] == header and tokens == theirs[:-len(header)]  # Meta's ends with the next header


def test_a_three_turn_dialog_is_what_smollm2s_template_writes(smollm_path, smollm_tokenizer):
    from transformers import AutoTokenizer

    chat = Llama.build(smollm_path, max_seq_len=64, device="cpu", quantize="none").chat_format  # the file's template
    hf = AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)
    tokens, _, _ = dialogs.encode(smollm_tokenizer, chat, THREE_TURNS)
    assert tokens == hf.apply_chat_template(THREE_TURNS, tokenize=True, return_dict=True)["input_ids"]


def test_the_loss_counts_each_answer_and_the_token_that_ends_it(tokenizer, smollm_tokenizer):
    # hand-computed spans: the assistant's content and <|eot_id|> / <|im_end|>, nothing else
    for tok, chat, end in [(tokenizer, ChatFormat("llama3"), "<|eot_id|>"),
                           (smollm_tokenizer, ChatFormat("chatml", "You are helpful."), "<|im_end|>")]:
        tokens, counted, cuts = dialogs.encode(tok, chat, THREE_TURNS)
        spans, run = [], []
        for t, c in zip(tokens, counted):
            if c:
                run.append(t)
            elif run:
                spans.append(tok.decode(run))
                run = []
        assert spans + ([tok.decode(run)] if run else []) == [f"Rome.{end}", f"Madrid.{end}", f"Tokyo.{end}"]
        assert len(cuts) == 3 and all(tokens[c - 1] == tok.special_tokens[end] for c in cuts)
        assert all(dialogs.encode(tok, chat, THREE_TURNS, train_on_input=True)[1])


def test_the_loss_equals_hf_causal_lm_loss_with_minus_100_labels(tokenizer, tmp_path):
    import transformers

    model = make_checkpoint(tmp_path / "meta", seed=2, dtype=torch.float32, **FINETUNE_SHAPE)
    save_hf(model.state_dict(), model.args.to_params(), tmp_path / "hf", dtype=torch.float32)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens, counted, _ = dialogs.encode(tokenizer, ChatFormat("llama3"), THREE_TURNS)
    x, y, segments, _, _ = dialogs.pack([(tokens, counted, [len(tokens)])], len(tokens), tokenizer.pad_id)
    with torch.no_grad():
        ours = model.forward_loss(x, y, mask=dialogs.row_mask(segments))
        labels = torch.tensor([[t if c else -100 for t, c in zip(tokens, counted)]])
        theirs = hf(input_ids=x, labels=labels).loss
    assert abs(ours.item() - theirs.item()) <= 1e-5 * theirs.item()


def test_a_packed_row_scores_each_dialog_as_if_alone(tokenizer):
    model = llama31.Transformer(llama31.ModelArgs(**FINETUNE_SHAPE, vocab_size=128256, max_seq_len=256))
    encoded = [dialogs.encode(tokenizer, ChatFormat("llama3"), d) for d in (qa(3), THREE_TURNS, qa(7))]
    with torch.no_grad():
        def loss_sum(rows):
            x, y, segments, _, _ = rows
            logits = model.output(model.trunk(x, 0, dialogs.row_mask(segments))).float()
            return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        packed = dialogs.pack(encoded, 256, tokenizer.pad_id)
        assert packed[0].shape == (1, 256)  # three dialogs, one row
        alone = sum(loss_sum(dialogs.pack([e], len(e[0]), tokenizer.pad_id)) for e in encoded)
        assert abs(loss_sum(packed) - alone) <= 1e-4 * alone


def test_a_dialog_longer_than_a_row_is_cut_at_an_answer_or_skipped(tokenizer):
    chat = ChatFormat("llama3")
    long_, short = dialogs.encode(tokenizer, chat, THREE_TURNS), dialogs.encode(tokenizer, chat, qa(2))
    T = long_[2][1] + 2  # room for the first two answers, not the third
    tokens, labels, _, cut, skipped = dialogs.pack([long_, short], T, tokenizer.pad_id)
    assert (cut, skipped) == (1, 0) and tokens[0, :long_[2][1]].tolist() == long_[0][:long_[2][1]]
    assert tokenizer.decode([t for t in labels[0].tolist() if t != -100]).endswith("Madrid.<|eot_id|>")
    _, _, _, cut, skipped = dialogs.pack([long_], long_[2][0] - 1, tokenizer.pad_id)  # not even the first answer
    assert (cut, skipped) == (0, 1)


# -----------------------------------------------------------------------------
# the data: checked line by line before training, cached, handed out per process


@pytest.mark.parametrize("line, words", [
    ("not json", "not JSON"),
    ('{"text": "hi"}', 'no "messages" list'),
    ('{"messages": [{"role": "robot", "content": "beep"}]}', "message 1 has role 'robot'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "message 1 (user) has no content"),
])
def test_a_malformed_line_is_one_error_naming_its_line_before_training(tiny_ckpt, tmp_path, line, words):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": qa(1)}) + "\n\n" + line + "\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(data))}:3: {re.escape(words)}") as e:
        finetune(ckpt_dir=str(tiny_ckpt), train_data=str(data), out_dir=str(tmp_path / "out"), device="cpu")
    assert "\n" not in str(e.value) and not (tmp_path / "out" / "latest").exists()


def test_the_tokenized_dialogs_are_cached_and_made_again_when_the_data_changes(tokenizer, tmp_path):
    data, said = write(tmp_path / "d.jsonl", [qa(1), qa(2)]), []
    chat = ChatFormat("llama3")
    first = dialogs.tokenized(data, tokenizer, chat, False, said.append)
    assert dialogs.tokenized(data, tokenizer, chat, False, said.append) == first and len(said) == 1  # cached
    assert (tmp_path / "d.jsonl.llama3.tokens.pt").is_file()
    write(data, [qa(1), qa(3)])
    assert dialogs.tokenized(data, tokenizer, chat, False, said.append) != first and len(said) == 2
    dialogs.tokenized(data, tokenizer, ChatFormat("llama3", "Be brief."), False, said.append)  # another format
    assert len(said) == 3
    dialogs.tokenized(data, tokenizer, chat, True, said.append)  # train_on_input: other targets
    assert len(said) == 4


@pytest.mark.parametrize("damage", [b"not a pickle at all", b"\x80\x02K\x01.", "truncated"])
def test_a_damaged_token_cache_is_made_again(tokenizer, tmp_path, damage):
    data, said = write(tmp_path / "d.jsonl", [qa(1), qa(2)]), []
    chat = ChatFormat("llama3")
    first = dialogs.tokenized(data, tokenizer, chat, False, said.append)
    cache = tmp_path / "d.jsonl.llama3.tokens.pt"
    cache.write_bytes(cache.read_bytes()[:40] if damage == "truncated" else damage)  # garbage; a pickled int
    assert dialogs.tokenized(data, tokenizer, chat, False, said.append) == first and len(said) == 2
    assert torch.load(cache, weights_only=True)["dialogs"] == first  # written again, whole


def test_each_process_gets_its_own_rows_and_the_position_resumes(tokenizer, tmp_path):
    encoded = [dialogs.encode(tokenizer, ChatFormat("llama3"), qa(i)) for i in range(9)]
    tokens, labels, segments, _, _ = dialogs.pack(encoded, 32, tokenizer.pad_id)
    ranks = [dialogs.DialogLoader("d.jsonl", tokens, labels, segments, 2, r, 2) for r in range(2)]
    first = [loader.next_batch()[0] for loader in ranks]
    assert torch.equal(torch.cat(first), tokens[:4])  # rank 0 rows 0-1, rank 1 rows 2-3
    state = ranks[0].state_dict()
    again = dialogs.DialogLoader("d.jsonl", tokens, labels, segments, 2, 0, 2)
    again.load_state_dict(state)
    assert torch.equal(again.next_batch()[0], ranks[0].next_batch()[0])


# -----------------------------------------------------------------------------
# runs


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats")
    return {"train_data": str(write(path / "train.jsonl", [qa(i) for i in range(24)])),
            "val_data": str(write(path / "val.jsonl", [qa(i) for i in range(30, 36)]))}


def run_on(tiny_ckpt, chats, out, **kw):
    return finetune(**{**dict(ckpt_dir=str(tiny_ckpt), out_dir=str(out), B=2, T=64, max_steps=4, learning_rate=1e-3,
                              warmup_steps=2, val_every=2, val_steps=1, device="cpu", sample_prompts=[]),
                       **chats, **kw})


def test_a_dialog_run_learns_resumes_exactly_and_records_every_step(tiny_ckpt, chats, tmp_path, capsys):
    straight = run_on(tiny_ckpt, chats, tmp_path / "a")
    out = capsys.readouterr().out
    assert "24 dialogs in " in out and "% of the tokens)" in out
    losses = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train, val = [r["loss"] for r in losses if "loss" in r], [r["val_loss"] for r in losses if "val_loss" in r]
    assert train[-1] < train[0] - 0.3 and val[-1] < val[0] - 0.3, (train, val)  # measured: 12.16 -> 11.58, 12.15 -> 11.35
    run_on(tiny_ckpt, chats, tmp_path / "b", stop_after=2)
    resumed = finetune(resume="latest", out_dir=str(tmp_path / "b"), device="cpu", sample_prompts=[])
    assert max_difference(resumed["model"].state_dict(), straight["model"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # the resumed run appended
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 4]  # val_every is not saved: 50 after the resume
    assert all(r["elapsed"] >= 0 and r["tokens_per_s"] > 0 for r in rows if "loss" in r)


def test_loss_png_is_drawn_with_matplotlib_else_a_note(tiny_ckpt, chats, tmp_path, capsys):
    import importlib.util
    run_on(tiny_ckpt, chats, tmp_path, max_steps=2)
    if importlib.util.find_spec("matplotlib") is None:
        assert "loss.png not drawn: matplotlib is not installed" in capsys.readouterr().err
        assert not (tmp_path / "loss.png").exists()
    else:
        assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_activation_checkpointing_on_dialogs_equals_the_plain_run(tiny_ckpt, chats, tmp_path):
    plain = run_on(tiny_ckpt, chats, tmp_path / "a", max_steps=2, val_every=0)
    recomputed = run_on(tiny_ckpt, chats, tmp_path / "b", max_steps=2, val_every=0, checkpoint_activations=True)
    assert (worst := max_difference(recomputed["model"].state_dict(), plain["model"])) < 1e-6, worst
    base = torch.load(tiny_ckpt / "consolidated.00.pth")
    assert max_difference(base, plain["model"]) > 1e-4  # both learned: two runs that learn nothing are equal too


def first_loss(out):
    return next(json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line)


# measured gaps: int8 0.0021, int4 0.0028; targets that miss the assistant's tokens: 0.31
@pytest.mark.parametrize("quantize, close", [("none", 0.0), ("int8", 1e-2), ("int4", 1e-2)])
def test_lora_and_qlora_train_on_dialogs_with_the_same_targets(tiny_ckpt, chats, tmp_path, quantize, close):
    # step 1's loss is the base's, adapters being zero: the masked loss of the full run, near it on a quantized base
    full = run_on(tiny_ckpt, chats, tmp_path / "full", max_steps=1, val_every=0)
    result = run_on(tiny_ckpt, chats, tmp_path / "lora", finetune_type="lora", quantize=quantize, max_steps=2,
                    val_every=0)
    assert abs(first_loss(tmp_path / "lora") - full["train_loss"]) <= close
    assert (tmp_path / "lora" / "step_000002" / "adapters.pt").is_file() and math.isfinite(result["train_loss"])


@pytest.mark.slow
def test_compile_on_dialogs_equals_eager(tiny_ckpt, chats, tmp_path):
    eager = run_on(tiny_ckpt, chats, tmp_path / "a", max_steps=2, val_every=0)
    compiled = run_on(tiny_ckpt, chats, tmp_path / "b", max_steps=2, val_every=0, compile=True)
    assert abs(compiled["train_loss"] - eager["train_loss"]) <= 1e-5
    assert (worst := max_difference(compiled["model"].state_dict(), eager["model"])) < 1e-5, worst


@pytest.mark.slow
def test_ddp_and_fsdp_on_dialogs_equal_one_process_with_accumulation(tiny_ckpt, chats, tmp_path):
    data = {"train_data": chats["train_data"], "val_data": ""}
    single = finetune(ckpt_dir=str(tiny_ckpt), out_dir=str(tmp_path / "single"), B=2, T=32, total_batch_size=4 * 2 * 32,
                      max_steps=3, learning_rate=1e-3, warmup_steps=2, val_every=0, device="cpu", sample_prompts=[],
                      **data)
    torchrun(tiny_ckpt, data, tmp_path / "ddp", "ddp")
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    assert (worst := max_difference(rank0, single["model"])) < 1e-5, worst
    torchrun(tiny_ckpt, data, tmp_path / "fsdp", "fsdp")
    sharded = torch.load(tmp_path / "fsdp" / "step_000003" / "consolidated.00.pth")
    assert (worst := max_difference(sharded, single["model"])) < 1e-5, worst


@pytest.mark.slow
def test_the_demo_learns_the_style_of_its_dialogs(tmp_path):
    # data/dialogs.jsonl: one-line answers signed "— Pip"; a question none of them asks
    r = subprocess.run([sys.executable, "llama31.py", "finetune", "--train_data", "data/dialogs.jsonl",
                        "--out_dir", str(tmp_path), "--sample_prompts", "[]"], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    chat = subprocess.run([sys.executable, "chat.py", "--ckpt_dir", str(tmp_path / "latest"), "--temperature", "0",
                           "--max_gen_len", "40"], input="What color is grass?\n", cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert chat.returncode == 0 and chat.stdout.strip().endswith("— Pip"), chat.stdout + chat.stderr[-1000:]
