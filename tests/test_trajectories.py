import json

import pytest

from conftest import WEATHER_TOOL, make_trajectory
from progadv_trl.demo.tiny import build_tokenizer
from progadv_trl.trajectories import TrajectoryError, as_trajectories, load_trajectories
from progadv_trl.rendering import ChatTemplateError, TokenizerMismatchError, check_same_tokenizer, render

# TRL ships these templates; all of them render tool calls.
TEMPLATES = ["qwen2_5", "qwen3_training", "llama3_1", "qwen3_instruct_2507", "qwen3_6"]


@pytest.fixture(scope="module", params=TEMPLATES)
def templated_tokenizer(request, tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp(request.param), template=request.param)


def test_every_span_decodes_to_its_message(templated_tokenizer):
    tok = templated_tokenizer
    trajs = as_trajectories([make_trajectory(i, n_turns=1 + i) for i in range(3)])
    for t in trajs:
        r = render(t, tok)
        full = tok.decode(r.input_ids)
        assert r.n_steps == len(t.assistant_message_indices) and r.truncation is None
        for (s, e), mi in zip(r.spans, r.message_indices):
            text = tok.decode(r.input_ids[s:e])
            msg = t.messages[mi]
            if msg["content"] in full:  # llama3_1 drops content beside tool calls: the model never sees it
                assert msg["content"] in text
            for tc in msg.get("tool_calls", []):
                assert tc["function"]["name"] in text
                for k, v in tc["function"]["arguments"].items():
                    assert k in text and str(v) in text
            # the role header is the template's, not the model's: never inside the span
            assert "assistant" not in text and "model\n" not in text
            # the end-of-turn token is the model's: always inside, as the last thing
            assert text.rstrip().endswith(("<|im_end|>", "<|eot_id|>", "<|eom_id|>")), text
            # and nothing of the next message leaks in
            assert "sunny" not in text or "sunny" in msg["content"]


def test_spans_are_a_single_tokenization(tiny_tokenizer):
    """The rendered ids are exactly the tokenization of the whole rendered text, not per-message concatenation."""
    t = as_trajectories([make_trajectory(5, n_turns=2)])[0]
    r = render(t, tiny_tokenizer)
    full = tiny_tokenizer.apply_chat_template(t.messages, tools=t.tools, tokenize=False)
    assert r.input_ids == tiny_tokenizer(full, add_special_tokens=False).input_ids


def test_qwen3_template_whole_is_refused_with_the_fix_and_auto_scores_it_as_generated(tmp_path):
    tok = build_tokenizer(tmp_path / "q3", template="qwen3")  # strips <think> from all but the last turn
    t = as_trajectories([make_trajectory(1)])[0]
    with pytest.raises(ChatTemplateError, match="qwen3_training"):
        render(t, tok, rendering="whole")
    assert render(t, tok).rows is not None  # auto (tests/test_as_generated.py checks the numbers)


def test_template_errors_name_the_trajectory(tmp_path):
    tok = build_tokenizer(tmp_path / "g3", template="gemma3")  # raises on a tool turn between assistant turns
    with pytest.raises(ChatTemplateError, match="'t1'.*cannot render"):
        render(as_trajectories([make_trajectory(1)])[0], tok)


