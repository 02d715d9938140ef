"""alignkit dashboard: the W&B workspace is built offline, per method, with the panels the trainers' metrics need,
and its written definition loads back for a later push."""

import json
from pathlib import Path

import pytest

from alignkit.cli import main

# what each method's section must show (issue 18): metric names as W&B holds them, or the regex of a panel
EXPECTED = {
    "fdpo": ["train/rewards/margins", "eval/rewards/accuracies", "train/link/chosen", "eval/calibration/ece",
             "train/entropy", "train/logratios/chosen"],
    "mdpo": ["train/rewards/chosen_group_std", "train/mipo/variance_correction", "train/group/chosen_size"],
    "crm": ["^(train|eval)/reward_by_bin/.*", "train/mmd/penalty", "eval/mmd/spearman_reward_bin", "train/mmd/reward_std"],
    "ppo": ["train/objective/scores", "^(train|eval)/divergence/.*", "^train/time/.*", "train/policy/clipfrac_avg",
            "train/val/clipfrac_avg"],
    "online_mdpo": ["train/reward", "^train/rewards/.*/mean$", "train/group/kept_prompts", "train/group/reward_gap",
                    "train/entropy",
                    "train/group/chosen_size", "^(train|eval)/divergence/.*"],
}
PERF = ["train/perf/tokens_per_second", "train/perf/mfu", "train/perf/peak_memory_gb"]


def _strings(node) -> set[str]:
    if isinstance(node, dict):
        return set().union(*(_strings(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_strings(v) for v in node)) if node else set()
    return {node} if isinstance(node, str) else set()


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_the_workspace_of_a_run_holds_its_methods_panels(method, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "alignkit_recipe.yaml").write_text(f"method: {method}\n")
    out = tmp_path / "ws.json"
    assert main(["dashboard", "--project", "alignkit-test", "--run-dir", str(run), "--output", str(out)]) == 0
    assert f"alignkit dashboard --push {out}" in capsys.readouterr().out
    definition = json.loads(out.read_text())
    names = _strings(definition)
    assert definition["project"] == "alignkit-test"
    for metric in EXPECTED[method] + PERF:
        assert metric in names, metric
    others = [m for other, ms in EXPECTED.items() if other != method for m in ms if m not in EXPECTED[method]]
    assert not any(m in names for m in others if "/rewards/" not in m)  # one method's section only

    from alignkit.dashboard import load_definition

    workspace = load_definition(out, entity="someone")
    assert workspace.entity == "someone" and len(workspace.sections) == 2
    assert workspace.sections[1].name == "Throughput"


def test_without_run_dir_every_section_is_built(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "all.json"
    assert main(["dashboard", "--project", "p", "--output", str(out)]) == 0
    names = _strings(json.loads(out.read_text()))
    assert {"f-DPO", "mDPO / mIPO", "Causal reward model", "PPO", "Throughput"} <= names
    for metric in [m for ms in EXPECTED.values() for m in ms] + PERF:
        assert metric in names, metric


def test_push_refuses_a_definition_without_entity_before_any_network(tmp_path, capsys):
    out = tmp_path / "ws.json"
    assert main(["dashboard", "--project", "p", "--output", str(out), "--entity", ""]) == 0
    assert main(["dashboard", "--push", str(out), "--entity", ""]) == 2
    assert "--push needs --entity" in capsys.readouterr().err


def test_pushing_without_an_api_key_is_one_line_with_the_fix(tmp_path, monkeypatch, capsys):
    """`dashboard --push` with no W&B API key anywhere: exit 2 and what to do (it was a wandb UsageError traceback)."""
    from alignkit.cli import main

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    definition = tmp_path / "ws.json"
    assert main(["dashboard", "--project", "p", "--output", str(definition)]) == 0
    capsys.readouterr()
    assert main(["dashboard", "--push", str(definition), "--entity", "me"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--push" in err[0] and "wandb login" in err[0], err
