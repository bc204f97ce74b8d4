"""Chat data: Mistral instruct encoding (against mistral-common), answer-only target masks, packing, the
over-long rule, bad-line reports, the resumable stream, and the built-in example set."""

import json

import numpy as np
import pytest

from mistral_jax.data import chat_examples as ce
from mistral_jax.data.chat_files import ChatData, ChatReport, EncodedConversation, answer_prompts, expand_paths, \
    overlap_message, read_chat_data
from mistral_jax.data.chat_stream import ChatStream, pack_conversations
from mistral_jax.data.chat_template import encode_conversation, encode_prompt, fit_conversation
from mistral_jax.data.rows import BATCH_KEYS
from mistral_jax.data.tokenizer import Tokenizer, default_tokenizer_path
from mistral_jax.errors import ChatDataError, ChatFormatError
from mistral_jax.runtime.files import read_jsonl

SYSTEM = {"role": "system", "content": "Answer briefly."}
TURNS = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "And 3+3?\n- one"}, {"role": "assistant", "content": "6, of course. "},
         {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}]


@pytest.fixture(scope="module", params=["v1", "v3"])
def chat_tok(request):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    return request.param, getattr(MistralTokenizer, request.param)()


def _mc(messages):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    cls = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    return [cls[m["role"]](content=m["content"]) for m in messages]


@pytest.mark.parametrize("system", [False, True])
def test_prompt_prefixes_and_full_sequence_match_mistral_common(chat_tok, system):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    version, mt = chat_tok
    conv = ([SYSTEM] if system else []) + TURNS
    ids, mask = encode_conversation(conv, mt)
    n_sys = int(system)
    prefixes = [conv[:n_sys + k + 1] for k in range(0, len(TURNS), 2)]     # up to each user turn
    for prefix in prefixes:
        want = mt.encode_chat_completion(ChatCompletionRequest(messages=_mc(prefix))).tokens
        p_ids, p_mask = encode_conversation(prefix, mt)
        assert p_ids == want and not p_mask[-1]
        assert encode_prompt(prefix, mt) == want
    # the whole training sequence: mistral-common's fine-tuning encoding of the same request
    path = default_tokenizer_path(32000 if version == "v1" else 32768)
    ft = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
    assert ids == ft.encode_chat_completion(ChatCompletionRequest(messages=_mc(conv))).tokens
    assert len(mask) == len(ids)
    # a training sequence continues the prompt of its last turn; v1 (system prompt on the first user turn) and
    # v3 without one continue every earlier prompt too, v3 puts a system prompt on the last user turn only
    last = encode_prompt(prefixes[-1], mt)
    assert ids[:len(last)] == last
    sp = mt.instruct_tokenizer.tokenizer
    for prefix in prefixes[:-1]:
        p, p_mask = encode_conversation(prefix, mt)      # p is mistral-common's prompt (checked above)
        continues = version == "v1" or not system
        assert (ids[:len(p)] == p) == continues
        # Up to the prompt's last user turn the prompt and the training sequence agree, target mask included;
        # with v3 and a system prompt that turn is [INST] system + "\n\n" + user [/INST] (3 ... 4), not a target
        cut = len(p) if continues else max(i for i, t in enumerate(p) if t == 3)
        assert p[:cut] == ids[:cut] and p_mask[:cut] == mask[:cut] and not any(p_mask[cut:])
        if not continues:
            text = f"{SYSTEM['content']}\n\n{prefix[-1]['content']}"
            assert p[cut:] == [3] + sp.encode(text, bos=False, eos=False) + [4]
        answers = [m for m in prefix if m["role"] == "assistant"]
        assert sum(p_mask) == sum(len(sp.encode(m["content"].rstrip() if version == "v3" else m["content"],
                                                bos=False, eos=False)) + 1 for m in answers)


