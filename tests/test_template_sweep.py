"""Every text chat template the pinned TRL ships, given one tool-calling, multi-turn agent conversation with
reasoning: each takes one of the paths docs/supported.md lists, and this test pins which.

- whole: the template is prefix-preserving for it; spans from one rendering.
- as_generated: it rewrites earlier turns (drops their reasoning); each step scored in the context the model read.
- refused, cannot render: the template cannot render the conversation at all (no system or tool role, roles that
  must alternate); the message carries the template's own reason.
- refused, not a continuation: the template does not write the latest turn after its own generation prompt (it
  prefills `<think>` and then writes the turn without it, and the record has no raw output with its `<think>` block
  in `content`), so the tokens the model produced cannot be rebuilt; refused rather than guessed. Those templates
  are also given the conversation in their own convention (OWN_CONVENTION), where they score it.
Render only, on a tiny tokenizer: no model runs here (tests/test_as_generated.py checks the numbers).
"""

import copy
import re
from pathlib import Path

import pytest

from progadv_trl.rendering import ChatTemplateError, render
from progadv_trl.trajectories import as_trajectories

ROOT = Path(__file__).resolve().parents[1]
VISION = ("idefics3", "llava_next", "smolvlm", "qwen2_5_vl", "qwen3_vl", "lfm2_2_5_vl", "gemma3")
CANNOT = "refused: cannot render"
NOT_CONTINUED = "refused: not a continuation"

# template -> (path, what of which step the template renders nowhere: {step: parts})
EXPECTED = {
    "cohere": (CANNOT, {}), "cohere2": (CANNOT, {}), "cohere2_training": (CANNOT, {}), "cohere_training": (CANNOT, {}),
    "deepseek_r1_distill": (NOT_CONTINUED, {}), "deepseek_r1_distill_training": (NOT_CONTINUED, {}),
    "deepseekv3": (NOT_CONTINUED, {}), "deepseekv3_training": (NOT_CONTINUED, {}),
    "diffusion_gemma": ("as_generated", {}), "diffusion_gemma_training": ("as_generated", {}),
    "gemma": (CANNOT, {}), "gemma_training": (CANNOT, {}),
    # Gemma 4 writes reasoning only in turns that call a tool (v2: in none), even in the latest turn
    "gemma4": ("as_generated", {1: ["reasoning"], 2: ["reasoning"]}),
    "gemma4_v2": ("whole", {0: ["reasoning"], 1: ["reasoning"], 2: ["reasoning"]}),
    "gemma4_v3": ("as_generated", {1: ["reasoning"], 2: ["reasoning"]}),
    "gemma4_v4": ("as_generated", {1: ["reasoning"], 2: ["reasoning"]}), "gemma4_v5": ("as_generated", {}),
    "glm4moe": ("as_generated", {}), "glm4moe_training": ("as_generated", {}),
    "gptoss": ("as_generated", {}), "gptoss_training": ("as_generated", {}),
    "lfm2": ("whole", {0: ["reasoning", "tool_calls"], 1: ["reasoning"], 2: ["reasoning"]}),
    "lfm2_2_5": ("as_generated", {}), "lfm2_2_5_v2": ("as_generated", {}),
    "lfm2_training": ("whole", {0: ["reasoning", "tool_calls"], 1: ["reasoning"], 2: ["reasoning"]}),
    "lfm2_v2": ("whole", {0: ["reasoning"], 1: ["reasoning"], 2: ["reasoning"]}),
    "lfm2_v2_training": ("whole", {0: ["reasoning"], 1: ["reasoning"], 2: ["reasoning"]}),
    "llama3": ("whole", {0: ["reasoning", "tool_calls"], 1: ["reasoning"], 2: ["reasoning"]}),
    "llama3_1": ("whole", {0: ["reasoning"], 1: ["reasoning"], 2: ["reasoning"]}),
    "llama3_2": ("whole", {0: ["reasoning"], 1: ["reasoning"], 2: ["reasoning"]}),
    "llama3_training": ("whole", {0: ["reasoning", "tool_calls"], 1: ["reasoning"], 2: ["reasoning"]}),
    "muse_glimmer": ("whole", {}), "muse_glimmer_training": ("whole", {}),
    "nemotron_3_5_lightning": ("as_generated", {}), "nemotron_3_5_lightning_training": ("as_generated", {}),
    "nemotron_3_nano": ("as_generated", {}), "nemotron_3_nano_training": ("as_generated", {}),
    "nemotron_3_super": ("as_generated", {}), "nemotron_3_super_training": ("as_generated", {}),
    "nemotron_3_ultra": ("as_generated", {}), "nemotron_3_ultra_training": ("as_generated", {}),
    "phi3": ("as_generated", {0: ["reasoning", "tool_calls"], 1: ["reasoning"], 2: ["reasoning"]}),
    "phi3_5": ("as_generated", {0: ["reasoning", "tool_calls"], 1: ["reasoning"], 2: ["reasoning"]}),
    "phi3_5_training": ("as_generated", {0: ["reasoning", "tool_calls"], 1: ["reasoning"], 2: ["reasoning"]}),
    "phi3_training": ("as_generated", {0: ["reasoning", "tool_calls"], 1: ["reasoning"], 2: ["reasoning"]}),
    "qwen2_5": ("whole", {0: ["reasoning"], 1: ["reasoning"], 2: ["reasoning"]}),
    "qwen2_5_training": ("whole", {0: ["reasoning"], 1: ["reasoning"], 2: ["reasoning"]}),
    "qwen3": ("as_generated", {}),
    "qwen3_5_nothink": (NOT_CONTINUED, {}), "qwen3_5_nothink_training": (NOT_CONTINUED, {}),
    "qwen3_5_think": ("as_generated", {}), "qwen3_5_think_training": ("whole", {}),
    "qwen3_6": ("as_generated", {}), "qwen3_6_training": ("whole", {}),
    "qwen3_8": ("whole", {}), "qwen3_8_training": ("whole", {}),
    "qwen3_instruct_2507": ("whole", {0: ["reasoning"], 1: ["reasoning"], 2: ["reasoning"]}),
    "qwen3_instruct_2507_training": ("whole", {0: ["reasoning"], 1: ["reasoning"], 2: ["reasoning"]}),
    "qwen3_training": ("whole", {}),
}  # fmt: skip


