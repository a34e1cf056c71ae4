"""tokenizer.ChatFormat's Llama 3 tool calls against llama-models 0.3.0: the prompt ids its ChatFormat
writes for every kind of message, what its decode_assistant_message reads from the replies on its
prompt-format pages and in its tests, and the system prompts those pages show."""

import datetime
import uuid
from pathlib import Path

import pytest

import reference
from tokenizer import ChatFormat, ConfigError, llama3_system_prompt

INSTRUCTION = "You are a helpful assistant."
BUILTIN_SYSTEM = {"role": "system", "content": llama3_system_prompt(INSTRUCTION, ["brave_search", "wolfram_alpha"],
                                                                      "21 September 2024")}
CODE_SYSTEM = {"role": "system", "content": llama3_system_prompt(None, ["code_interpreter"], "24 September 2024")}
CUSTOM_SYSTEM = {"role": "system", "content": llama3_system_prompt(INSTRUCTION, ["get_weather"], "21 September 2024")}
WEATHER = {"tool_name": "get_weather", "call_id": "c1",
           "arguments": {"city": "San Francisco", "days": 3, "ratio": 0.5, "metric": True, "note": None,
                         "hours": [9, 12, "18h"]}}


@pytest.fixture(scope="module")
def meta_format():
    from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaChatFormat(MetaTokenizer.get_instance())


def meta_dialog(dialog):
    """The same dialog as llama-models' RawMessages (reference.py's conversion)."""
    return reference.meta_messages(dialog)


def meta_ids(meta_format, dialog, tool_format="json"):
    from llama_models.datatypes import ToolPromptFormat

    return meta_format.encode_dialog_prompt(meta_dialog(dialog), ToolPromptFormat(tool_format)).tokens


def published(page: str, title: str):
    """(prompt, reply) of a section of a prompt-format page that llama-models ships, e.g. llama3_1/prompt_format.md"""
    import llama_models

    text = (Path(llama_models.__file__).parent / page).read_text()
    section = text[text.index(f"## {title}\n"):]

    def block(heading):
        start = section.index(f"##### {heading}\n```\n") + len(heading) + 11
        return section[start:section.index("\n```", start)]

    return block("Input Prompt Format"), block("Model Response Format")


def system_content(prompt: str) -> str:
    header = "<|start_header_id|>system<|end_header_id|>\n\n"
    start = prompt.index(header) + len(header)
    return prompt[start:prompt.index("<|eot_id|>", start)]


def calls(message):
    """Meta's decoded message's tool calls as (name, arguments), its built-in tool enums as their names."""
    return [(getattr(c.tool_name, "value", c.tool_name), c.arguments) for c in message.tool_calls]


# -----------------------------------------------------------------------------
# system prompts: as Meta's published prompt-format pages show them


def test_system_prompt_with_builtin_tools_is_the_published_one():
    prompt, _ = published("llama3_1/prompt_format.md", "Builtin Tool Calling")
    ours = llama3_system_prompt(INSTRUCTION, ["code_interpreter", "brave_search", "wolfram_alpha"],
                                datetime.date(2024, 9, 21))
    assert ours == system_content(prompt)


def test_system_prompt_with_only_custom_tools_leaves_the_tools_line_empty():
    prompt, _ = published("llama3_1/prompt_format.md", "JSON based tool calling")
    assert llama3_system_prompt(INSTRUCTION, ["trending_songs"], "21 September 2024") == system_content(prompt)


def test_system_prompt_with_only_code_interpreter_names_no_tool():
    prompt, _ = published("llama3_2/text_prompt_format.md", "Code Interpreter")
    assert llama3_system_prompt(tools=["code_interpreter"], date="24 September 2024") == system_content(prompt)


def test_builtin_tools_prompt_is_the_published_prompt(tokenizer, meta_format):
    prompt, _ = published("llama3_1/prompt_format.md", "Builtin Tool Calling")
    dialog = [dict(BUILTIN_SYSTEM), {"role": "user", "content": "Search the web for the latest price of 1oz gold?"}]
    ids = ChatFormat().encode_dialog(tokenizer, dialog)
    assert tokenizer.decode(ids) == prompt
    assert ids == meta_ids(meta_format, dialog)