def test_target_mask_is_exactly_the_answers_and_their_eos():
    v1, v3 = Tokenizer(), Tokenizer.for_vocab(32768)
    conv = [SYSTEM] + TURNS[:4]
    sp = v3.sp.encode
    ids, mask = encode_conversation(conv, v3)
    a1, a2 = sp("4") + [2], sp("6, of course.") + [2]          # v3 drops an answer's trailing spaces
    assert ids == ([1, 3] + sp("What is 2+2?") + [4] + a1 + [3] + sp("Answer briefly.\n\nAnd 3+3?\n- one") + [4]
                   + a2)
    assert mask == [False] * 2 + [False] * len(sp("What is 2+2?")) + [False] + [True] * len(a1) + [False] * (
        2 + len(sp("Answer briefly.\n\nAnd 3+3?\n- one"))) + [True] * len(a2)
    for tok in (v1, v3):
        ids, mask = encode_conversation(conv, tok)
        spans, run = [], []                                             # maximal runs of trained ids
        for i, m in zip(ids + [0], mask + [False]):
            if m:
                run.append(i)
            elif run:
                spans, run = spans + [run], []
        answers = ["4", "6, of course. " if tok is v1 else "6, of course."]
        assert spans == [tok.sp.encode(a) + [tok.eos_id] for a in answers]
        assert [tok.decode(x[:-1]) for x in spans] == [a.rstrip() if tok is v3 else a for a in answers]
    assert {3, 4}.isdisjoint(i for i, m in zip(*encode_conversation(conv, v3)) if m)    # [INST], [/INST]
    weighted = [dict(m) for m in conv]
    weighted[2]["weight"] = 0                                           # mistral-finetune: context only
    ids_w, mask_w = encode_conversation(weighted, v3)
    assert ids_w == encode_conversation(conv, v3)[0] and sum(mask_w) == len(a2)


def test_conversation_rules_give_one_line_reasons():
    tok = Tokenizer()
    cases = [("x", "not_list", "must be a list"), ([], "not_list", "'messages' is empty"),
             ([TURNS[0], {"role": "tool", "content": "a"}], "unknown_role", "messages[1]: 'role' must be one of"),
             ([{"role": "user", "content": 5}], "not_string", "messages[0]: 'content' must be a string, got int"),
             ([{"role": "user", "content": "  \n"}], "empty_content", "messages[0]: empty 'content'"),
             ([TURNS[1], TURNS[0]], "bad_order", "user message first"),
             ([TURNS[0], TURNS[0]], "bad_order", "messages[1]: 'user' follows 'user'"),
             ([TURNS[0], TURNS[1], SYSTEM, TURNS[2]], "bad_order", "system message may only come first"),
             ([{**TURNS[0], "weight": 0}], "bad_weight", "only allowed on assistant"),
             ([{"role": "user", "content": "\ud800"}], "not_unicode", "lone surrogate")]
    for messages, reason, text in cases:
        with pytest.raises(ChatFormatError, match="^[^\n]*$") as e:
            encode_conversation(messages, tok)
        assert e.value.reason == reason and text in str(e.value), (messages, str(e.value))
    with pytest.raises(ChatFormatError, match="the last message is 'assistant'; a dialogue must end with a user"):
        encode_prompt(TURNS[:2], tok)
    for messages, reason in [([SYSTEM, TURNS[0]], "no_assistant"), (TURNS[:3], "last_not_assistant"),
                             ([TURNS[0], {**TURNS[1], "weight": 0}], "no_trainable")]:
        with pytest.raises(ChatFormatError) as e:
            fit_conversation(messages, tok, 64)
        assert e.value.reason == reason


def _conv(tokens, mask, line, key=0):
    return EncodedConversation(np.asarray(tokens, np.int32), np.asarray(mask, bool), [], "f", line, key)


def test_packing_keeps_conversations_apart_and_skips_rows_without_targets():
    rng = np.random.default_rng(0)
    lengths = [5, 9, 3, 12, 7, 4, 16, 2, 6]
    convs = [_conv(rng.integers(5, 1000, n), rng.random(n) < 0.5, i + 1) for i, n in enumerate(lengths)]
    convs[2] = _conv(convs[2].tokens, np.zeros(3, bool), 3)            # no target token
    convs[6] = _conv(convs[6].tokens, np.zeros(16, bool), 7)           # no target token, fills a row alone
    data = ChatData(convs, ChatReport(["f"], 16))
    stream = ChatStream(data, 1, shuffle=False)
    rows = []
    while True:
        try:
            rows.append(stream.next_row())
        except StopIteration:
            break
    seen = []
    for row in rows:
        assert set(row) == set(BATCH_KEYS) and all(v.dtype == np.int32 and v.shape == (16,) for v in row.values())
        assert row["target_mask"].sum() > 0
        seg = row["segment_ids"]
        n_seg = seg.max()
        assert list(np.unique(seg[seg > 0])) == list(range(1, n_seg + 1))
        used = int((seg > 0).sum())
        assert np.all(seg[:used] > 0) and np.all(np.diff(seg[:used]) >= 0)     # padding only at the end
        for s in range(1, n_seg + 1):
            at = np.flatnonzero(seg == s)
            assert np.array_equal(row["positions"][at], np.arange(len(at)))    # positions restart per conversation
            match = [c for c in convs if len(c.tokens) == len(at) and np.array_equal(c.tokens, row["tokens"][at])]
            assert len(match) == 1 and np.array_equal(match[0].target_mask, row["target_mask"][at] == 1)
            seen.append(match[0].line)
        pad = seg == 0
        assert not row["tokens"][pad].any() and not row["target_mask"][pad].any()
    assert 7 not in seen                                                # its row had no target: not emitted
    assert sorted(seen + [7]) == list(range(1, 10))                     # everything else exactly once
    with pytest.raises(ValueError, match="17 tokens do not fit seq_len=16"):
        list(pack_conversations([_conv(np.ones(17), np.ones(17), 1)], 16))