# The templates refused above, given the conversation in their own convention: DeepSeek's raw output in `content`
# (its <think> block included, the reasoning_content left out), Qwen3.5 no-think without reasoning.
OWN_CONVENTION = {
    "deepseek_r1_distill": ("as_generated", {0: ["tool_calls"]}), "deepseek_r1_distill_training": ("whole", {0: ["tool_calls"]}),
    "deepseekv3": ("as_generated", {}), "deepseekv3_training": ("as_generated", {}),
    "qwen3_5_nothink": ("as_generated", {}), "qwen3_5_nothink_training": ("whole", {}),
}  # fmt: skip


def text_templates() -> list[str]:
    import trl

    d = Path(trl.__file__).parent / "chat_templates"
    return sorted(p.stem for p in d.glob("*.jinja") if not p.stem.startswith(VISION))


CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
MESSAGES = [
    {"role": "system", "content": "You are a helpful agent."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL], "reasoning_content": "I should call the tool."},
    {"role": "tool", "content": "sunny 21"},
    {"role": "assistant", "content": "It is sunny, 21 degrees.", "reasoning_content": "The tool says sunny."},
    {"role": "user", "content": "Thanks! And tomorrow?"},
    {"role": "assistant", "content": "I cannot tell tomorrow.", "reasoning_content": "No forecast tool here."},
]
NEXT = {2: "sunny 21", 4: "Thanks! And tomorrow?", 6: None}  # what follows each turn: never inside its span


