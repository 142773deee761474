"""What the benchmarks run on: model shapes, agent trajectories, and forward FLOPs counted from shapes.

Shapes (Qwen2 architecture, randomly initialised with `from_config`; nothing is downloaded):

- "qwen2.5-1.5b": Qwen2.5-1.5B's config (hidden 1536, 28 layers, intermediate 8960, 12 heads / 2 kv heads, vocabulary
  151936, tied embeddings). Its output layer is 15.1 % of a token's matmul FLOPs (`output_share`). For a GPU.
- "realistic": a CPU-sized decoder with the same output-layer share (15.3 %) and a 32768-token vocabulary: hidden
  128, 28 layers, intermediate 2048, 4 heads / 1 kv head, tied embeddings. With a 32k vocabulary the share fixes
  layers x width (the decoder must do ~5.6x the output layer's work per token), so a CPU-sized model is a narrow
  one; the price is that attention is a larger part of its decoder than of Qwen2.5-1.5B's (`output_share` at a
  context: 12 % vs 14 % with attention counted at 1k tokens of context).
- "decoder": a small model whose decoder is all the work (hidden 256, 4 layers, vocabulary 2048: the output layer
  is 12 % of a token's FLOPs) on 16 groups of 8 rollouts sharing a 316-token prompt: per-call and per-batch
  overheads of the engine show here, where the realistic shape's long passes hide them.
- "tiny": the benchmark's earlier shape (hidden 128, 4 layers, vocabulary 32000, untied): its output layer is most
  of the work, which is not what users run; kept as a second row.

Trajectories: `agent_group` builds groups of rollouts that share one prompt (a long system prompt with tool schemas
and a task), then diverge into tool calls, tool results and answers, as GRPO groups, best-of-N candidates and a
task's retries do. The tiny row keeps `demo.tiny.make_trajectory`'s short weather dialogues.
"""

from __future__ import annotations

import json
import random

SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "realistic": dict(hidden_size=128, num_hidden_layers=28, intermediate_size=2048, num_attention_heads=4,
                      num_key_value_heads=1, vocab_size=32768, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, num_hidden_layers=4, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=False),
    "decoder": dict(hidden_size=256, num_hidden_layers=4, intermediate_size=1024, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=False),
}  # fmt: skip
# The "decoder" shape's trajectories (`agent_trajectories(tok, DECODER_GROUPS, **DECODER_SET)`): a user's GRPO held-out
# rollouts, 16 groups of 8 tool-calling rollouts sharing a ~316-token prompt (one sentence of policy, one tool).
DECODER_GROUPS = 16
DECODER_SET = dict(min_tokens=330, max_tokens=530, n_tools=1, policy_sentences=1)