def test_over_long_conversations_are_truncated_at_an_answer_or_dropped():
    v3 = Tokenizer.for_vocab(32768)
    conv = [SYSTEM] + TURNS
    full, _ = encode_conversation(conv, v3)
    two, _ = encode_conversation(conv[:5], v3)                        # system + 2 turns, re-encoded
    one, one_mask = encode_conversation(conv[:3], v3)
    assert fit_conversation(conv, v3, len(full)).status == "ok"
    fit = fit_conversation(conv, v3, len(full) - 1)
    assert fit.status == "truncated" and fit.ids == two and fit.messages == conv[:5] and fit.n_full == len(full)
    sp = v3.sp.encode                                                     # the system prompt is on the kept last turn:
    assert two == ([1, 3] + sp("What is 2+2?") + [4] + sp("4") + [2, 3] + sp("Answer briefly.\n\nAnd 3+3?\n- one")
                   + [4] + sp("6, of course.") + [2])
    fit = fit_conversation(conv, v3, len(two) - 1)
    assert fit.status == "truncated" and (fit.ids, fit.target_mask) == (one, one_mask)
    fit = fit_conversation(conv, v3, len(one) - 1)
    assert fit.status == "dropped" and fit.ids == []


BAD_LINES = {
    3: (b"{not json", "bad_json", "not valid JSON"),
    11: (b'{"prompt": "caf\xe9", "completion": "x"}', "not_utf8", "not UTF-8 text (byte 0xe9"),
    19: (json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(), "unknown_role",
         "messages[0]: 'role' must be one of"),
    27: (json.dumps({"messages": TURNS[1:3] + TURNS[3:4]}).encode(), "bad_order", "user message first"),
    35: (json.dumps({"messages": [TURNS[0], {"role": "assistant", "content": ""}]}).encode(), "empty_content",
         "messages[1]: empty 'content'"),
    43: (json.dumps({"prompt": ["a"], "completion": "b"}).encode(), "not_string", "'prompt': 'content' must be a str"),
    51: (json.dumps({"messages": [SYSTEM, TURNS[0]]}).encode(), "no_assistant", "no assistant message"),
    59: (json.dumps({"messages": TURNS[:3]}).encode(), "last_not_assistant", "the last message is 'user'"),
    67: (json.dumps({"prompt": "only a prompt"}).encode(), "bad_fields", "'completion' is missing"),
    75: (b"[1, 2, 3]", "bad_fields", "expected an object with 'messages'"),
}


def _bad_file(tmp_path, n=80):
    """n lines, 10 of them bad (one of each kind in BAD_LINES), and one blank line at the end."""
    lines = []
    for i in range(1, n + 1):
        if i in BAD_LINES:
            lines.append(BAD_LINES[i][0])
        elif i % 2:
            lines.append(json.dumps({"prompt": f"Say {i}.", "completion": f"{i}"}).encode())
        else:
            lines.append(json.dumps({"messages": [SYSTEM] + TURNS[:2] + [{"role": "user", "content": f"n={i}?"},
                                                                        {"role": "assistant", "content": str(i)}],
                                     "id": i}).encode())
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    return path