@pytest.fixture(scope="module")
def traj():
    from conftest import WEATHER_TOOL

    return as_trajectories([{"id": "sweep", "messages": MESSAGES, "tools": [WEATHER_TOOL]}])[0]


@pytest.fixture(scope="module")
def base_tokenizer(tiny_tokenizer):
    tok = copy.copy(tiny_tokenizer)
    tok.bos_token = "<|endoftext|>"  # Llama 3's templates write it; the tiny tokenizer has none of its own
    return tok


def outcome(tok, traj):
    try:
        r = render(traj, tok)
    except ChatTemplateError as e:
        if "continuation of its own generation prompt" in str(e):
            return NOT_CONTINUED, None, str(e)
        assert "cannot render it" in str(e), str(e)
        return CANNOT, None, str(e)
    return ("whole" if r.rows is None else "as_generated"), r, ""


def test_the_sweep_covers_every_text_template():
    assert len(text_templates()) == 59
    assert sorted(EXPECTED) == text_templates()


def own_convention(name: str) -> list[dict]:
    if name.startswith("qwen3_5_nothink"):
        return [{k: v for k, v in m.items() if k != "reasoning_content"} for m in MESSAGES]
    out = []
    for m in MESSAGES:
        m = dict(m)
        if m.get("reasoning_content"):
            m["content"] = "<think>\n" + m.pop("reasoning_content") + "\n</think>\n\n" + m["content"]
        out.append(m)
    return out


@pytest.mark.parametrize("name,convention", [(n, False) for n in sorted(EXPECTED)] + [(n, True) for n in sorted(OWN_CONVENTION)])
def test_template_takes_its_path(name, convention, base_tokenizer, traj):
    from conftest import WEATHER_TOOL
    from progadv_trl.demo.tiny import chat_template

    tok = copy.copy(base_tokenizer)
    tok.chat_template = chat_template(name)
    if convention:
        traj = as_trajectories([{"id": "sweep", "messages": own_convention(name), "tools": [WEATHER_TOOL]}])[0]
    path, r, why = outcome(tok, traj)
    want_path, want_dropped = (OWN_CONVENTION if convention else EXPECTED)[name]
    assert path == want_path, why
    if r is None:
        assert "trajectory 'sweep'" in why and len(why) > 80  # names the record and says why
        return
    assert r.dropped == want_dropped
    for j, mi in enumerate(r.message_indices):
        ids = r.rows[j].input_ids if r.rows else r.input_ids
        s, e = r.spans[j]
        text = tok.decode(ids[s:e])
        msg, lost = MESSAGES[mi], r.dropped.get(j, [])
        reasoning_given = "<think>" in traj.messages[mi]["content"] or traj.messages[mi].get("reasoning_content")
        if reasoning_given:
            assert (msg["reasoning_content"] in text) != ("reasoning" in lost), text
        assert (not msg["content"] or msg["content"] in text) != ("content" in lost), text
        assert ("get_weather" in text) == ("tool_calls" in msg and "tool_calls" not in lost), text
        assert "{'city'" not in text  # arguments written as JSON (or the template's own syntax), never a Python repr
        if NEXT[mi]:
            assert NEXT[mi] not in text  # nothing of the next message leaks in
        assert "You are a helpful agent" not in text and "Weather in Paris?" not in text


def test_docs_table_lists_every_template_and_its_path():
    text = (ROOT / "docs" / "supported.md").read_text(encoding="utf-8")
    rows = {n: (p, own) for n, p, own in re.findall(r"^\| `([a-z0-9_]+)` \| ([^|]+?) \| [^|]* \| ([^|]+?) \|", text, flags=re.M)}
    assert {k: v[0] for k, v in rows.items() if k in EXPECTED} == {k: p for k, (p, _) in EXPECTED.items()}
    assert {k: v[1] for k, v in rows.items() if v[1] != "-"} == {k: p for k, (p, _) in OWN_CONVENTION.items()}
