"""Scoring as generated (issue 28): templates that rewrite earlier turns, reasoning in the action, nothing dropped
without a flag.

Every step's figures must equal an independent float64 scoring of (that step's context + that step), the context
being `apply_chat_template(messages[:t], add_generation_prompt=True)` and the step the template's latest-turn text,
with no offsets, no KV cache and no batching; on a prefix-preserving template, as generated equals whole.
"""

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from conftest import WEATHER_TOOL
from progadv_trl.demo.tiny import chat_template
from progadv_trl.engine import ProgressScorer
from progadv_trl.generated import distinct_tokens
from progadv_trl.rendering import ChatTemplateError, render
from progadv_trl.scoring import ScoringConfig
from progadv_trl.trajectories import TrajectoryError, as_trajectories

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def conversation(i=0, reasoning=True):
    """system, user, a tool call, its result, an answer, a second user turn, a last answer: reasoning in every
    assistant turn, as `reasoning_content` and as `<think>` inside `content` (the two ways templates read it)."""
    r = (lambda text: {"reasoning_content": text}) if reasoning else (lambda text: {})
    think = "<think>\nThe tool says sunny.\n</think>\n\n" if reasoning else ""
    msgs = [
        {"role": "system", "content": "You are a helpful agent."},
        {"role": "user", "content": f"Weather in city {i}?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL], **r("I should call the tool.")},
        {"role": "tool", "content": f"sunny {i}"},
        {"role": "assistant", "content": f"{think}It is sunny in city {i}."},
        {"role": "user", "content": "Thanks! And tomorrow?"},
        {"role": "assistant", "content": "I cannot tell tomorrow.", **r("No forecast tool here.")},
    ]
    return {"id": f"g{i}", "messages": msgs, "tools": [WEATHER_TOOL]}


def with_template(tokenizer, name):
    tok = copy.copy(tokenizer)
    tok.chat_template = chat_template(name)
    return tok


def independent_float64(policy64, reference64, tokenizer, rec):
    """Per step: sum over the step's tokens of log pi - log ref, each step in its own row (context + step)."""
    msgs, tools = rec["messages"], rec["tools"]
    out = []
    for mi, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        ctx = tokenizer.apply_chat_template(msgs[:mi], tools=tools, tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(msgs[: mi + 1], tools=tools, tokenize=False).rstrip()
        assert upto.startswith(ctx)
        ids = tokenizer(upto, add_special_tokens=False).input_ids
        s = len(tokenizer(ctx, add_special_tokens=False).input_ids)
        x = torch.tensor([ids])
        with torch.no_grad():
            lp = torch.log_softmax(policy64(x).logits[0].double(), -1)
            lr = torch.log_softmax(reference64(x).logits[0].double(), -1)
        tgt = x[0, s:, None]
        out.append(float((lp[s - 1 : -1].gather(-1, tgt) - lr[s - 1 : -1].gather(-1, tgt)).sum()))
    return out


@pytest.fixture(scope="module")
def models64(tiny_models):
    pol, ref = tiny_models
    return copy.deepcopy(pol).double().eval(), copy.deepcopy(ref).double().eval()


# the five the issue names (they rewrite history), and qwen3_training (prefix-preserving: whole, reasoning kept)
FLOAT64_TEMPLATES = ["qwen3", "qwen3_5_think", "qwen3_6", "phi3_5", "nemotron_3_nano", "qwen3_training"]


@pytest.mark.parametrize("name", FLOAT64_TEMPLATES)
def test_each_step_equals_float64_in_its_own_context(name, tiny_models, tiny_tokenizer, models64):
    pol, ref = tiny_models
    tok = with_template(tiny_tokenizer, name)
    recs = [conversation(0), conversation(1)]
    trajs = as_trajectories(recs)
    r = render(trajs[0], tok)
    assert (r.rows is not None) == (name != "qwen3_training")  # auto: as generated exactly where whole is not exact
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        scorer = ProgressScorer(pol, tok, ref, config=ScoringConfig(beta=0.5))
        scores = scorer.score(recs)
        scorer.score(recs)  # a second call in the same run says nothing again
    said = [str(x.message) for x in w if "rewrites earlier turns" in str(x.message)]
    assert len(said) == (0 if name == "qwen3_training" else 1)
    if said:
        assert f"{name}.jinja" in said[0] and "distinct tokens" in said[0]
    for rec, sc in zip(recs, scores):
        want = independent_float64(*models64, tok, rec)
        np.testing.assert_allclose([s.advantage for s in sc.steps], [0.5 * x for x in want], atol=1e-4, rtol=0)
        assert sc.rendering == (None if name == "qwen3_training" else "as_generated")
    assert max(abs(s.advantage) for s in scores[0].steps) > 0.1  # not 0 == 0
    # reasoning is inside the step's span (where the template writes it at all) and scored
    for j, mi in enumerate(r.message_indices):
        ids = r.rows[j].input_ids if r.rows else r.input_ids
        s, e = r.spans[j]
        text = tok.decode(ids[s:e])
        reasoning = trajs[0].messages[mi].get("reasoning_content") or "The tool says sunny."
        assert (reasoning in text) != ("reasoning" in r.dropped.get(j, [])), (j, text)
    if name != "phi3_5":  # Phi-3.5 renders no reasoning and no tool calls: flagged below
        assert r.dropped == {}
    else:
        assert r.dropped[0] == ["reasoning", "tool_calls"] and scores[0].steps[0].dropped == ["reasoning", "tool_calls"]


@pytest.mark.parametrize("name", ["qwen2_5", "qwen3_training"])
def test_as_generated_equals_whole_on_a_prefix_preserving_template(name, tiny_models, tiny_tokenizer):
    pol, ref = tiny_models
    tok = with_template(tiny_tokenizer, name)
    recs = [conversation(i) for i in range(3)]
    whole = ProgressScorer(pol, tok, ref, config=ScoringConfig(rendering="whole")).score(recs)
    gen = ProgressScorer(pol, tok, ref, config=ScoringConfig(rendering="as_generated")).score(recs)
    for a, b in zip(whole, gen):
        assert [s.tokens for s in a.steps] == [s.tokens for s in b.steps]
        np.testing.assert_allclose(a.advantages, b.advantages, atol=1e-5, rtol=0)
        for k in a.baselines:
            np.testing.assert_allclose(a.baselines[k], b.baselines[k], atol=1e-5, rtol=0, err_msg=k)
        assert b.rendering == "as_generated" and a.rendering is None


def test_shared_context_runs_once(tiny_models, tiny_tokenizer):
    """A chain reads each distinct token once per model (counted at the embeddings), and gives the numbers that
    running every row alone gives."""
    pol, ref = tiny_models
    tok = with_template(tiny_tokenizer, "qwen3")
    recs = [conversation(0)]
    r = render(as_trajectories(recs)[0], tok)
    total = sum(len(x.input_ids) for x in r.rows)
    assert distinct_tokens(r.rows) < 0.7 * total
    seen = []
    hooks = [m.get_input_embeddings().register_forward_hook(lambda mod, inp, out: seen.append(inp[0].numel()))
             for m in (pol, ref)]  # fmt: skip
    try:
        shared = ProgressScorer(pol, tok, ref).score(recs)[0]
        assert sum(seen) == 2 * distinct_tokens(r.rows)
        seen.clear()
        alone = ProgressScorer(pol, tok, ref, share_prefix=False).score(recs)[0]
        assert sum(seen) == 2 * total
    finally:
        for h in hooks:
            h.remove()
    np.testing.assert_allclose(shared.advantages, alone.advantages, atol=1e-5, rtol=0)


def test_chains_are_work_units_ranks_can_share(tiny_models, tiny_tokenizer):
    """`progadv score` under torchrun deals the engine's units to ranks by cost: a chain costs its distinct tokens,
    and running the dealt pieces one by one (as ranks do) gives the numbers of one process."""
    from progadv_trl import distributed
    from progadv_trl.prefix import Chain

    pol, ref = tiny_models
    scorer = ProgressScorer(pol, with_template(tiny_tokenizer, "qwen3"), ref)
    recs = [conversation(i) for i in range(3)] + [{"id": "w", "messages": conversation(9)["messages"][:5],
                                                   "tools": [WEATHER_TOOL]}]  # fmt: skip
    trajs, rendered = scorer.render(recs)
    assert rendered[3].rows is None  # one user turn: nothing rewritten, whole
    work = scorer.units(rendered)
    chains = [u for u in work if isinstance(u, Chain)]
    assert sorted(c.index for c in chains) == [0, 1, 2]
    assert all(distributed._cost(c, rendered) == distinct_tokens(rendered[c.index].rows) for c in chains)
    one = scorer.token_stats(rendered)
    for _, unit in distributed.pieces(work, rendered, 2):
        for i, st in scorer.run_unit(rendered, unit):
            np.testing.assert_array_equal(st.log_ratio, one[i].log_ratio)
            np.testing.assert_array_equal(st.step, one[i].step)


def test_whole_refuses_and_names_the_way_out(tiny_tokenizer):
    t = as_trajectories([conversation(0)])[0]
    with pytest.raises(ChatTemplateError, match="as_generated") as e:
        render(t, with_template(tiny_tokenizer, "qwen3"), rendering="whole")
    assert e.value.field.startswith("messages[")


@pytest.mark.parametrize("name,mi", [("deepseek_r1_distill", 2), ("qwen3_5_nothink", 2)])
def test_a_turn_that_does_not_continue_its_generation_prompt_is_refused(name, mi, tiny_tokenizer):
    """DeepSeek-R1 distills prefill "<think>\\n" and render the turn without it; Qwen3.5 no-think prefills an empty
    think block that a turn with reasoning cannot follow. Without the raw output in `content`, the tokens the model
    produced cannot be rebuilt: refused, never guessed."""
    t = as_trajectories([conversation(0)])[0]
    for rendering in ("auto", "as_generated"):
        with pytest.raises(ChatTemplateError, match="continuation of its own generation prompt") as e:
            render(t, with_template(tiny_tokenizer, name), rendering=rendering)
        assert e.value.field == f"messages[{mi}]"


HARMONY = {  # gpt-oss: what the model writes after the prompt's "<|start|>assistant", per turn of conversation()
    2: "<|channel|>analysis<|message|>I should call the tool.<|end|><|start|>assistant to=functions.get_weather"
       '<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
    4: "<|channel|>analysis<|message|>The tool says sunny.<|end|><|start|>assistant<|channel|>final<|message|>It is "
       "sunny in city 0.<|return|>",
    6: "<|channel|>analysis<|message|>No forecast tool here.<|end|><|start|>assistant<|channel|>final<|message|>I "
       "cannot tell tomorrow.<|return|>",
}  # fmt: skip
R1 = {  # a DeepSeek-R1 distill after its prompt's "<think>\n": the raw output, then the end of turn
    2: "I know this one.\n</think>\n\nIt is sunny.<｜end▁of▁sentence｜>",
    4: "Still no tool.\n</think>\n\nNo idea.<｜end▁of▁sentence｜>",
}


def _rebuilt_case(name):
    if name == "gptoss":  # gpt-oss drops an earlier turn's analysis once the latest turn is a final answer
        rec = conversation(0)
        rec["messages"][4] = {"role": "assistant", "content": "It is sunny in city 0.", "reasoning_content": "The tool says sunny."}
        return rec, HARMONY, {**{}, "thinking": True}
    msgs = [{"role": "system", "content": "You are a helpful agent."}, {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "<think>\nI know this one.\n</think>\n\nIt is sunny."},
            {"role": "user", "content": "Tomorrow?"},
            {"role": "assistant", "content": "<think>\nStill no tool.\n</think>\n\nNo idea."}]  # fmt: skip
    return {"id": "r1", "messages": msgs, "tools": None}, R1, {}


@pytest.mark.parametrize("name", ["gptoss", "deepseek_r1_distill"])
def test_turns_the_template_writes_otherwise_are_rebuilt_exactly(name, tiny_models, tiny_tokenizer, models64):
    """gpt-oss at its second turn and a DeepSeek-R1 distill at every turn do not write the latest turn as an
    extension of their generation prompt; the turn is rebuilt (module `rendering.latest_turn`) and scored in the
    prompt's context: checked against the expected text, written out by hand, and a float64 scoring of it."""
    pol, ref = tiny_models
    tok = with_template(tiny_tokenizer, name)
    rec, expected, _ = _rebuilt_case(name)
    msgs = rec["messages"]
    r = render(as_trajectories([rec])[0], tok)
    assert r.rows is not None and r.dropped == {}
    sc = ProgressScorer(pol, tok, ref).score([rec])[0]
    pol64, ref64 = models64
    for j, mi in enumerate(r.message_indices):
        s, e = r.spans[j]
        assert tok.decode(r.rows[j].input_ids[s:e]) == expected[mi]
        raw = [{**m, "thinking": m["reasoning_content"]} if m.get("reasoning_content") else m for m in msgs[:mi]]
        ctx = tok.apply_chat_template(raw, tools=rec["tools"], tokenize=False, add_generation_prompt=True)
        ids = tok(ctx + expected[mi], add_special_tokens=False).input_ids
        a = len(tok(ctx, add_special_tokens=False).input_ids)
        x = torch.tensor([ids])
        with torch.no_grad():
            lp = torch.log_softmax(pol64(x).logits[0].double(), -1)
            lr = torch.log_softmax(ref64(x).logits[0].double(), -1)
        want = float((lp[a - 1 : -1].gather(-1, x[0, a:, None]) - lr[a - 1 : -1].gather(-1, x[0, a:, None])).sum())
        np.testing.assert_allclose(sc.steps[j].advantage, want, atol=1e-4, rtol=0)


def test_truncated_rows_are_flagged(tiny_models, tiny_tokenizer):
    pol, ref = tiny_models
    tok = with_template(tiny_tokenizer, "qwen3")
    sc = ProgressScorer(pol, tok, ref, max_length=300).score([conversation(0)])[0]
    assert sc.rendering == "as_generated" and sc.truncation is not None
    assert sc.truncation["context_cut_steps"] and all(s.tokens > 0 for s in sc.steps)


# ----------------------------------------------------------------------------------------------------------------
# Reasoning kept, dict arguments, nothing dropped silently


def test_loader_keeps_reasoning_and_names_bad_fields():
    rec = conversation(0)
    rec["messages"][6] = {"role": "assistant", "content": "x", "thinking": "hmm"}  # gpt-oss's key, read as the same
    t = as_trajectories([rec])[0]
    assert t.messages[2]["reasoning_content"] == "I should call the tool."
    assert t.messages[6]["reasoning_content"] == "hmm" and "thinking" not in t.messages[6]
    for bad, field in [({"role": "user", "content": "x", "reasoning_content": "r"}, "messages[1].reasoning_content"),
                       ({"role": "assistant", "content": "x", "reasoning": 3}, "messages[1].reasoning")]:  # fmt: skip
        with pytest.raises(TrajectoryError) as e:
            as_trajectories([{"id": "b", "messages": [{"role": "user", "content": "q"}, bad]}])
        assert e.value.errors[0].field == field


def test_dict_arguments_reach_a_template_that_needs_a_string(tiny_tokenizer):
    from progadv_trl.rendering import chat_text

    tok = with_template(tiny_tokenizer, "deepseekv3")  # concatenates arguments: a dict raises inside jinja
    rec = conversation(0, reasoning=False)
    with pytest.raises(TypeError):
        tok.apply_chat_template(rec["messages"], tools=rec["tools"], tokenize=False)
    assert '{"city": "Paris"}' in chat_text(tok, rec["messages"], rec["tools"])
    # rendered, it is refused for its own reason (it prefills "<think>" and then writes the turn without it), not
    # for the argument type
    with pytest.raises(ChatTemplateError, match="continuation of its own generation prompt"):
        render(as_trajectories([rec])[0], tok)


def test_a_tool_call_the_template_drops_is_flagged_warned_and_refused_when_strict(tiny_models, tiny_tokenizer):
    pol, ref = tiny_models
    tok = with_template(tiny_tokenizer, "llama3_training")  # a tool-call-only turn renders as an empty turn
    tok.bos_token = "<|endoftext|>"
    rec = conversation(0, reasoning=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sc = ProgressScorer(pol, tok, ref).score([rec])[0]
    assert [s.dropped for s in sc.steps] == [["tool_calls"], [], []]
    assert sc.to_dict()["steps"][0]["dropped"] == ["tool_calls"] and "dropped" not in sc.to_dict()["steps"][1]
    said = [str(x.message) for x in w if "nowhere" in str(x.message)]
    assert len(said) == 1 and "llama3_training.jinja" in said[0] and "message 2" in said[0]
    with pytest.raises(ChatTemplateError) as e:
        ProgressScorer(pol, tok, ref, config=ScoringConfig(strict=True)).score([rec])
    assert e.value.field == "messages[2].tool_calls" and "'g0'" in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# The agent loop, the CLI, the converter


@pytest.mark.parametrize("name,cut", [("qwen3", 6), ("gptoss", 4)])
def test_session_candidates_equal_the_step_scored_as_generated(name, cut, tiny_models, tiny_tokenizer):
    """qwen3 after a second user turn (the template now strips earlier reasoning); gpt-oss after a tool result, where a
    final answer's rendering drops the analysis of the tool-call turn before it (the turn is rebuilt)."""
    from progadv_trl.session import CriticSession, from_step

    pol, ref = tiny_models
    tok = with_template(tiny_tokenizer, name)
    scorer = ProgressScorer(pol, tok, ref)
    msgs = conversation(0)["messages"]
    state = msgs[:cut]
    session = CriticSession(scorer, state[:3], [WEATHER_TOOL])
    session.append(state[3:])  # the history as the template rewrites it
    assert session.cached
    cands = [{"role": "assistant", "content": "It is sunny.", "reasoning_content": "The tool answered."},
             {"role": "assistant", "content": "", "tool_calls": [CALL], "reasoning_content": "Check again."}]  # fmt: skip
    got = session.score(cands)
    recs = [{"id": f"c{i}", "messages": state + [c], "tools": [WEATHER_TOOL]} for i, c in enumerate(cands)]
    want = [from_step(ts, len(ts.steps) - 1) for ts in scorer.score(recs)]
    for a, b in zip(got, want):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(a.advantage, b.advantage, atol=1e-5, rtol=0)


def test_cli_takes_rendering_and_strict():
    from progadv_trl.cli import parse

    _, values = parse(["score", "t.jsonl", "--policy", "p", "-o", "o.jsonl", "--rendering", "as_generated", "--strict"])
    scoring = next(v for v in values if type(v).__name__ == "ScoringArguments")
    assert scoring.overrides()["rendering"] == "as_generated" and scoring.overrides()["strict"] is True
    assert ScoringConfig(**scoring.overrides()).to_dict()["rendering"] == "as_generated"  # what a manifest records
    with pytest.raises(SystemExit):
        parse(["score", "t.jsonl", "--policy", "p", "-o", "o.jsonl", "--rendering", "sometimes"])


def test_progadv_score_on_a_qwen3_checkpoint(tiny_dir, tiny_tokenizer, tmp_path, capsys):
    """The command a new user runs: one notice, as the command's own line, and every step scored as generated."""
    import shutil

    from progadv_trl.cli import main

    tok = with_template(tiny_tokenizer, "qwen3")
    for who in ("policy", "reference"):
        shutil.copytree(tiny_dir[who], tmp_path / who)
        tok.save_pretrained(tmp_path / who)
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(conversation(i)) for i in range(2)) + "\n")
    import sys
    import warnings

    with warnings.catch_warnings():  # as the interpreter shows them (pytest would record them instead)
        warnings.simplefilter("default")
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(warnings.formatwarning(m, c, f, n, line))
        assert main(["score", "--policy", str(tmp_path / "policy"), "--reference", str(tmp_path / "reference"),
                     str(tmp_path / "t.jsonl"), "-o", str(tmp_path / "o.jsonl")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("progadv: the chat template (TRL's qwen3.jinja) rewrites earlier turns") == 1
    assert "UserWarning" not in err
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [x["rendering"] for x in lines] == ["as_generated"] * 2 and all(len(x["steps"]) == 3 for x in lines)


def test_tau2_keeps_reasoning_where_the_log_has_it():
    from progadv_trl.formats.tau2 import convert_simulation

    sim = {"id": "s", "task_id": "t", "reward_info": {"reward": 1.0}, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "reasoning_content": "greet"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "bye", "raw_data": {"choices": [{"message": {"reasoning_content": "end"}}]}},
    ]}  # fmt: skip
    rec = convert_simulation(json.loads(json.dumps(sim)), "r.json index 0")
    asst = [m for m in rec["messages"] if m["role"] == "assistant"]
    assert [m.get("reasoning_content") for m in asst] == ["greet", "end"]
    assert as_trajectories([rec])[0].messages[-1]["reasoning_content"] == "end"
