"""Sampling through the public Llama.build path on a random-weight Meta-layout checkpoint."""

import pytest
import torch

from variants import compiled
from llama31 import ConfigError, Llama


@pytest.fixture(scope="module")
def llama(ckpt_dir):
    return Llama.build(ckpt_dir, max_seq_len=128, max_batch_size=4, device="cpu")


PROMPTS = ["Hello", "The capital of France is", "def fibonacci(n):\n    return", "一二三"]


def encode(llama, prompts):
    return [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]


def test_ragged_batch_gives_the_same_tokens_as_each_prompt_alone(llama):
    prompts = encode(llama, PROMPTS)
    assert len({len(p) for p in prompts}) > 1
    batch = llama.generate(prompts, max_gen_len=12, temperature=0)
    alone = [llama.generate([p], max_gen_len=12, temperature=0)[0] for p in prompts]
    assert batch == alone
    assert all(len(t) == 12 for t in batch)  # random weights rarely pick one of the 3 stop ids


def test_fixed_shape_decode_step_gives_the_same_tokens(llama):
    # decode_step (what --compile decodes with) attends over the whole cache with a position mask;
    # run eagerly here, it must give what slicing the cache to the current length gives
    prompts = encode(llama, PROMPTS)
    model = llama.model

    def run():
        # a low temperature: on random weights at 1.0 the top tokens are near-ties, whose sorted
        # order a last-bit difference in the logits (a longer softmax) can swap
        return (llama.generate(prompts, 12, temperature=0),
                llama.generate(prompts[:2], 12, temperature=0.1, top_p=0.9, generator=torch.Generator().manual_seed(5)))

    sliced = run()
    assert sliced[1] != sliced[0][:2]  # sampled, not greedy
    llama.decoder = compiled.StaticDecoder(model, compile=False, eager=llama.decoder)
    try:
        fixed = run()
        cache = llama.decoder.kept[0]  # kept, at the model's full size, for the next call; not left installed
        assert cache.k.shape[::2] == (model.args.max_batch_size, model.args.max_seq_len)
        assert model.layers[0].attention.cache is None
        reused = llama.generate(prompts[:2], 12, temperature=0)  # over the keys the last call left there
        assert llama.decoder.kept[0] is cache
    finally:
        compiled.eager(llama)
    assert fixed == sliced
    assert reused == sliced[0][:2]


def test_a_generator_on_another_device_is_one_clear_error(llama):
    class CudaGenerator:  # what torch.Generator("cuda") looks like, without a GPU
        device = torch.device("cuda")

    with pytest.raises(ConfigError, match=r"the generator is on cuda, the model on cpu; make it there: "
                                          r"torch.Generator\('cpu'\)"):
        llama.generate(encode(llama, PROMPTS[:1]), 4, generator=CudaGenerator())


def test_greedy_is_deterministic(llama):
    prompts = encode(llama, PROMPTS[:2])
    assert llama.generate(prompts, 10, temperature=0) == llama.generate(prompts, 10, temperature=0)


@pytest.mark.slow
def test_seeded_top_p_is_reproducible_and_seed_dependent(llama):
    prompts = encode(llama, PROMPTS[:2])

    def run(seed):
        return llama.generate(prompts, 16, temperature=1.0, top_p=0.9,
                              generator=torch.Generator().manual_seed(seed))

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_p_near_zero_equals_greedy(llama):
    prompts = encode(llama, PROMPTS)
    greedy = llama.generate(prompts, 10, temperature=0)
    nucleus = llama.generate(prompts, 10, temperature=1.0, top_p=1e-9, generator=torch.Generator().manual_seed(0))
    assert nucleus == greedy


def test_top_p_sampling_differs_from_greedy_at_full_nucleus(llama):
    prompts = encode(llama, PROMPTS[:1])
    greedy = llama.generate(prompts, 16, temperature=0)
    sampled = llama.generate(prompts, 16, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0))
    assert sampled != greedy


def test_generation_stops_at_a_stop_token_per_row(llama, monkeypatch):
    prompts = encode(llama, PROMPTS[:2])
    free = llama.generate(prompts, 10, temperature=0)
    stop = free[0][4]  # pretend the 5th token of row 0 ends the document
    monkeypatch.setattr(llama.tokenizer, "stop_tokens", [stop])
    stopped = llama.generate(prompts, 10, temperature=0)
    assert stopped[0] == free[0][:free[0].index(stop)]
    row1 = free[1][:free[1].index(stop)] if stop in free[1] else free[1]
    assert stopped[1] == row1