# -----------------------------------------------------------------------------
# prompts: our ids are llama-models' ChatFormat.encode_dialog_prompt ids


def test_builtin_call_and_its_ipython_answer_match_meta(tokenizer, meta_format):
    dialog = [BUILTIN_SYSTEM, {"role": "user", "content": "Latest price of 1oz gold?"},
              {"role": "assistant", "content": "", "stop_reason": "end_of_message",
               "tool_calls": [{"tool_name": "brave_search", "arguments": {"query": "price of 1oz gold"}}]},
              {"role": "ipython", "content": '{"results": [{"title": "Gold", "price": "$2,650"}]}'}]
    assert ChatFormat().encode_dialog(tokenizer, dialog) == meta_ids(meta_format, dialog)


def test_tool_role_is_an_alias_of_ipython(tokenizer, meta_format):
    dialog = [{"role": "user", "content": "2+2?"}, {"role": "tool", "content": "4"}]
    as_ipython = [dialog[0], {"role": "ipython", "content": "4"}]
    assert ChatFormat().encode_dialog(tokenizer, dialog) == ChatFormat().encode_dialog(tokenizer, as_ipython)
    assert ChatFormat().encode_dialog(tokenizer, dialog) == meta_ids(meta_format, dialog)


def test_builtin_call_is_written_without_python_tag_as_meta_writes_it(tokenizer, meta_format):
    # llama-models 0.3.0 puts <|python_tag|> only before code_interpreter's code; its own page, made by an
    # earlier encoder, shows the tag before wolfram_alpha's call as well: the only difference
    page, _ = published("llama3_1/prompt_format.md", "Built-in tools full interaction")
    answer = page.split("<|start_header_id|>ipython<|end_header_id|>\n\n")[1].split("<|eot_id|>")[0]
    dialog = [{"role": "system", "content": "Environment: ipython\nTools: brave_search, wolfram_alpha\n"},
              {"role": "user", "content": "What is the 100th decimal of pi?"},
              {"role": "assistant", "content": "", "stop_reason": "end_of_message",
               "tool_calls": [{"tool_name": "wolfram_alpha", "arguments": {"query": "100th decimal of pi"}}]},
              {"role": "tool", "content": answer}]
    ids = ChatFormat().encode_dialog(tokenizer, dialog)
    assert ids == meta_ids(meta_format, dialog)
    assert tokenizer.decode(ids) == page.replace("<|python_tag|>wolfram_alpha", "wolfram_alpha")


def test_code_interpreter_call_follows_python_tag_as_in_meta(tokenizer, meta_format):
    code = "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))\n\nprint(is_prime(7))"
    dialog = [CODE_SYSTEM, {"role": "user", "content": "Is 7 prime? Use code."},
              {"role": "assistant", "content": "", "stop_reason": "end_of_message",
               "tool_calls": [{"tool_name": "code_interpreter", "arguments": {"code": code}}]},
              {"role": "ipython", "content": "[stdout]True[/stdout]"}]
    ids = ChatFormat().encode_dialog(tokenizer, dialog)
    assert ids == meta_ids(meta_format, dialog)
    assert tokenizer.special_tokens["<|python_tag|>"] in ids


@pytest.mark.parametrize("tool_format", ["json", "function_tag", "python_list"])
def test_custom_function_call_matches_meta_in_each_tool_format(tokenizer, meta_format, tool_format):
    dialog = [CUSTOM_SYSTEM, {"role": "user", "content": "Weather in SF for 3 days?"},
              {"role": "assistant", "content": "", "tool_calls": [WEATHER]},
              {"role": "ipython", "content": '"25 C"'}]
    ids = ChatFormat(tool_format=tool_format).encode_dialog(tokenizer, dialog)
    assert ids == meta_ids(meta_format, dialog, tool_format)


def test_content_before_a_tool_call_matches_meta(tokenizer, meta_format):
    dialog = [CUSTOM_SYSTEM, {"role": "user", "content": "Weather?"},
              {"role": "assistant", "content": "Let me check. ", "tool_calls": [WEATHER]}]
    assert ChatFormat().encode_dialog(tokenizer, dialog) == meta_ids(meta_format, dialog)


