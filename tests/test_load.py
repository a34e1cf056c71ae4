"""Loading Meta-layout checkpoints: what loads, what is refused and how the error reads; the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import MISSING_DEVICE, make_checkpoint
from llama31 import Llama, load_model

REPO = Path(__file__).resolve().parents[1]


def test_build_loads_exactly_the_saved_weights(tmp_path, tokenizer):
    saved = make_checkpoint(tmp_path, seed=3, dtype=torch.float32)
    llama = Llama.build(tmp_path, max_seq_len=64, device="cpu")
    got, want = llama.model.state_dict(), saved.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    tokens = torch.tensor([tokenizer.encode("Hello world", bos=True, eos=False)])
    assert torch.allclose(llama.model.forward_inference(tokens), saved.forward_inference(tokens), atol=1e-6)


def test_default_dtype_on_cpu_is_fp32_and_bf16_on_request(ckpt_dir):
    assert load_model(ckpt_dir, 64, device="cpu").output.weight.dtype == torch.float32
    model = load_model(ckpt_dir, 64, device="cpu", dtype="bf16")
    assert model.output.weight.dtype == torch.bfloat16
    logits = model.forward_inference(torch.tensor([[128000, 9906]]))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_loaded_parameters_can_train(ckpt_dir):
    model = load_model(ckpt_dir, 64, device="cpu")
    tokens = torch.randint(0, 128256, (1, 9))
    loss = model.forward_loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def write_params(path, **changes):
    params = json.loads((path / "params.json").read_text())
    params.update(changes)
    (path / "params.json").write_text(json.dumps(params))


@pytest.fixture
def ckpt_copy(tmp_path, ckpt_dir):
    for name in os.listdir(ckpt_dir):
        (tmp_path / name).write_bytes((ckpt_dir / name).read_bytes())
    return tmp_path


def test_missing_checkpoint_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="checkpoint directory .*nope does not exist"):
        Llama.build(tmp_path / "nope")


def test_directory_without_pth_is_a_clear_error(ckpt_copy):
    (ckpt_copy / "consolidated.00.pth").unlink()
    with pytest.raises(ValueError, match=r"no \*.pth file in .*consolidated.00.pth"):
        Llama.build(ckpt_copy)


def test_missing_params_json_is_a_clear_error(ckpt_copy):
    (ckpt_copy / "params.json").unlink()
    with pytest.raises(ValueError, match="params.json not found"):
        Llama.build(ckpt_copy)


def test_params_that_do_not_match_the_weights_name_the_tensors(ckpt_copy):
    write_params(ckpt_copy, dim=512)
    with pytest.raises(ValueError, match=r"shape mismatch .*tok_embeddings.weight \(128256, 256\) vs \(128256, 512\)"):
        Llama.build(ckpt_copy, device="cpu")


def test_extra_layers_in_params_are_reported_as_missing_weights(ckpt_copy):
    write_params(ckpt_copy, n_layers=3)
    with pytest.raises(ValueError, match=r"missing 9: layers\.2\."):
        Llama.build(ckpt_copy, device="cpu")


def test_tokenizer_vocab_mismatch_is_a_clear_error(ckpt_copy):
    write_params(ckpt_copy, vocab_size=32000)
    with pytest.raises(ValueError, match="vocab_size 32000 but the tokenizer has 128256 tokens"):
        Llama.build(ckpt_copy, device="cpu")


def test_corrupt_weights_file_is_a_clear_error(ckpt_copy):
    (ckpt_copy / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read .*consolidated.00.pth"):
        Llama.build(ckpt_copy, device="cpu")


def test_unknown_dtype_is_a_clear_error(ckpt_dir):
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_model(ckpt_dir, device="cpu", dtype="fp8")


def run_cli(*args):
    return subprocess.run([sys.executable, "llama31.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_samples_from_a_checkpoint(ckpt_dir):
    r = run_cli("--ckpt_dir", str(ckpt_dir), "--prompts", '["The capital of France is", "Hello"]',
                "--max_gen_len", "8", "--temperature", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.split("-" * 80 + "\n")
    assert blocks[0].startswith("The capital of France is") and blocks[1].startswith("Hello")
    # greedy output of the CLI is what the library gives for the same prompt
    llama = Llama.build(ckpt_dir, max_seq_len=512, device="cpu")
    want = llama.text_completion(["The capital of France is"], 8, temperature=0)[0]
    assert blocks[0] == "The capital of France is" + want + "\n"


@pytest.mark.slow
def test_cli_batch_mode_prints_the_same_as_streaming(ckpt_dir):
    args = ["--ckpt_dir", str(ckpt_dir), "--prompts", '["Hello", "一二三"]', "--max_gen_len", "12",
            "--temperature", "0", "--device", "cpu"]
    streamed, batched = run_cli(*args), run_cli(*args, "--nostream")
    assert streamed.returncode == batched.returncode == 0
    assert streamed.stdout == batched.stdout
    # the last line times decoding apart from each prompt's first token
    for r in (streamed, batched):
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith("generated ") and " tokens/s decoding; first token after " in line, line
        assert "s later (first decode step)" in line
    assert "the other prompts' first tokens after" in streamed.stderr and "(a batch of 2)" in batched.stderr


def test_the_decode_rate_leaves_out_the_waits_for_the_first_two_tokens():
    """A first token after 0.3 s (a prefill), the second 0.2 s later (a decode step compiling), then
    5 at 20 ms each: 50 tokens/s, not 7 tokens in 0.6 s (12/s)."""
    import time

    import runs

    def steps():
        for wait in (0.3, 0.2, 0.02, 0.02, 0.02, 0.02, 0.02):
            time.sleep(wait)
            yield [1]
    clock = runs.DecodeClock()
    assert list(clock.timed(steps(), len)) == [[1]] * 7
    assert clock.tokens == 7 and clock.decoded == 5
    (prefill, step), = clock.waits
    assert 0.3 <= prefill < 0.35 and 0.2 <= step < 0.25
    rate = clock.decoded / clock.decode_s
    assert 25 < rate <= 50, rate  # sleeps run over, never under
    assert clock.summary(compiled=True) == (f"generated 7 tokens: {rate:.1f} tokens/s decoding; first token after "
                                            f"{prefill:.2f}s (prefill), the second {step:.2f}s later (first decode "
                                            f"step, compiling)")


def test_cli_errors_are_one_line(tmp_path):
    r = run_cli("--ckpt_dir", str(tmp_path / "missing"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: checkpoint directory {tmp_path / 'missing'} does not exist"]


def test_cli_rejects_bad_top_p_in_one_line(ckpt_dir):
    r = run_cli("--ckpt_dir", str(ckpt_dir), "--top_p", "1.5", "--device", "cpu")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: top_p must be in (0, 1], got 1.5"
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_chat_sends_prompts_as_user_turns(ckpt_dir):
    r = run_cli("--ckpt_dir", str(ckpt_dir), "--chat", "--prompts", '["Hi there"]', "--max_gen_len", "5",
                "--temperature", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    llama = Llama.build(ckpt_dir, max_seq_len=512, device="cpu")
    reply = llama.chat_completion([[{"role": "user", "content": "Hi there"}]], 5, temperature=0)[0]["content"]
    assert r.stdout == f"> Hi there\n{reply}\n" + "-" * 80 + "\n"


@pytest.mark.parametrize("args, message", [
    MISSING_DEVICE,
    (["--device", "tpu9"], "error: unknown device 'tpu9'"),
    (["--temperature", "abc"], "error: --temperature must be a number, got 'abc'"),
    (["--prompts", "123"], "error: --prompts must be a string or a list of strings"),
])
def test_cli_rejects_bad_arguments_in_one_line_before_loading(ckpt_dir, args, message):
    r = run_cli("--ckpt_dir", str(ckpt_dir), *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].startswith(message)


def test_params_without_use_scaled_rope_mean_unscaled_as_in_metas_code(ckpt_copy):
    from llama_models.llama3.args import ModelArgs as MetaArgs

    params = json.loads((ckpt_copy / "params.json").read_text())
    del params["use_scaled_rope"]  # as in Llama 3.0's params.json
    (ckpt_copy / "params.json").write_text(json.dumps(params))
    assert MetaArgs(**params).use_scaled_rope is False
    assert load_model(ckpt_copy, 64, device="cpu").args.use_scaled_rope is False


def test_save_meta_states_every_rope_setting(tmp_path):
    from conftest import random_model
    from llama31 import save_meta

    model = random_model(rope_scale_factor=8.0, rope_low_freq_factor=2.0, rope_high_freq_factor=8.0,
                         rope_original_max_len=4096)
    save_meta(model, tmp_path)
    back = load_model(tmp_path, 64, device="cpu").args
    for k in ("rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len"):
        assert getattr(back, k) == getattr(model.args, k), k


def test_config_errors_come_before_the_weights_are_read(ckpt_copy):
    # a bad override is reported from params.json alone: the (here unreadable) weights are never opened
    params = json.loads((ckpt_copy / "params.json").read_text())
    (ckpt_copy / "params.json").write_text(json.dumps({**params, "use_scaled_rope": False}))
    (ckpt_copy / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="use_scaled_rope false"):
        load_model(ckpt_copy, 64, device="cpu", rope_scale_factor=8.0)
    with pytest.raises(ValueError, match="could not read .*consolidated.00.pth"):
        load_model(ckpt_copy, 64, device="cpu")
