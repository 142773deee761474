import json

import numpy as np

from conftest import make_trajectory
from progadv_trl.cli import main
from progadv_trl.engine import ProgressScorer


def _write(path, recs):
    path.write_text("\n".join(json.dumps(r) if not isinstance(r, str) else r for r in recs) + "\n")
    return path


def test_score_writes_one_line_per_trajectory(tiny_dir, tiny_models, tiny_tokenizer, tmp_path, trajectories):
    src = _write(tmp_path / "t.jsonl", trajectories)
    out = tmp_path / "out" / "s.jsonl"
    rc = main(["score", "--policy", str(tiny_dir["policy"]), "--reference", str(tiny_dir["reference"]), str(src), "-o", str(out), "--beta", "0.1"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [t["id"] for t in trajectories]
    for r in rows:
        assert set(r) >= {"id", "score", "steps", "baselines"}
        # the contract's step fields, and the plausibility of the step (the policy pass's own top-1 log-prob)
        assert set(r["steps"][0]) == {"index", "message_index", "advantage", "tokens", "truncated", "gap", "plausible",
                                      "shortfall"}
        assert set(r["baselines"]) == {"policy_logprob", "reference_logprob", "self_certainty", "deepconf_tail", "deepconf_bottom10"}
    pol, ref = tiny_models
    from progadv_trl.scoring import ScoringConfig

    direct = ProgressScorer(pol, tiny_tokenizer, ref, config=ScoringConfig(beta=0.1)).score(trajectories)
    np.testing.assert_allclose([r["score"] for r in rows], [d.score for d in direct], atol=1e-6)


def test_bad_input_is_one_message_and_no_file(tiny_dir, tmp_path, capsys):
    src = _write(tmp_path / "t.jsonl", [make_trajectory(0), {"id": "bad", "messages": [{"role": "user", "content": "x"}]}])
    out = tmp_path / "s.jsonl"
    rc = main(["score", "--policy", str(tiny_dir["policy"]), "--reference", str(tiny_dir["reference"]), str(src), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "t.jsonl line 2 (id 'bad')" in err and "messages" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [src]  # no temporary file left behind either
    # skip mode scores the good one and reports the bad one
    rc = main(["score", "--policy", str(tiny_dir["policy"]), "--reference", str(tiny_dir["reference"]), str(src), "-o", str(out), "--on-error", "skip"])
    assert rc == 0 and len(out.read_text().splitlines()) == 1
    assert "skipped 1 invalid record:" in capsys.readouterr().err


def test_missing_file_is_a_message(tmp_path, capsys):
    rc = main(["score", "--policy", "p", "--reference", "r", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "o.jsonl")])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_evaluate_end_to_end(tiny_dir, tmp_path, capsys):
    from conftest import make_trajectory

    recs = []
    for i in range(24):
        ok = i % 3 != 0
        recs.append(make_trajectory(i, n_turns=1 + i % 3, success=ok, failure_step=None if ok else 0, group=f"g{i // 4}"))
    src = _write(tmp_path / "t.jsonl", recs)
    out = tmp_path / "eval"
    rc = main(["evaluate", "--policy", str(tiny_dir["policy"]), "--reference", str(tiny_dir["reference"]), str(src),
               "-o", str(out), "--n-boot", "50", "--choose-reduction", "auroc", "--folds", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "progress_advantage" in printed and "n=24" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_trajectories"] == 24
    assert m["reduction"]["chosen_by"].startswith("default")
    assert m["reduction_selection"]["how"] and len(m["reduction_selection"]["per_fold"]) == 3
    for f in ("metrics.md", "roc.png", "best_of_n.png", "traces.png"):
        assert (out / f).stat().st_size > 0


def test_export_inspect_and_score_with_bundle(tiny_dir, tmp_path, trajectories, capsys):
    src = _write(tmp_path / "t.jsonl", trajectories)
    bundle = tmp_path / "bundle"
    assert main(["export", "--policy", str(tiny_dir["policy"]), "--reference", str(tiny_dir["reference"]), "--beta", "0.2", str(bundle)]) == 0
    assert main(["inspect", str(bundle)]) == 0
    assert "manifest" in capsys.readouterr().out.lower()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main(["score", "--bundle", str(bundle), str(src), "-o", str(a)]) == 0
    assert main(["score", "--policy", str(tiny_dir["policy"]), "--reference", str(tiny_dir["reference"]), "--beta", "0.2", str(src), "-o", str(b)]) == 0
    ra = [json.loads(x)["score"] for x in a.read_text().splitlines()]
    rb = [json.loads(x)["score"] for x in b.read_text().splitlines()]
    np.testing.assert_allclose(ra, rb, atol=1e-6)  # the bundle's beta (0.2) is its default
    # a corrupted weight file: inspect says so, scoring refuses with a message, not a traceback
    w = next((bundle / "policy").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:-8] + b"corrupt!")
    assert main(["inspect", str(bundle)]) == 2
    capsys.readouterr()
    assert main(["score", "--bundle", str(bundle), str(src), "-o", str(tmp_path / "c.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "progadv: error" in err and not (tmp_path / "c.jsonl").exists()


def test_top_level_names_load_lazily():
    import subprocess
    import sys

    code = ("import sys, progadv_trl; assert 'torch' not in sys.modules; "
            "from progadv_trl import ProgressCritic, ProgressAdvantageCallback, ProgressScorer; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_help_does_not_import_torch():
    """`progadv --help` (and each command's --help) parses the dataclasses without importing torch."""
    import subprocess
    import sys

    code = ("import sys\nfrom progadv_trl.cli import main\n"
            "for argv in (['--help'], ['score', '--help'], ['evaluate', '--help'], ['convert', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("False") and "--token_reduction" in out.stdout and "--from" in out.stdout


def test_commands_parse_into_their_dataclasses():
    from progadv_trl.cli import EvaluateArguments, InputArguments, ModelArguments, ScoringArguments, parse

    cmd, (traj, model, scoring, inputs, ev) = parse(
        ["evaluate", "--bundle", "b", "t.jsonl", "-o", "out", "--beta", "0.1", "--token-reduction", "mean",
         "--choose_reduction", "auroc", "--format", "whowhen"]
    )  # fmt: skip
    assert cmd == "evaluate" and traj == "t.jsonl"
    assert isinstance(model, ModelArguments) and model.bundle == "b" and model.policy is None
    assert isinstance(scoring, ScoringArguments) and scoring.overrides() == {"beta": 0.1, "token_reduction": "mean"}
    assert isinstance(inputs, InputArguments) and inputs.format == "whowhen"
    assert isinstance(ev, EvaluateArguments) and ev.output == "out" and ev.choose_reduction == "auroc"


def test_demo_config_rejects_unknown_keys(tmp_path, capsys):
    import pytest

    from progadv_trl.arguments import DemoArguments
    from progadv_trl.demo.main import demo_config

    good = tmp_path / "good.yaml"
    good.write_text("grpo_steps: 7\nbeta: 0.2\n")
    cfg = demo_config(DemoArguments(out=str(tmp_path / "run"), config=str(good), fast=True))
    assert (cfg.grpo_steps, cfg.beta, cfg.out_dir) == (7, 0.2, str(tmp_path / "run"))
    assert cfg.hidden_size == 32  # the rest from DemoConfig.fast
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo_steps: 7\ngrpo_stepz: 8\n")
    with pytest.raises(SystemExit, match="grpo_stepz"):
        demo_config(DemoArguments(out=str(tmp_path / "run"), config=str(bad)))


def test_a_flag_never_swallows_the_positional_after_it():
    from progadv_trl.cli import parse

    _, (out, args, _) = parse(["export", "--policy", "p", "--overwrite", "OUT"])
    assert out == "OUT" and args.overwrite is True and args.trust_remote_code is False
    _, (traj, model, _, inputs, _) = parse(["score", "--trust-remote-code", "t.jsonl", "-o", "o", "--skip-invalid"])
    assert traj == "t.jsonl" and model.trust_remote_code is True and inputs.on_error == "skip"


def test_nothing_in_the_library_imports_the_cli():
    """The CLI is the top: the demo's arguments live in `arguments.py` and `demo_config` in `demo/main.py`, so no
    module (the demo's study included) imports `cli`, and cli -> demo -> cli cannot come back."""
    import ast
    from pathlib import Path

    import progadv_trl

    root = Path(progadv_trl.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "cli.py" and path.parent == root:
            continue
        package = path.relative_to(root.parent).with_suffix("").parts[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = list(package[: len(package) - node.level + 1]) if node.level else []
                target = ".".join(base + (node.module.split(".") if node.module else []))
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if "progadv_trl.cli" in names:
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, f"these import progadv_trl.cli: {offenders}"