def test_template_that_rewrites_history_is_refused(tiny_tokenizer, tmp_path):
    tok = build_tokenizer(tmp_path / "t", template="qwen2_5")
    # a template that writes the number of messages into every turn: prefixes never match the whole
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }} {{ messages|length }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    t = as_trajectories([make_trajectory(1)])[0]
    with pytest.raises(ChatTemplateError, match="t1"):
        render(t, tok)


BAD = [
    ({"id": "a"}, "messages"),
    ({"id": "a", "messages": []}, "messages"),
    ({"id": "a", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"id": "a", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"id": "a", "messages": [{"role": "user", "content": "x"}]}, "messages"),  # no assistant turn
    (
        {"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        {"id": "a", "messages": [{"role": "user", "content": "x", "tool_calls": []}, {"role": "assistant", "content": "y"}]},
        "messages[0].tool_calls",
    ),
    ({"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "failure_step": 1}, "failure_step"),
    ({"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "success": "yes"}, "success"),
    ({"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "metadata": [1]}, "metadata"),
    ({"id": ["a"], "messages": [{"role": "assistant", "content": "y"}]}, "id"),
    ("not a record", "<record>"),
]


@pytest.mark.parametrize("rec,field", BAD)
def test_bad_record_names_record_and_field(rec, field):
    good = make_trajectory(0)
    with pytest.raises(TrajectoryError) as e:
        load_trajectories([good, rec])
    err = e.value.errors[0]
    assert err.field == field
    assert err.record.startswith("index 1")
    assert "index 1" in str(e.value) and field in str(e.value)


def test_skip_mode_reports_every_bad_record(tmp_path):
    p = tmp_path / "t.jsonl"
    lines = [json.dumps(make_trajectory(0)), "{not json", json.dumps({"id": "x", "messages": []}), "", json.dumps(make_trajectory(1))]
    p.write_text("\n".join(lines) + "\n")
    res = load_trajectories(p, on_error="skip")
    assert [t.id for t in res.trajectories] == ["t0", "t1"]
    assert [(e.record, e.field) for e in res.errors] == [("t.jsonl line 2", "<record>"), ("t.jsonl line 3 (id 'x')", "messages")]
    assert "2 bad records skipped" in res.summary()
    with pytest.raises(TrajectoryError, match="t.jsonl line 2"):
        load_trajectories(p)


def test_duplicate_ids_are_reported():
    with pytest.raises(TrajectoryError, match="duplicate"):
        load_trajectories([make_trajectory(0), make_trajectory(0)])


def test_datasets_and_parquet_records_with_none_fields(tmp_path, tiny_tokenizer):
    """`datasets` fills absent fields with None and makes tool-call arguments a struct of every key seen."""
    import datasets

    recs = [make_trajectory(0, failure_step=0, success=False), make_trajectory(1, n_turns=2), make_trajectory(2)]
    recs[1]["messages"][2]["tool_calls"][0]["function"]["arguments"] = {"city": "x", "date": "monday"}
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs))
    ds = datasets.load_dataset("json", data_files=str(p), split="train")
    assert ds[1]["failure_step"] is None  # the behaviour we rely on
    for source in (ds, _to_parquet(ds, tmp_path / "t.parquet")):
        trajs = load_trajectories(source).trajectories
        assert [t.failure_step for t in trajs] == [0, None, None]
        # the None-filled "date" key datasets added to trajectory 0's arguments is gone again
        assert trajs[0].messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "c00"}
        direct = as_trajectories([recs[0]])[0]
        assert render(trajs[0], tiny_tokenizer).input_ids == render(direct, tiny_tokenizer).input_ids
    # json (a list) works too
    (tmp_path / "t.json").write_text(json.dumps(recs))
    assert len(load_trajectories(tmp_path / "t.json").trajectories) == 3


def _to_parquet(ds, path):
    ds.to_parquet(str(path))
    return path


def test_arguments_as_json_string_render_like_dicts(tiny_tokenizer):
    a = make_trajectory(3)
    b = json.loads(json.dumps(a))
    fn = b["messages"][2]["tool_calls"][0]["function"]
    fn["arguments"] = json.dumps(fn["arguments"])
    ta, tb = as_trajectories([a, b]) if False else (as_trajectories([a])[0], as_trajectories([b])[0])
    assert render(ta, tiny_tokenizer).input_ids == render(tb, tiny_tokenizer).input_ids


def test_tokenizer_mismatch_is_a_clear_error(tiny_tokenizer, tmp_path):
    other = build_tokenizer(tmp_path / "o", vocab_size=380)
    with pytest.raises(TokenizerMismatchError, match="vocabulary sizes"):
        check_same_tokenizer(tiny_tokenizer, other)
    same_vocab = build_tokenizer(tmp_path / "s", template="llama3_1")
    with pytest.raises(TokenizerMismatchError, match="chat templates"):
        check_same_tokenizer(tiny_tokenizer, same_vocab)
    check_same_tokenizer(tiny_tokenizer, build_tokenizer(tmp_path / "t"))


def test_scorer_checks_reference_tokenizer(tiny_models, tiny_tokenizer, tmp_path):
    from progadv_trl.engine import ProgressScorer

    pol, ref = tiny_models
    with pytest.raises(TokenizerMismatchError):
        ProgressScorer(pol, tiny_tokenizer, ref, reference_tokenizer=build_tokenizer(tmp_path / "o", vocab_size=390))


def test_tools_are_rendered(tiny_tokenizer):
    t = as_trajectories([make_trajectory(0)])[0]
    text = tiny_tokenizer.decode(render(t, tiny_tokenizer).input_ids)
    assert WEATHER_TOOL["function"]["description"] in text


def test_atomic_writes_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    """Reports, scores and bundles are written through a temporary file from mkstemp (mode 0600); the published file
    must be readable as any file the user writes (0666 less the umask)."""
    import os
    import stat

    from progadv_trl.utils import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "out.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.json").stat().st_mode) == 0o644
    assert not list(tmp_path.glob(".out.json.*"))  # no temporary left