def qwen2_config(shape: str, tokenizer, max_position_embeddings: int = 8192):
    from transformers import Qwen2Config

    kw = dict(SHAPES[shape])
    if kw["vocab_size"] < len(tokenizer):
        raise ValueError(f"shape {shape}: vocabulary {kw['vocab_size']} < the tokenizer's {len(tokenizer)}")
    cfg = Qwen2Config(
        **kw, max_position_embeddings=max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    return cfg


def build_model(shape: str, tokenizer, seed: int = 0, attn_implementation: str = "sdpa"):
    """A randomly initialised Qwen2-architecture model of `shape` (seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(qwen2_config(shape, tokenizer), attn_implementation=attn_implementation).eval()


def build_pair(shape: str, tokenizer, seed: int = 0, dtype=None, device=None):
    """(policy, reference): a random reference and a perturbed copy of it as the policy (`demo.tiny.perturbed_copy`)."""
    from progadv_trl.demo.tiny import perturbed_copy

    ref = build_model(shape, tokenizer, seed)
    pol = perturbed_copy(ref, scale=0.3, seed=seed + 1).eval()
    if dtype is not None or device is not None:
        ref, pol = ref.to(device=device, dtype=dtype), pol.to(device=device, dtype=dtype)
    return pol, ref


# ----------------------------------------------------------------------------------------------------------------
# FLOPs from shapes (2 per multiply-add; attention scores and values counted per query-key pair)


def _dims(cfg: dict):
    H, L, I, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = H // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    linear = L * (H * q + 2 * H * kv + q * H + 3 * H * I)  # multiply-adds per token: q, k, v, o, gate/up/down
    return linear, L * q, V * H


def forward_flops(cfg: dict, tokens: int, attn_pairs: int, head_rows: int) -> float:
    """FLOPs of one model: `tokens` through the decoder, `attn_pairs` query-key pairs, `head_rows` output rows."""
    linear, attn, head = _dims(cfg)
    return 2.0 * linear * tokens + 4.0 * attn * attn_pairs + 2.0 * head * head_rows


def output_share(cfg: dict, context: int = 0) -> float:
    """The output layer's share of one token's forward FLOPs (attention counted at `context` keys)."""
    linear, attn, head = _dims(cfg)
    return 2.0 * head / (2.0 * linear + 4.0 * attn * context + 2.0 * head)


def causal_pairs(start: int, end: int) -> int:
    """Query-key pairs of positions start..end-1 attending causally to everything before them (and themselves)."""
    return (end * (end + 1) - start * (start + 1)) // 2


# ----------------------------------------------------------------------------------------------------------------
# Agent trajectories: groups sharing a long prompt

_TOOLS = [
    ("get_user_details", "Get the details of a user: name, address, membership level, payment methods, reservations.",
     {"user_id": ("string", "The user's id, such as 'sara_doe_496'.")}),
    ("get_reservation_details", "Get the details of a reservation: flights, passengers, cabin, baggage, insurance.",
     {"reservation_id": ("string", "The reservation id, such as '8JX2WO'.")}),
    ("search_direct_flight", "Search direct flights between two cities on a date.",
     {"origin": ("string", "IATA code of the origin airport, such as 'JFK'."),
      "destination": ("string", "IATA code of the destination airport, such as 'LAX'."),
      "date": ("string", "The date of the flight in the format 'YYYY-MM-DD'.")}),
    ("search_onestop_flight", "Search flights with one stop between two cities on a date.",
     {"origin": ("string", "IATA code of the origin airport."), "destination": ("string", "IATA code of the destination airport."),
      "date": ("string", "The date of the first flight in the format 'YYYY-MM-DD'.")}),
    ("book_reservation", "Book a reservation. Ask the user to confirm every detail before calling this.",
     {"user_id": ("string", "The user's id."), "origin": ("string", "IATA code of the origin."),
      "destination": ("string", "IATA code of the destination."), "flight_type": ("string", "one_way or round_trip."),
      "cabin": ("string", "basic_economy, economy or business."), "payment_id": ("string", "A payment method id."),
      "total_baggages": ("integer", "Number of bags."), "insurance": ("string", "yes or no.")}),
    ("cancel_reservation", "Cancel a whole reservation. Only allowed within 24 hours of booking, for business cabin, "
     "with insurance for a covered reason, or when the airline cancelled the flight.",
     {"reservation_id": ("string", "The reservation id.")}),
    ("update_reservation_flights", "Change the flights of a reservation; the cabin must stay the same for all flights.",
     {"reservation_id": ("string", "The reservation id."), "cabin": ("string", "The cabin class."),
      "payment_id": ("string", "The payment method for the fare difference.")}),
    ("update_reservation_baggages", "Change the number of checked bags of a reservation.",
     {"reservation_id": ("string", "The reservation id."), "total_baggages": ("integer", "Total bags."),
      "nonfree_baggages": ("integer", "Bags to pay for."), "payment_id": ("string", "Payment method id.")}),
    ("send_certificate", "Send a travel certificate to a user as a gesture of goodwill.",
     {"user_id": ("string", "The user's id."), "amount": ("integer", "The amount in dollars.")}),
    ("calculate", "Calculate the result of an arithmetic expression.",
     {"expression": ("string", "The expression, such as '2 * (310 + 45)'.")}),
    ("transfer_to_human_agents", "Transfer the user to a human agent, with a summary of the issue.",
     {"summary": ("string", "A summary of the user's issue.")}),
]  # fmt: skip

_POLICY = (
    "You are an airline customer service agent. Today is 2024-05-15. Help users book, change and cancel "
    "reservations, and answer questions about their trips. Before any action that updates the database (booking, "
    "changing flights, changing baggage, cancelling), list the action's details and obtain an explicit yes from "
    "the user. Make one tool call at a time; if you make a tool call, do not respond to the user in the same turn. "
    "Do not make up information that is not provided by the user or the tools. Deny requests that are against "
    "this policy. Transfer the user to a human agent only when the request cannot be handled within the scope "
    "of your actions. Basic economy flights cannot be modified. Each passenger has a number of free checked bags "
    "that depends on the membership level and the cabin: regular members get no free bag in basic economy, one in "
    "economy and two in business; gold members get one, two and three. Extra bags cost 50 dollars each. Travel "
    "insurance costs 30 dollars per passenger and allows a full refund for health or weather reasons."
)

_CITIES = ["JFK", "LAX", "SFO", "ORD", "ATL", "SEA", "BOS", "DEN", "MIA", "PHX", "DFW", "IAH", "EWR", "LAS"]
_NAMES = ["sara_doe", "omar_kim", "ivan_lee", "mia_chen", "noah_garcia", "lucas_brown", "emma_silva", "yusuf_ali"]


N_TOOLS = 6  # the first N_TOOLS of _TOOLS are offered: with the system prompt, a ~1.2k-token prompt


def tool_schemas(n_tools: int = N_TOOLS) -> list[dict]:
    out = []
    for name, desc, params in _TOOLS[:n_tools]:
        props = {k: {"type": t, "description": d} for k, (t, d) in params.items()}
        out.append({"type": "function", "function": {"name": name, "description": desc, "parameters": {
            "type": "object", "properties": props, "required": list(params)}}})  # fmt: skip
    return out


def _flight(rng: random.Random) -> dict:
    a, b = rng.sample(_CITIES, 2)
    return {"flight_number": f"HAT{rng.randint(1, 300):03d}", "origin": a, "destination": b,
            "date": f"2024-05-{rng.randint(16, 30)}", "price": rng.randint(60, 2000), "status": rng.choice(["available", "delayed", "on time"])}  # fmt: skip


def _tool_result(name: str, rng: random.Random) -> str:
    if name.startswith("search"):
        return json.dumps([_flight(rng) for _ in range(rng.randint(2, 5))])
    if name == "get_user_details":
        return json.dumps({"name": rng.choice(_NAMES), "membership": rng.choice(["regular", "silver", "gold"]),
                           "payment_methods": {f"credit_card_{rng.randint(1000, 9999)}": {"brand": "visa"}},
                           "reservations": [f"{rng.randint(100000, 999999)}" for _ in range(rng.randint(1, 4))]})  # fmt: skip
    if name == "get_reservation_details":
        return json.dumps({"flights": [_flight(rng) for _ in range(rng.randint(1, 3))], "cabin": rng.choice(["economy", "business"]),
                           "passengers": [{"first_name": n.split("_")[0], "dob": "1990-01-01"} for n in rng.sample(_NAMES, 2)],
                           "insurance": rng.choice(["yes", "no"]), "total_baggages": rng.randint(0, 3)})  # fmt: skip
    if name == "calculate":
        return str(rng.randint(10, 5000))
    return rng.choice(["Done.", "Error: the reservation cannot be modified.", '{"status": "ok"}'])


def _args(name: str, rng: random.Random, user: str) -> dict:
    params = next(p for n, _, p in _TOOLS if n == name)
    out = {}
    for k, (t, _) in params.items():
        if t == "integer":
            out[k] = rng.randint(0, 4)
        elif k in ("origin", "destination"):
            out[k] = rng.choice(_CITIES)
        elif k == "user_id":
            out[k] = user
        elif k == "date":
            out[k] = f"2024-05-{rng.randint(16, 30)}"
        else:
            out[k] = f"{k.split('_')[0]}_{rng.randint(100, 999)}"
    return out


def agent_group(group: int, n_rollouts: int, tokenizer, min_tokens: int = 1200, max_tokens: int = 2000, seed: int = 0,
                n_tools: int = N_TOOLS, policy_sentences: int | None = None) -> list[dict]:
    """`n_rollouts` trajectories sharing a prompt (system prompt with tool schemas, then one task); each rollout
    draws a target length in [min_tokens, max_tokens] (rendered with `tokenizer`) and takes turns until it reaches
    it: tool calls with their results, a closing answer. success alternates so every group holds both labels.
    `n_tools`: schemas offered (and called); `policy_sentences`: the system prompt cut to its first sentences."""
    from progadv_trl.rendering import render
    from progadv_trl.trajectories import as_trajectories

    rng_task = random.Random(seed * 1000 + group)
    user = f"{rng_task.choice(_NAMES)}_{rng_task.randint(100, 999)}"
    task = (f"Hi, I am {user}. I need to change my trip from {rng_task.choice(_CITIES)} next week to a later date, and "
            f"if that is not possible I want to cancel reservation {rng_task.randint(100000, 999999)} and get a refund.")  # fmt: skip
    policy = _POLICY if policy_sentences is None else ". ".join(_POLICY.split(". ")[:policy_sentences]) + "."
    prompt = [{"role": "system", "content": policy}, {"role": "user", "content": task}]
    tools = tool_schemas(n_tools)
    out = []
    for r in range(n_rollouts):
        rng = random.Random(seed * 100000 + group * 100 + r)
        target = rng.randint(min_tokens, max_tokens)
        msgs = list(prompt)
        while True:
            name = rng.choice([t[0] for t in _TOOLS[:n_tools]])
            thought = rng.choice(["", "Let me look that up.", f"I will check the {name.replace('_', ' ')} first."])
            msgs.append({"role": "assistant", "content": thought,
                         "tool_calls": [{"type": "function", "function": {"name": name, "arguments": _args(name, rng, user)}}]})  # fmt: skip
            msgs.append({"role": "tool", "content": _tool_result(name, rng)})
            rec = {"messages": msgs + [{"role": "assistant", "content": "I have updated your trip. Anything else?"}], "tools": tools}
            n = len(render(as_trajectories([rec])[0], tokenizer).input_ids)
            if n >= target or n >= max_tokens - min(150, max_tokens // 4):
                break
        final = "Your reservation is cancelled and the refund is on its way." if r % 2 else "Your new flight is booked; anything else?"
        msgs.append({"role": "assistant", "content": final})
        rec = {"id": f"g{group}r{r}", "messages": msgs, "tools": tools, "group": f"g{group}", "success": bool(r % 2)}
        if not r % 2:
            rec["failure_step"] = 0
        out.append(rec)
    return out


def agent_trajectories(tokenizer, groups: int, rollouts: int = 8, **kw) -> list[dict]:
    return [t for g in range(groups) for t in agent_group(g, rollouts, tokenizer, **kw)]


def tiny_trajectories(n: int) -> list[dict]:
    """The earlier benchmark's corpus: short weather dialogues with 1-5 tool calls, no shared groups."""
    from progadv_trl.demo.tiny import make_trajectory

    return [make_trajectory(i, n_turns=1 + i % 5) for i in range(n)]


def agent_tokenizer(out_dir, vocab_size: int = 4096):
    """A byte-level BPE trained on agent text like the benchmark's (another seed): about the compression of a real
    tokenizer on such text, so trajectories have realistic token counts. `demo.tiny.build_tokenizer` does the rest."""
    from progadv_trl.demo.tiny import build_tokenizer, default_corpus

    rng = random.Random(12345)
    corpus = default_corpus() + [_POLICY, json.dumps(tool_schemas())]
    for _ in range(300):
        name = rng.choice([t[0] for t in _TOOLS])
        corpus.append(json.dumps({"name": name, "arguments": _args(name, rng, f"{rng.choice(_NAMES)}_{rng.randint(100, 999)}")}))
        corpus.append(_tool_result(name, rng))
    return build_tokenizer(out_dir, corpus=corpus, vocab_size=vocab_size)