def test_bad_lines_are_reported_by_line_and_counted(tmp_path):
    path = _bad_file(tmp_path, 100)
    data = read_chat_data(path, Tokenizer(), 64, on_error="skip")
    rep = data.report
    assert (rep.lines, rep.blank_lines, rep.conversations, rep.n_skipped) == (100, 1, 90, 10)
    assert rep.skipped == {"bad_json": 1, "not_utf8": 1, "unknown_role": 1, "bad_order": 1, "empty_content": 1,
                           "not_string": 1, "no_assistant": 1, "last_not_assistant": 1, "bad_fields": 2}
    assert len(rep.messages) == 10
    for msg, (n, (_, _, text)) in zip(rep.messages, sorted(BAD_LINES.items())):
        assert msg.startswith(f"{path}:{n}: ") and text in msg and "\n" not in msg, msg
    assert [c.line for c in data.conversations] == [n for n in range(1, 101) if n not in BAD_LINES]
    d = rep.to_dict()
    assert json.loads(json.dumps(d)) == d and d["n_skipped"] == 10 and d["trainable_tokens"] == rep.trainable_tokens
    assert rep.trainable_tokens == sum(int(c.target_mask.sum()) for c in data.conversations)
    summary = rep.summary()
    assert "90 conversations from 100 lines" in summary and "10 line(s) skipped" in summary
    assert f"{path}:3: not valid JSON" in summary
    with pytest.raises(ChatDataError, match=f"^{path}:3: not valid JSON"):
        read_chat_data(path, Tokenizer(), 64, on_error="stop")
    with pytest.raises(ChatDataError, match="no file matches"):
        read_chat_data(tmp_path / "missing*.jsonl", Tokenizer(), 64)


def test_over_long_lines_are_counted_in_the_report(tmp_path):
    tok = Tokenizer()
    path = tmp_path / "long.jsonl"
    long_answer = " ".join(["word"] * 80)
    path.write_text("\n".join(json.dumps(x) for x in [
        {"messages": TURNS},                                               # 6 turns: truncated at 32
        {"prompt": "Say it.", "completion": long_answer},                  # dropped
        {"prompt": "Hi", "completion": "Hello"}]) + "\n")
    rep = read_chat_data(path, tok, 32, on_error="stop").report        # not an error, even under "stop"
    assert (rep.conversations, rep.truncated, rep.dropped, rep.n_skipped) == (2, 1, 1, 0)
    assert rep.messages[0].startswith(f"{path}:1: truncated") and rep.messages[1].startswith(f"{path}:2: dropped")


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def _same(a, b):
    return len(a) == len(b) and all(set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_stream_resumes_exactly_and_checks_the_state(tmp_path):
    path = _bad_file(tmp_path, 60)
    data = read_chat_data(path, Tokenizer(), 64)
    s = ChatStream(data, 3, seed=5)
    per_epoch = s.rows_per_epoch
    assert 12 < per_epoch < 36                                          # the 12 batches below cross an epoch
    first = _take(s, 4)
    state = json.loads(json.dumps(s.state()))
    rest = _take(s, 8)
    assert s.state()["epoch"] >= 1
    r = ChatStream(data, 3, seed=5)
    r.restore(state)
    assert _same(_take(r, 8), rest)
    again = ChatStream(data, 3, seed=5)
    assert _same(_take(again, 12), first + rest)                        # deterministic from the seed
    other = ChatStream(data, 3, seed=6)
    assert not _same(_take(other, 4), first)
    for batch in first + rest:
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: ((3, 64), np.int32) for k in BATCH_KEYS}
    one = ChatStream(data, 1, seed=5)
    epoch0 = _take(one, per_epoch)
    epoch1 = _take(one, 1)
    n1 = one.rows_per_epoch                                             # packing (so the row count) follows the order
    epoch1 += _take(one, n1 - 1)
    assert (one.state()["epoch"], one.state()["row"]) == (1, n1) and not _same(epoch0[:5], epoch1[:5])
    assert sum(int(b["target_mask"].sum()) for b in epoch0) == sum(int(b["target_mask"].sum()) for b in epoch1)
    with pytest.raises(ValueError, match="seed"):
        other.restore(state)
    smaller = ChatData(data.conversations[:-1], data.report)
    with pytest.raises(ValueError, match="conversations"):
        ChatStream(smaller, 3, seed=5).restore(state)
    with pytest.raises(ValueError, match="field 'row' must be a non-negative int"):
        r.restore({**state, "row": -1})