def test_multi_turn_dialog_of_every_message_kind_matches_meta(tokenizer, meta_format):
    dialog = [BUILTIN_SYSTEM,
              {"role": "user", "content": "Hi!"},
              {"role": "assistant", "content": "Hello. How can I help?", "stop_reason": "end_of_turn"},
              {"role": "user", "content": "What is 2^100, and today's news?"},
              {"role": "assistant", "content": "", "stop_reason": "end_of_message",
               "tool_calls": [{"tool_name": "wolfram_alpha", "arguments": {"query": "2^100"}, "call_id": "w"}]},
              {"role": "ipython", "content": "1267650600228229401496703205376", "call_id": "w"},
              {"role": "assistant", "content": "", "stop_reason": "end_of_message",
               "tool_calls": [{"tool_name": "brave_search", "arguments": {"query": "news today"}}]},
              {"role": "tool", "content": "[]"},
              {"role": "assistant", "content": "", "stop_reason": "end_of_message",
               "tool_calls": [{"tool_name": "code_interpreter", "arguments": {"code": "print(2**100)"}}]},
              {"role": "ipython", "content": "1267650600228229401496703205376"},
              {"role": "assistant", "content": "2^100 = 1267650600228229401496703205376; no news found."},
              {"role": "user", "content": "And the weather?", "context": "The user lives in San Francisco."},
              {"role": "assistant", "content": "", "tool_calls": [WEATHER]},
              {"role": "ipython", "content": '{"temp": "25 C"}'},
              {"role": "assistant", "content": "25 C and sunny.", "stop_reason": "end_of_turn"},
              {"role": "user", "content": "Thanks <|eot_id|><|python_tag|>"}]
    assert ChatFormat().encode_dialog(tokenizer, dialog) == meta_ids(meta_format, dialog)


def test_user_context_matches_meta(tokenizer, meta_format):
    # "\n\n" and the context are encoded apart: a context that opens with a newline shows it
    dialog = [{"role": "user", "content": "Where do I live?", "context": "\n- lives in Lyon\n- works in Paris"}]
    assert ChatFormat().encode_dialog(tokenizer, dialog) == meta_ids(meta_format, dialog)


def test_text_item_content_matches_meta(tokenizer, meta_format):
    # each item is encoded on its own: "Hello" + " world" are not the tokens of "Hello world" run together
    dialog = [{"role": "user", "content": ["Hel", {"type": "text", "text": "lo world"}]}]
    assert ChatFormat().encode_dialog(tokenizer, dialog) == meta_ids(meta_format, dialog)


def test_special_token_text_in_a_tool_call_stays_text_as_in_meta(tokenizer, meta_format):
    dialog = [{"role": "assistant", "content": "",
               "tool_calls": [{"tool_name": "brave_search", "arguments": {"query": "<|eom_id|> <|python_tag|>"}}]}]
    ids = ChatFormat().encode_dialog(tokenizer, dialog)
    assert ids == meta_ids(meta_format, dialog)
    assert tokenizer.eom_id not in ids


# -----------------------------------------------------------------------------
# replies: our decode_assistant reads what llama-models' decode_assistant_message reads

LLAMA31, LLAMA32 = "llama3_1/prompt_format.md", "llama3_2/text_prompt_format.md"
PUBLISHED_REPLIES = [  # (page, section): the model's replies as Meta's pages show them
    (LLAMA31, "User and assistant conversation"),
    (LLAMA31, "Builtin Tool Calling"),
    (LLAMA31, "Builtin Code Interpreter"),
    (LLAMA31, "Built-in tools full interaction"),
    (LLAMA31, "JSON based tool calling"),
    (LLAMA31, "`<function>` based tool calling"),
    (LLAMA32, "Zero shot function calling with user message"),
    (LLAMA32, "Code Interpreter"),
]
TEST_REPLIES = [  # llama-models' tests/api/test_tool_utils.py, then the cases its decoder branches on
    '<function=getWeather>{"location":"New York","date":"2023-08-05"}',
    '[get_boiling_point(liquid_name="water", celcius=True)]',
    "[calculate_volume(radius=5.2, height=10)]",
    '[process_data(name="sample", value=42, active=True, ratio=3.14)]',
    "[initialize()]",
    '[analyze_text(content="Hello, world!", language="en")]<|eot_id|>',
    '{"type": "function", "name": "trending_songs", "parameters": {"n": 10}}<|eom_id|>',
    '<function=brave_search>{"q": "gold price"}</function><|eot_id|>',
    "<function=trending_songs>{'n': 10, 'genre': 'pop'}</function><|eot_id|>",
    "<function=broken>{'n': 10, }</function><|eot_id|>",
    ' <|python_tag|>wolfram_alpha.call(query="2^100")<|eom_id|>',
    "I would call brave_search.call(query=\"x\") here.<|eot_id|>",
    '{"answer": 42}<|eot_id|>',
    "  Paris is the capital of  ",
    "Paris. <|eot_id|>",
]