def test_echo_returns_prompt_then_completion(llama):
    prompts = encode(llama, PROMPTS[:2])
    plain = llama.generate(prompts, 5, temperature=0)
    echoed = llama.generate(prompts, 5, temperature=0, echo=True)
    assert echoed == [p + c for p, c in zip(prompts, plain)]


@pytest.mark.slow
def test_max_gen_len_is_bounded_by_max_seq_len(llama):
    prompt = encode(llama, ["Hello"])
    out = llama.generate(prompt, max_gen_len=10_000, temperature=0)
    assert len(prompt[0]) + len(out[0]) <= 128
    # unless a stop token came first, generation ran to the end of the 128 positions
    stopped = any(t in llama.tokenizer.stop_tokens for t in llama.generate(prompt, 10_000, temperature=0,
                                                                          echo=True)[0][len(prompt[0]):])
    assert stopped or len(out[0]) == 128 - len(prompt[0])


def test_text_completion_decodes_the_same_tokens(llama):
    tokens = llama.generate(encode(llama, PROMPTS[:2]), 8, temperature=0)
    texts = llama.text_completion(PROMPTS[:2], 8, temperature=0)
    assert texts == [llama.tokenizer.decode(t) for t in tokens]
    echoed = llama.text_completion(PROMPTS[:2], 8, temperature=0, echo=True)
    assert echoed == [p + t for p, t in zip(PROMPTS[:2], texts)]


def test_generation_frees_the_kv_cache(llama):
    llama.generate(encode(llama, ["Hi"]), 3, temperature=0)
    assert all(layer.attention.cache is None for layer in llama.model.layers)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[[1] * 128]), "prompt 0 has 128 tokens but max_seq_len is 128"),
    (dict(prompts=[[1]] * 5), "max_batch_size"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_gen_len=0), "max_gen_len must be at least 1"),
])
def test_bad_sampling_arguments_are_clear_errors(llama, kwargs, message):
    args = dict(prompts=[[128000, 9906]], temperature=0.6, top_p=0.9, max_gen_len=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        llama.generate(args.pop("prompts"), **args)


def test_streamed_pieces_join_to_the_batch_completion(llama):
    for prompt in encode(llama, PROMPTS):
        pairs = list(llama.stream(prompt, 24, temperature=0))
        tokens = llama.generate([prompt], 24, temperature=0)[0]
        assert [t for t, _ in pairs if t is not None] == tokens
        text = "".join(piece for _, piece in pairs)
        assert text == llama.tokenizer.decode(tokens)
        if "\ufffd" not in text:  # split multi-byte characters are held back until whole
            assert not any("\ufffd" in piece for _, piece in pairs)


def test_chat_completion_answers_in_llama3_format_read_back_as_metas_code_reads_it(llama):
    from llama_models.datatypes import StopReason
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    meta = MetaChatFormat(MetaTokenizer.get_instance())
    dialogs = [[{"role": "user", "content": "Hi"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]]
    replies = llama.chat_completion(dialogs, max_gen_len=6, temperature=0)
    sp = llama.tokenizer.special_tokens
    header = [sp["<|start_header_id|>"]] + llama.tokenizer.encode("assistant", bos=False, eos=False) + \
        [sp["<|end_header_id|>"]] + llama.tokenizer.encode("\n\n", bos=False, eos=False)
    for dialog, reply in zip(dialogs, replies):
        prompt = llama.chat_format.encode_dialog(llama.tokenizer, dialog)
        assert prompt[0] == 128000 and prompt[-len(header):] == header
        tokens = llama.generate([prompt], 6, temperature=0, stops=True)[0]  # the stop token too, if any
        assert tokens[:-1] == llama.generate([prompt], 6, temperature=0)[0][:len(tokens) - 1]
        theirs = meta.decode_assistant_message(tokens, StopReason.out_of_tokens)
        assert reply["role"] == "assistant" and reply["content"] == theirs.content
        assert reply["stop_reason"] == theirs.stop_reason.value and reply["tool_calls"] == theirs.tool_calls == []