def test_held_out_pass_and_splits(tmp_path):
    path = _bad_file(tmp_path, 60)
    tok = Tokenizer()
    data = read_chat_data(path, tok, 64)
    ev = ChatStream(data, 4, shuffle=False)
    start = ev.state()
    batches = list(ev)
    rows = [b for batch in batches for b in zip(*(batch[k] for k in BATCH_KEYS))]
    assert sum(int(seg.max()) for _, _, seg, _ in rows) == len(data.conversations)   # each conversation once
    assert sum(int(m.sum()) for *_, m in rows) == data.report.trainable_tokens
    n_real = ev.rows_per_epoch
    assert n_real % 4 and len(rows) == n_real + 4 - n_real % 4
    assert all(not any(x.any() for x in row) for row in rows[n_real:])               # padding rows are empty
    ev.restore(start)
    assert _same(list(ev), batches)                                     # the same pass again
    train, val = data.split(val_percent=30.0)
    assert len(train) + len(val) == len(data.conversations) and 0 < len(val) < len(train)
    assert {c.line for c in train}.isdisjoint(c.line for c in val)
    # the split follows each line's bytes, not its place in the file
    lines = path.read_bytes().split(b"\n")
    rev = tmp_path / "rev.jsonl"
    rev.write_bytes(b"\n".join(reversed(lines)))
    _, val_rev = read_chat_data(rev, tok, 64).split(val_percent=30.0)
    assert sorted(c.key for c in val_rev) == sorted(c.key for c in val)
    # separate held-out files: every line of the training files trains, val_percent or not
    other = tmp_path / "val.jsonl"
    other.write_text(json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n")
    files = expand_paths([path, other])
    tr, va = read_chat_data(files, tok, 64).split(files[1:], val_percent=30.0)
    assert (len(tr), len(va)) == (len(data.conversations), 1) and va[0].file == str(other)
    assert overlap_message(expand_paths(path), [other]) is None
    assert "both a training and a held-out file" in overlap_message(expand_paths(path), expand_paths(str(path)))


def test_example_set_is_deterministic_clean_and_held_out(tmp_path):
    tr, va = ce.write_examples(tmp_path / "a", 300, 60, seed=3)
    tr2, va2 = ce.write_examples(tmp_path / "b", 300, 60, seed=3)
    assert tr.read_bytes() == tr2.read_bytes() and va.read_bytes() == va2.read_bytes()
    assert tr.read_bytes() != ce.write_examples(tmp_path / "c", 300, 60, seed=4)[0].read_bytes()
    tok = Tokenizer()
    data = read_chat_data([tr, va], tok, 256, on_error="stop")
    assert data.report.conversations == 360 and data.report.truncated == data.report.dropped == 0
    train_lines, val_lines = set(tr.read_text().splitlines()), va.read_text().splitlines()
    assert len(train_lines) == 300 and len(set(val_lines)) == 60 and train_lines.isdisjoint(val_lines)
    names = {f"{m}.{f}" for m, f, _ in ce.stdlib_functions()}
    mentioned = lambda text: {n for n in names if f"`{n}`" in text}                          # noqa: E731
    assert mentioned(tr.read_text()).isdisjoint(mentioned(va.read_text()))
    targets = _greedy_targets(va)
    assert len(targets) == 60 and {t for *_, t in targets} <= set(ce.TASK_WEIGHTS)
    for (prompt, answer, task), line in zip(targets, val_lines):
        msgs = json.loads(line)["messages"]
        assert prompt == msgs[:-1] and answer == msgs[-1]["content"] and prompt[-1]["role"] == "user"
        if task == "add":
            a, b = [int(x) for x in prompt[-1]["content"] if x.isdigit()]
            assert answer == str(a + b)
        if task == "parity":
            n = int("".join(x for x in prompt[-1]["content"] if x.isdigit()))
            assert answer == ("even" if n % 2 == 0 else "odd")
    pairs = answer_prompts(read_chat_data(va, tok, 256).conversations, tok)
    assert [(tok.encode_chat(p), a) for p, a, _ in targets] == pairs


def _greedy_targets(path):
    """(prompt messages: everything before the last answer, that answer, its task) per line of an example file."""
    out = []
    for n, obj, why in read_jsonl(path):
        assert why is None, f"{path}:{n}: {why}"
        out.append((obj["messages"][:-1], obj["messages"][-1]["content"], obj.get("task", "")))
    return out