def _replies():
    for page, title in PUBLISHED_REPLIES:
        yield pytest.param(published(page, title)[1], id=title)
    for text in TEST_REPLIES:
        yield pytest.param(text, id=text[:30])


@pytest.mark.parametrize("reply", list(_replies()))
def test_reply_decodes_as_meta_decodes_it(tokenizer, meta_format, reply):
    from llama_models.datatypes import StopReason

    ids = tokenizer.encode(reply, bos=False, eos=False, allowed_special="all")
    ours = ChatFormat().decode_assistant(tokenizer, ids)
    meta = meta_format.decode_assistant_message(ids, StopReason.out_of_tokens)
    assert (ours["content"], ours["stop_reason"]) == (meta.content, meta.stop_reason.value)
    assert [(c["tool_name"], c["arguments"]) for c in ours["tool_calls"]] == calls(meta)


def test_every_call_of_a_python_list_is_returned_where_meta_keeps_the_first(tokenizer, meta_format):
    from llama_models.datatypes import StopReason
    from llama_models.llama3.tool_utils import parse_python_list_for_function_calls

    _, reply = published(LLAMA32, "Zero shot function calling")
    ids = tokenizer.encode(reply, bos=False, eos=False, allowed_special="all")
    ours = ChatFormat().decode_assistant(tokenizer, ids)
    meta = meta_format.decode_assistant_message(ids, StopReason.out_of_tokens)
    listed = parse_python_list_for_function_calls(reply.removesuffix("<|eot_id|>"))
    assert [(c["tool_name"], c["arguments"]) for c in ours["tool_calls"]] == listed
    assert calls(meta) == listed[:1] and len(listed) == 2


def test_each_call_gets_a_fresh_uuid4_call_id(tokenizer):
    ids = tokenizer.encode('[f(a=1), f(a=1)]<|eot_id|>', bos=False, eos=False, allowed_special="all")
    ids_a = [c["call_id"] for c in ChatFormat().decode_assistant(tokenizer, ids)["tool_calls"]]
    ids_b = [c["call_id"] for c in ChatFormat().decode_assistant(tokenizer, ids)["tool_calls"]]
    assert len(set(ids_a + ids_b)) == 4
    assert all(uuid.UUID(c).version == 4 for c in ids_a)


def test_end_of_text_ends_a_reply_as_eot_id_does(tokenizer):
    # Meta's decoder would keep "<|end_of_text|>" as text; a base model's stop token ends the turn here
    eot = ChatFormat().decode_assistant(tokenizer, tokenizer.encode("Blue.", bos=False, eos=False) + [tokenizer.eot_id])
    eos = ChatFormat().decode_assistant(tokenizer, tokenizer.encode("Blue.", bos=False, eos=True))
    assert eos == eot == {"role": "assistant", "content": "Blue.", "tool_calls": [], "stop_reason": "end_of_turn"}


@pytest.mark.parametrize("section", ["Builtin Tool Calling", "Builtin Code Interpreter", "JSON based tool calling"])
def test_decoded_reply_goes_back_into_the_dialog_as_meta_writes_its_own(tokenizer, meta_format, section):
    from llama_models.datatypes import StopReason

    _, reply = published(LLAMA31, section)
    ids = tokenizer.encode(reply, bos=False, eos=False, allowed_special="all")
    user = {"role": "user", "content": "Go."}
    ours = ChatFormat().encode_dialog(tokenizer, [user, ChatFormat().decode_assistant(tokenizer, ids)])
    meta = meta_format.decode_assistant_message(ids, StopReason.out_of_tokens)
    assert ours == meta_format.encode_dialog_prompt(meta_dialog([user]) + [meta]).tokens


