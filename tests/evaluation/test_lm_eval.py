"""The lm-evaluation-harness backend "mistral-jax" and `python -m infer.lm_eval` on the two shipped local tasks,
against lm-eval's own `hf` backend on the HF export of the same weights and against `infer.evaluate`."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mistral_jax.evaluation.lm_eval_tasks import TASKS_DIR  # noqa: E402

pytestmark = pytest.mark.slow     # a whole infer.lm_eval run and lm-eval's own HF backend, ~20 s

LIMIT = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory, eval_tiny):
    """The tiny model's HF folder (tests/test_evaluate.py's make_tiny, shared), and the output folder of
    infer.lm_eval on both shipped tasks."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    cfg, params, folder, hf = eval_tiny
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HOME", str(tmp / "hf_home"))
    mp.chdir(tmp)                                # the packaged tasks' data is found from any working folder
    from mistral_jax.cli import lm_eval as cli
    out = tmp / "out"
    try:
        rc = cli.main(["--checkpoint", str(folder), "--tasks", "zen_choice,stdlib_docs", "--limit", str(LIMIT),
                       "--max-length", "64", "--batch-size", "4", "--output", str(out)])
    finally:
        mp.undo()
    assert rc == 0
    return folder, out


def _samples(out, task):
    return [json.loads(x) for x in (out / f"samples_{task}.jsonl").read_text().splitlines()]


def test_results_and_samples_files(run):
    from mistral_jax.evaluation.lm_eval_backend import MODEL_NAME, MistralJaxLM
    from lm_eval.api.registry import get_model

    assert get_model(MODEL_NAME) is MistralJaxLM
    _, out = run
    res = json.loads((out / "results.json").read_text())
    zen, docs = res["results"]["zen_choice"], res["results"]["stdlib_docs"]
    assert 0 <= zen["acc,none"] <= 1 and 0 <= zen["acc_norm,none"] <= 1
    assert docs["bits_per_byte,none"] > 0 and docs["byte_perplexity,none"] > 1
    zs, ds = _samples(out, "zen_choice"), _samples(out, "stdlib_docs")
    assert len(zs) == len(ds) == LIMIT
    for s in zs:
        assert len(s["filtered_resps"]) == len(s["doc"]["choices"]) and s["target"] == s["doc"]["label"]
        assert all(isinstance(ll, float) and ll < 0 and isinstance(g, bool) for ll, g in s["filtered_resps"])
    # rolling: lm-eval's bits_per_byte from our per-document log-likelihoods
    lls = [s["filtered_resps"][0] for s in ds]
    nbytes = [len(s["doc"]["text"].encode()) for s in ds]
    assert abs(docs["bits_per_byte,none"] - (-sum(lls) / sum(nbytes) / np.log(2))) < 1e-6


def test_accuracy_and_logliks_equal_infer_evaluate(run, tmp_path):
    from mistral_jax.cli import evaluate as ev_cli

    folder, out = run
    data = tmp_path / "zen.jsonl"
    data.write_text("".join((TASKS_DIR / "zen_choice.jsonl").read_text().splitlines(True)[:LIMIT]))
    assert ev_cli.main(["--checkpoint", str(folder), "--task", "choice", "--data", str(data), "--output",
                        str(tmp_path / "ev")]) == 0
    rows = sorted((json.loads(x) for x in (tmp_path / "ev/examples.jsonl").read_text().splitlines()),
                  key=lambda r: r["line"])
    samples = sorted(_samples(out, "zen_choice"), key=lambda s: s["doc_id"])
    for r, s in zip(rows, samples):
        np.testing.assert_allclose(r["loglik"], [ll for ll, _ in s["filtered_resps"]], atol=1e-5, rtol=0)
        assert r["is_greedy"] == [g for _, g in s["filtered_resps"]]
    summary = json.loads((tmp_path / "ev/summary.json").read_text())
    res = json.loads((out / "results.json").read_text())["results"]["zen_choice"]
    assert summary["acc"]["value"] == res["acc,none"]


def test_backend_equals_lm_eval_hf_backend(run):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from mistral_jax.evaluation.lm_eval_backend import MistralJaxLM

    folder, _ = run
    zen = [json.loads(x) for x in (TASKS_DIR / "zen_choice.jsonl").read_text().splitlines()][:3]
    pairs = [(ex["context"], " " + c) for ex in zen for c in ex["choices"]] + [("", "Beautiful is better")]
    texts = [ex["context"] + " " + ex["choices"][ex["label"]] for ex in zen]
    texts.append("\n".join(f"{ex['context']} {ex['choices'][ex['label']]}" for ex in zen * 8))   # > 64 tokens
    ours = MistralJaxLM(str(folder), max_length=64, batch_size=4)
    hf = HFLM(pretrained=str(folder), max_length=64, batch_size=4, device="cpu", dtype="float32")
    for t in texts:   # precondition: both tokenizers agree on this text
        assert hf.tok_encode(t, add_special_tokens=False) == ours.tok_encode(t, add_special_tokens=False)
    pairs += [("The Zen of Python: Beautiful is ", "better than ugly."), ("Explicit is  ", " better")]
    from mistral_jax.evaluation.encoding import encode_pair
    for c, x in pairs[-3:]:     # infer.evaluate's split of (context, continuation) is lm-eval's
        assert encode_pair(ours.tok, c, x) == hf._encode_pair(c, x) if c else True
    pairs.append((texts[-1], " Beautiful is better than ugly."))     # longer than max_length: left-truncated
    ll_req = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    a, b = ours.loglikelihood(ll_req, disable_tqdm=True), hf.loglikelihood(ll_req, disable_tqdm=True)
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], atol=1e-4, rtol=0)
    assert [g for _, g in a] == [g for _, g in b]
    roll = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    hf.add_bos_token = False          # hf would otherwise score BOS + BOS + text; ours scores BOS + text
    assert len(ours.tok_encode(texts[-1])) > 2 * 64                               # several windows
    np.testing.assert_allclose(ours.loglikelihood_rolling(roll, disable_tqdm=True),
                               hf.loglikelihood_rolling(roll, disable_tqdm=True), atol=1e-4, rtol=0)


def test_generate_until_stops_and_chat_ids(run):
    from lm_eval.api.instance import Instance

    from mistral_jax.inference import decode
    from mistral_jax.evaluation.lm_eval_backend import MistralJaxLM

    folder, _ = run
    lm = MistralJaxLM(str(folder), max_length=64, batch_size=2)
    ctx = "The Zen of Python: Beautiful is"
    ids = lm.tok.encode(ctx, bos=True)
    full = lm.tok.decode(decode.generate(lm.params, lm.cfg, [ids], 8)[0])
    assert len(full) > 2
    stop = full[2:4]
    got = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": [stop], "max_gen_toks": 8}), 0),
                             Instance("generate_until", {}, (ctx, {"until": [], "max_gen_toks": 8}), 1)],
                            disable_tqdm=True)
    assert got == [full[:full.index(stop)], full]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = lm.apply_chat_template(msgs)
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    want = lm.tok.chat_tokenizer().encode_chat_completion(ChatCompletionRequest(
        messages=[SystemMessage(content="Be brief."), UserMessage(content="Hi there"),
                  AssistantMessage(content="Hello."), UserMessage(content="Bye")])).tokens
    assert lm.tok.eos_id in want      # the closing EOS of the answer: lost if the text were re-tokenized
    assert lm.tok_encode(text) == list(want)
    assert lm._encode_pair(text, " Hello")[0] == list(want)