def test_code_interpreter_written_as_a_function_call_keeps_its_code(tokenizer):
    # Meta's decoder renames the argument to "query", which its own encoder then cannot write back
    ids = tokenizer.encode('<function=code_interpreter>{"code": "print(1)"}</function><|eom_id|>',
                           bos=False, eos=False, allowed_special="all")
    reply = ChatFormat().decode_assistant(tokenizer, ids)
    assert [(c["tool_name"], c["arguments"]) for c in reply["tool_calls"]] == \
        [("code_interpreter", {"code": "print(1)"})]
    assert tokenizer.special_tokens["<|python_tag|>"] in ChatFormat().encode_dialog(tokenizer, [reply])


def test_python_list_calls_read_back_as_written(tokenizer):
    # Meta's encoder writes one list per call, a dict argument as {k=v} and a string unescaped: its
    # decoder reads none of those back; ours writes one list of Python literals
    call = {"tool_name": "plan", "arguments": {"steps": {"a": 1, "b": [True, None]}, "quote": 'say "hi"'}}
    sent = [{"role": "assistant", "content": "", "tool_calls": [call, dict(call, tool_name="again")]}]
    ids = ChatFormat(tool_format="python_list").encode_dialog(tokenizer, sent, add_generation_prompt=False)
    reply = ChatFormat().decode_assistant(tokenizer, ids[5:])  # after <|begin_of_text|> and the header
    assert [(c["tool_name"], c["arguments"]) for c in reply["tool_calls"]] == \
        [("plan", call["arguments"]), ("again", call["arguments"])]


def test_chatml_reply_is_its_text_before_im_end(smollm_tokenizer):
    ids = smollm_tokenizer.encode("Paris.<|im_end|>", bos=False, eos=False, allowed_special="all")
    assert ChatFormat("chatml").decode_assistant(smollm_tokenizer, ids) == \
        {"role": "assistant", "content": "Paris.", "tool_calls": [], "stop_reason": "end_of_turn"}


# -----------------------------------------------------------------------------
# bad input: one line that names the message and says what to give


@pytest.mark.parametrize("message, words", [
    ({"role": "robot", "content": "hi"}, "message 1 has role 'robot'; use one of system, user, assistant"),
    ({"role": "assistant", "content": "", "tool_calls": [{"arguments": {"query": "x"}}]},
     "message 1 (assistant), tool call 1 has no tool_name"),
    ({"role": "assistant", "tool_calls": [{"tool_name": "brave_search", "arguments": {"q": "x"}}]},
     "built-in tool 'brave_search' takes one string argument, 'query'"),
    ({"role": "assistant", "tool_calls": [{"tool_name": "code_interpreter", "arguments": {}}]},
     "built-in tool 'code_interpreter' takes one string argument, 'code'"),
    ({"role": "assistant", "tool_calls": [{"tool_name": "f", "arguments": "{}"}]}, "arguments of 'f' is a str"),
    ({"role": "user", "content": "x", "tool_calls": [WEATHER]}, "only an assistant message makes tool calls"),
    ({"role": "assistant", "content": "x", "stop_reason": "done"}, "stop_reason 'done'; use one of end_of_turn"),
    ({"role": "user"}, "message 1 (user) has no content"),
    ({"role": "user", "content": [{"type": "image", "data": b"\x89PNG"}]}, "this model reads text only"),
], ids=["role", "tool_name", "query", "code", "arguments", "user_calls", "stop_reason", "content", "image"])
def test_bad_message_is_a_one_line_config_error(tokenizer, message, words):
    with pytest.raises(ConfigError) as e:
        ChatFormat().encode_dialog(tokenizer, [message])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_unknown_tool_format_is_a_one_line_config_error(tokenizer):
    with pytest.raises(ConfigError, match=r"^unknown tool_format 'xml'; use one of json, function_tag, python_list$"):
        ChatFormat(tool_format="xml").encode_dialog(tokenizer, [{"role": "user", "content": "hi"}])


def test_tool_calls_in_chatml_are_a_config_error(smollm_tokenizer):
    with pytest.raises(ConfigError, match="use a llama3 model for tool calls"):
        ChatFormat("chatml").encode_dialog(smollm_tokenizer, [{"role": "assistant", "content": "",
                                                               "tool_calls": [WEATHER]}])
