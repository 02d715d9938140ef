"""The thesis reproductions (examples/reproduce/) run end to end in their CI-sized form (`--quick`: fewer
steps, prompts and seeds) and show the direction of the effects that hold at that size. Full forms: `make
reproduce`; their figures and tables are in docs/results.md."""

import importlib.util
import math
from pathlib import Path

import pytest

REPRO = Path(__file__).resolve().parents[1] / "examples" / "reproduce"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPRO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(name, tmp_path, *extra):
    return _load(name).main(["--quick", "--output", str(tmp_path), *extra])


def test_fdpo_diversity(tmp_path):
    """Table 2.2's ordering is not asserted: the full form does not reproduce it (docs/results.md). Nor is what
    the full form shows instead (at equal beta, alpha and forward KL move far further from the reference than
    reverse KL, 68 and 33 against 1.8): 30 steps from a 60-step SFT start are too few for it to hold. Measured
    over seeds 0-9 (every training and sampling seed shifted), reverse KL's distance / the smaller of alpha's and
    forward KL's was 0.09-1.91 (above 1 for 2 seeds); with 60 steps 0.78-9.4, with a 400-step SFT 0.04-1.08.
    The quick form checks that the pipeline runs and every divergence moves the policy."""
    result = _run("fdpo_diversity", tmp_path)
    assert [r["divergence"] for r in result["rows"]] == ["SFT (start)", "reverse_kl", "jsd", "alpha 0.5", "forward_kl"]
    assert (tmp_path / "table.md").exists() and (tmp_path / "fdpo_diversity.png").exists()
    steps = [(r["divergence"], r["step"]) for r in result["trajectory"]]
    assert len(steps) == 4 * 5 and (tmp_path / "fdpo_diversity_trajectory.png").exists()
    assert all(0 < r["entropy"] < 10 and 0 <= r["distinct_2"] <= 1 for r in result["rows"])
    dist = {r["divergence"]: r["reverse KL from SFT"] for r in result["rows"]}
    # measured over seeds 0-9: every divergence 0.70-48 from the start (seed 0: reverse KL 2.24, JSD 2.16,
    # alpha 5.27, forward KL 6.53)
    assert dist["SFT (start)"] == 0.0 and all(d > 0.2 for name, d in dist.items() if name != "SFT (start)"), dist


def test_fdpo_frontier(tmp_path):
    rows = _run("fdpo_frontier", tmp_path)["rows"]
    sft = rows[0]
    assert sft["method"] == "SFT (reference)" and sft["D_f"] == pytest.approx(0.0, abs=1e-6)
    last = {r["method"]: r for r in rows[1:]}  # rows are in training order: the last of each method
    assert set(last) == {"f-DPO", "PPO (reward)", "PPO (loss)"}
    # every method moves the policy away from the reference and raises the reward; the frontier comparison
    # itself needs the full form. Measured over seeds 0-9 (every training and sampling seed shifted; 0-2 also
    # with ATEN_CPU_CAPABILITY=default, another float rounding): the start's reward -0.08..0.05; gains 0.31-0.86
    # for f-DPO, 0.49-1.19 and 0.46-0.83 for PPO with the penalty in the reward / in the loss; D_f 0.41-6.7.
    # (With 16 prompts x 4 samples per point instead of 32 x 8, f-DPO fell below the start for 3 seeds of 10.)
    for method, r in last.items():
        assert r["D_f"] > 0.1 and r["reward"] > sft["reward"] + 0.15, (method, r, sft)
    assert (tmp_path / "fdpo_frontier.png").exists()


def test_random_numbers(tmp_path):
    result = _run("random_numbers", tmp_path)
    ent = {(r["eval prompts"], r["method"]): r["entropy"] for r in result["methods"]}
    win = {(r["eval prompts"], r["comparison"]): r["win rate"] for r in result["win_rates"]}
    # preference training on uniform-vs-biased groups makes the favouring SFT start more uniform, single- and
    # multi-sample alike (the thesis' mIPO > IPO, mDPO > DPO is not reproduced at this size: docs/results.md)
    # measured over seeds 0-4 (every training and sampling seed shifted): entropy gain 0.57-0.97, win rates vs
    # SFT 0.825-0.975
    for method in ("DPO", "mDPO"):
        assert ent["training widths", method] > ent["training widths", "SFT"] + 0.2, method
    assert win["training widths", "mDPO vs SFT"] >= 0.7 and win["training widths", "DPO vs SFT"] >= 0.7
    assert (tmp_path / "random_numbers.png").exists() and (tmp_path / "win_rates.md").exists()


def test_crm_sweep(tmp_path):
    """Also the CI-sized check of benchmarks/crm_bias.py, whose `train_and_score` the sweep calls."""
    # 200 steps, as the full form: at the quick form's 100 the penalty's gain on test_anti was 0.06-0.61 over seeds
    # 0-4, under the 0.15 asserted for 2 of them
    result = _run("crm_sweep", tmp_path, "--steps", "200")
    rows = {(r["variant"], r["mmd_coef"]): r for r in result["rows"]}
    assert set(rows) == {("vanilla", 0.0), ("unconditional", 3.0)}
    van, crm = rows["vanilla", 0.0], rows["unconditional", 3.0]
    # Measured over seeds 0-4 with the standardised penalty (crm_sweep.py --quick --steps 200 --seeds 5), 200 steps:
    # vanilla test_anti 0.00-0.09, test_uncorrelated 0.70-0.79, Spearman 0.81 on average; the causal model's
    # test_anti 0.46-0.82 (gain 0.37-0.81), test_uncorrelated 0.88-0.98 (it gains), Spearman 0.11 on average.
    # (With the earlier median-heuristic penalty: test_anti 0.41-0.87, |Spearman| 0.13-0.20.)
    # The vanilla model rewards the flattering prefix: it prefers the wrong answer when only that has the prefix
    assert van["test_anti"] < 0.3 and van["test_uncorrelated_spearman"] > 0.5
    # the full benchmark (3 seeds) asks +15 points and <= 5 lost, here looser
    assert crm["test_anti"] >= van["test_anti"] + 0.15
    assert crm["test_uncorrelated"] >= van["test_uncorrelated"] - 0.10
    assert abs(crm["test_uncorrelated_spearman"]) < van["test_uncorrelated_spearman"] / 2
    assert (tmp_path / "table.md").exists() and (tmp_path / "crm_sweep.png").exists()


def test_label_noise(tmp_path):
    result = _run("label_noise", tmp_path)
    # the data: single pairs are often wrong, groups of 5 less often (deterministic, seed 0: 0.133 vs 0.073)
    noise = {r["comparison"]: r for r in result["noise"]}
    pairs, groups = noise["single pairs (all 5 per prompt)"], noise["group means, k=5"]
    assert pairs["wrong"] > 0.1 and pairs["wrong"] + pairs["tie"] > groups["wrong"] + groups["tie"] + 0.2

    methods = {r["method"]: r for r in result["methods"]}
    assert set(methods) == {"SFT", "mDPO k=1", "mDPO k=5"}
    assert all(math.isfinite(r["mean quality"]) and 0 <= r["well-formed"] <= 1 for r in methods.values())
    k1, k5 = methods["mDPO k=1"]["mean quality"], methods["mDPO k=5"]["mean quality"]
    # measured in this quick form (1 thread) for training seeds 0-3: k=1 +0.80/+0.78/+0.98/+0.73, k=5
    # +1.35/+1.35/+1.32/+1.22, so gaps 0.34-0.57 and win_rate_score 100-138; with every seed shifted (the SFT's
    # and the sampling's too) by 0-4: SFT -0.18..-0.04, k=1 +0.63..+0.82, k=5 +0.99..+1.42, gaps 0.36-0.69, win
    # 104-138. 0.15 and > 50 leave room for another machine's float rounding, which moves a run like a seed does
    assert k5 >= k1 + 0.15
    assert methods["SFT"]["mean quality"] < k1  # both learnt something from the neutral start
    win = next(r for r in result["win_rates"] if r["comparison"] == "mDPO k=5 vs mDPO k=1")
    assert win["win_rate_score"] > 50
    for name in ("table.md", "label_noise.png", "methods.json", "win_rates.json", "noise.json"):
        assert (tmp_path / name).exists(), name


def test_online_groups(tmp_path):
    """The comparison runs end to end: every method at the same number of generated completions (4 rounds of 32),
    scored at its last checkpoint; and online mIPO on a vanilla and on a causal reward model, from one reference.
    Which method reaches more reward, or flatters less, is not asserted: 4 rounds from a 60-step SFT move each
    method by about its evaluation noise (32 samples; docs/results.md has the full form)."""
    import sys

    sys.path.insert(0, str(REPRO))
    result = _run("online_groups", tmp_path)
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["SFT (reference)", "online mIPO", "online mDPO", "PPO", "TRL GRPO"]
    assert all(r["completions"] == 4 * 32 for r in rows[1:])  # the same generation budget for every method
    assert rows[0]["reverse_kl"] == 0.0 and all(math.isfinite(r["reward"]) for r in rows)
    # each moved the policy: measured here reverse KL 1.06 / 1.05 / 3.26 / 1.11 from the start (0.2 is 5x below the
    # smallest; a policy that did not train estimates exactly 0, as the reference row does)
    assert all(math.isfinite(r["reverse_kl"]) and r["reverse_kl"] > 0.2 for r in rows[1:])
    summary = {r["reward model"]: r for r in result["sycophancy_summary"]}
    assert set(summary) == {"vanilla", "unconditional"}
    assert summary["vanilla"]["reference flattery"] == summary["unconditional"]["reference flattery"]
    assert all(0 <= r["policy flattery"] <= 1 for r in summary.values())
    for name in ("table.md", "online_groups.png", "sycophancy.md"):
        assert (tmp_path / name).exists(), name


@pytest.mark.parametrize("name", ["random_numbers_real", "table31_real", "label_noise_real", "fdpo_distance_real",
                                  "fdpo_diversity_real", "fdpo_frontier_real", "causal_dpo",
                                  "crm_demographic"])
def test_the_real_model_scripts_load_and_parse_their_arguments(name, capsys):
    """Their full forms take 20-60 min on SmolLM2 (causal_dpo: 6 min, 3 seeds, docs/results.md); CI only checks that
    they import and parse."""
    import sys

    sys.path.insert(0, str(REPRO))
    module = _load(name)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0 and "--output" in capsys.readouterr().out


def test_table31_report_bootstrap_and_verdicts():
    """The interval resamples seeds, then prompts: identical seeds give the prompts' own spread; a win rate whose
    interval holds 0.5 is inconclusive, one above it reproduces a claim above 0.5, and fewer than 3 seeds decide
    nothing."""
    import sys

    sys.path.insert(0, str(REPRO))
    import table31_report as t

    mean, lo, hi = t.bootstrap([[1.0] * 30, [1.0] * 30, [1.0] * 30])
    assert (mean, lo, hi) == (1.0, 1.0, 1.0)
    mean, lo, hi = t.bootstrap([[0.0, 1.0] * 50] * 3)
    assert mean == 0.5 and 0.35 < lo < 0.5 < hi < 0.65  # binomial: 0.5 +- 1.96 * 0.5 / sqrt(100)
    assert t.verdict(0.6, 0.9, 0.8, 3, False) == "reproduced"
    assert t.verdict(0.1, 0.4, 0.8, 3, False).startswith("not reproduced")
    assert t.verdict(0.4, 0.6, 0.8, 3, True).startswith("inconclusive") and "still moving" in t.verdict(
        0.4, 0.6, 0.8, 3, True)
    assert t.verdict(0.6, 0.9, 0.8, 2, False).startswith("too few seeds")
    assert t.verdict(0.1, 0.4, 0.4, 3, False) == "reproduced"  # a claimed loss
    assert t.verdict(0.6, 0.9, 0.4, 3, False) == "not reproduced (the reverse holds)"


def test_rerun_compares_every_per_prompt_score_of_the_last_point():
    import sys

    sys.path.insert(0, str(REPRO))
    from _runs import largest_change

    old = {"curve": [{"inside": {"h": [0.0, 0.0]}}, {"inside": {"h": [0.5, 0.7]}, "vader": [0.1], "step": 4}]}
    new = {"curve": [{"inside": {"h": [9.0, 9.0]}}, {"inside": {"h": [0.5, 0.4]}, "vader": [0.15], "step": 4}]}
    assert largest_change(old, new) == pytest.approx(0.3)  # the last point only; every list of numbers, nested too
    assert largest_change(old, old) == 0.0


def test_label_noise_real_labels_by_source_or_by_vader_and_measures_the_overlap():
    """Source labels keep the sources' order; VADER labels order each pair (pair methods) or each group by its mean,
    a tie keeping the source's order; the overlap counts wrong, tied and right labels for pairs and group means."""
    import sys

    sys.path.insert(0, str(REPRO))
    import label_noise_real as ln

    rows = [{"prompt": "p", "chosen": ["c0", "c1", "c2"], "rejected": ["r0", "r1", "r2"],
             "chosen_vader": [0.5, 0.0, 0.2], "rejected_vader": [0.1, 0.3, 0.2]}]
    pairs = ln.labelled(rows, "vader", 1)
    assert [(r["chosen"], r["rejected"]) for r in pairs] == [(["c0"], ["r0"]), (["r1"], ["c1"]), (["c2"], ["r2"])]
    assert [r["chosen"] for r in ln.labelled(rows, "source", 1)] == [["c0"], ["c1"], ["c2"]]
    assert ln.labelled(rows, "vader", 3)[0]["chosen"] == ["c0", "c1", "c2"]  # means 0.233 > 0.2
    flipped = [dict(rows[0], rejected_vader=[0.1, 0.9, 0.2])]  # means 0.233 < 0.4: the groups swap
    assert ln.labelled(flipped, "vader", 3)[0]["chosen"] == ["r0", "r1", "r2"]
    assert ln.labelled(flipped, "source", 3)[0]["chosen"] == ["c0", "c1", "c2"]
    o = ln.overlap(rows)
    assert o["pairs"] == {"wrong": 1 / 3, "tie": 1 / 3, "right": 1 / 3, "n": 3}
    assert o["groups of 2"] == {"wrong": 0.0, "tie": 0.0, "right": 1.0, "n": 1}  # the first two: 0.25 against 0.2
    assert o["groups of 3"]["right"] == 1.0


def test_label_noise_real_random_swaps_order_by_vader_then_swap_the_same_pairs_for_pairs_and_groups():
    """The swap labelling orders each pair by VADER, then swaps it with probability SWAP_P, the same swaps for pair
    and group methods of a seed; its measured noise is the swap rate, and the source and vader labellings do not
    depend on the seed."""
    import sys

    sys.path.insert(0, str(REPRO))
    import label_noise_real as ln

    rng = __import__("random").Random(0)
    rows = [{"prompt": f"p{n}", "chosen": [f"c{n}.{i}" for i in range(4)], "rejected": [f"r{n}.{i}" for i in range(4)],
             "chosen_vader": [rng.random() for _ in range(4)], "rejected_vader": [rng.random() for _ in range(4)]}
            for n in range(2000)]
    pairs, groups = ln.labelled(rows, "swap", 1, seed=3), ln.labelled(rows, "swap", 4, seed=3)
    assert [p["chosen"][0] for p in pairs] == [c for g in groups for c in g["chosen"]]  # the same swaps
    assert ln.labelled(rows, "swap", 1, seed=4) != pairs
    for labels in ("source", "vader"):
        assert ln.labelled(rows, labels, 4, seed=3) == ln.labelled(rows, labels, 4)
    q = ln.quality(rows, "swap", 1, seed=3)
    # 8000 pairs, no ties: wrong ~ Binomial(8000, 0.3) / 8000, sd 0.005
    assert q["n"] == 8000 and q["tie"] == 0 and abs(q["wrong"] - ln.SWAP_P) < 0.03
    assert ln.quality(rows, "vader", 1)["wrong"] == 0 and ln.quality(rows, "vader", 4)["wrong"] == 0
    assert ln.quality(rows, "source", 1)["wrong"] == pytest.approx(0.5, abs=0.04)  # sources of equal quality here
    # a group of 4 is wrong when its swapped pairs outweigh the others, less often than a pair: measured 0.22-0.24
    # on 5 draws of these scores (pairs 0.298); 0.27 is 3 sd (0.009) from both
    assert ln.quality(rows, "swap", 4, seed=3)["wrong"] < 0.27


def test_label_noise_real_report_leaves_equal_time_blank_where_a_method_meets_itself():
    """Noisy against clean labels compares one method with itself, whose runs cost the same: an "equal training time"
    figure there only repeated the equal-completions one. Read from the committed results (seconds, no training)."""
    import sys

    sys.path.insert(0, str(REPRO))
    import label_noise_real as ln

    folder = next((REPRO.parents[1] / "docs" / "results" / "label_noise").glob("*/settings.json")).parent
    rows = [line.split(" | ") for line in ln.report(folder, ["DPO", "mDPO"]).splitlines() if " labels | " in line]
    same = [r for r in rows if " vs vader labels" in r[0]]
    across = [r for r in rows if " vs " in r[0] and r not in same]
    assert len(same) == 4 and len(across) == 3
    assert all(r[3] == "" for r in same) and all(r[3].count("(") == 1 for r in across)


def test_fdpo_distance_report_judges_the_thesis_order_pair_by_pair_over_seeds(tmp_path):
    """Table 2.2's verdicts: entropy (one figure per run) by a t-interval over seeds, VADER by the bootstrap over seeds
    and prompts, at the last step and at matched reverse KL; hand-computed here."""
    import json
    import math
    import sys

    sys.path.insert(0, str(REPRO))
    import fdpo_distance_real as f
    from _runs import t_interval, verdict

    m, lo, hi = t_interval([1.0, 2.0, 3.0])  # sd 1: half width t(0.975, 2) / sqrt(3) = 4.303 / 1.732
    assert m == 2.0 and lo == pytest.approx(2 - 2.4843, abs=1e-4) and hi == pytest.approx(2 + 2.4843, abs=1e-4)
    assert t_interval([0.5]) == (0.5, -math.inf, math.inf)
    assert verdict(0.1, 0.3, 1, 3, False, 0) == "reproduced"
    assert verdict(-0.3, -0.1, 1, 3, False, 0) == "not reproduced (the reverse holds)"
    assert verdict(-0.1, 0.1, 1, 3, False, 0) == "inconclusive at this scale (the interval holds 0)"

    def point(kl, vader, entropy, step=70):
        return {"step": step, "reverse_kl": kl, "vader": vader, "entropy": entropy, "distinct_1": 0.7,
                "distinct_2": 0.9, "self_bleu": 0.1, "vader_per_prompt": [vader, vader]}

    (tmp_path / "base.json").write_text(json.dumps({"curve": [point(0.0, 0.2, 3.0, 0)]}))
    for seed, gap in enumerate((0.2, 0.3, 0.4)):  # JSD keeps `gap` more entropy than reverse KL at the end
        for name, end in (("fdpo-reverse_kl", point(2.0, 0.6, 2.0)), ("fdpo-jsd", point(4.0, 0.5, 2.0 + gap))):
            (tmp_path / f"seed{seed}-{name}.json").write_text(json.dumps({"name": name, "seed": seed, "curve": [end]}))
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in f.report(tmp_path, f.SETTINGS).splitlines()
             if line.startswith("| reverse_kl < jsd |")]
    rows = {c[1]: c for c in cells}
    # step 70: differences 0.2, 0.3, 0.4 (sd 0.1): 0.30 +- 0.248; VADER 0.6 - 0.5 on every prompt and seed
    assert rows["step 70"][2:6] == ["0.30 (0.05, 0.55)", "reproduced", "0.10 (0.10, 0.10)", "reproduced"]
    # reverse KL 1: reverse KL's entropy 3 - 1 * (1 / 2) = 2.5, JSD's 3 - (1 - gap) / 4 = 2.75 + gap / 4; the gap
    # of 0.25 + gap / 4 has sd 0.025: 0.325 +- 0.062. VADER 0.4 against 0.275
    assert rows["reverse KL 1"][2:6] == ["0.33 (0.26, 0.39)", "reproduced", "0.12 (0.12, 0.12)", "reproduced"]
    assert "reverse KL 3" not in rows  # reverse KL's curve stops at 2 nats


SCRIPTS = sorted([p for p in REPRO.glob("*.py") if not p.name.startswith("_") and p.name != "table31_report.py"]
                 + [REPRO.parent / "real_demo.py", REPRO.parent / "make_real_data.py"])


def test_the_scripts_numeric_types_refuse_what_would_run_nothing_or_crash():
    import argparse
    import sys

    sys.path.insert(0, str(REPRO))
    from _common import count, nonnegative, positive, probability, whole

    assert (count("3"), whole("0"), positive("1e-4"), nonnegative("0"), probability("1")) == (3, 0, 1e-4, 0.0, 1.0)
    for parse, bad in ((count, "0"), (count, "-2"), (count, "1.5"), (whole, "-1"), (positive, "0"), (positive, "inf"),
                       (positive, "nan"), (nonnegative, "-0.1"), (probability, "1.5"), (probability, "x")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_numeric_option_of_the_scripts_is_checked(script, monkeypatch):
    """A bare int or float lets --seeds 0 or --lr -1 through, to run nothing, crash later, or train backwards; every
    numeric option takes one of _common's checked types instead (argparse refuses a bad value: one line, exit 2)."""
    import argparse
    import sys

    sys.path.insert(0, str(REPRO))
    seen, add = {}, argparse.ArgumentParser.add_argument

    def record(self, *names, **kw):
        seen[names[-1]] = kw.get("type")
        return add(self, *names, **kw)

    monkeypatch.setattr(argparse.ArgumentParser, "add_argument", record)
    module = _load(script.stem) if script.parent == REPRO else _load_path(script)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert seen, "the script's options were not seen"
    bare = [flag for flag, kind in seen.items() if kind in (int, float)]
    assert not bare, f"{script.name}: {bare} take a bare int/float"


def _load_path(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _study(tmp_path, run_unit=None):
    """A study with the shared command line and a run that only writes its result (no model)."""
    import sys

    sys.path.insert(0, str(REPRO))
    import _runs

    def unit_file(folder, name, seed):
        return folder / f"seed{seed}-{name}.json"

    def write(s, folder, name, seed):
        _runs.write_json(unit_file(folder, name, seed), {"name": name, "seed": seed})

    return lambda argv: _runs.study_main(
        argv, doc="a study", name="toy", script=__file__, settings={"x": 1}, quick={"x": 2}, unit_file=unit_file,
        run_unit=run_unit or write, plan=lambda a, s: [("a", sd) for sd in range(a.seeds)],
        report=lambda folder, a, s: "report")


@pytest.mark.parametrize("argv, named", [(["--seeds", "0"], "--seeds"), (["--seeds", "-2"], "--seeds"),
                                         (["--jobs", "0"], "--jobs"), (["--threads", "0"], "--threads"),
                                         (["--rerun", "a", "x"], "--rerun"), (["--rerun", "nope", "0"], "--rerun")])
def test_study_scripts_refuse_bad_arguments_before_running_anything(tmp_path, argv, named, capsys):
    """Each was taken before: --seeds 0 ran nothing and printed the tables, --jobs 0 ended in "nothing can start",
    --threads 0 ran with 1 thread, --rerun with a seed that is not a number gave a traceback."""
    main = _study(tmp_path, run_unit=lambda *a: pytest.fail("a bad argument must not start a run"))
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and named in err.splitlines()[-1] and "Traceback" not in err


def test_study_scripts_refuse_an_output_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        _study(tmp_path)(["--output", str(tmp_path / "f")])
    assert exit_.value.code == 2 and "--output" in capsys.readouterr().err.splitlines()[-1]
    assert (tmp_path / "f").read_text() == "mine"


def test_a_second_runner_waits_for_a_unit_another_is_training_instead_of_training_it_again(tmp_path):
    """Two runners of one study (two terminals, or `make reproduce-real` started twice) share the cache: a unit held
    by one is waited for by the other, which then finds it done. Before, both trained it."""
    import subprocess
    import sys
    import time

    sys.path.insert(0, str(REPRO))
    import _runs

    main = _study(tmp_path, run_unit=lambda *a: pytest.fail("the unit was trained twice"))
    folder = tmp_path / _runs.settings_hash({"x": 1})
    held = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import json, sys, time; from pathlib import Path; from filelock import FileLock\n"
        f"lock = FileLock({str(_runs.unit_lock(folder, 'a', 0))!r}); lock.acquire()\n"
        f"Path({str(held)!r}).write_text('1'); time.sleep(1)\n"
        f"Path({str(folder)!r}).mkdir(parents=True, exist_ok=True)\n"
        f"Path({str(folder / 'seed0-a.json')!r}).write_text(json.dumps({{'name': 'a', 'seed': 0}}))\n"
        "lock.release()\n")])
    deadline = time.monotonic() + 60
    while not held.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.exists()
    assert main(["--unit", "a", "0", "--output", str(tmp_path)]) == 0
    assert holder.wait(60) == 0


def test_frontier_interpolates_reward_at_matched_divergence():
    import sys

    sys.path.insert(0, str(REPRO))
    import fdpo_frontier_real

    curve = [(0.0, 0.30), (0.4, 0.34), (1.0, 0.40), (0.8, 0.38)]  # a checkpoint may fall back closer to the start
    assert fdpo_frontier_real.interpolate(curve, 0.2) == pytest.approx(0.32)
    assert fdpo_frontier_real.interpolate(curve, 0.7) == pytest.approx(0.37)  # first segment that covers 0.7
    assert fdpo_frontier_real.interpolate(curve, 1.5) is None


def test_conditional_crm_with_a_start_step_removes_the_shortcut_on_its_bad_seed(tmp_path):
    """The conditional CRM's seed 2 on sycophancy (tiny model, 200 steps, mmd_coef 3): with the penalty from step 0
    it scores 0.07 on test_anti (seeds 0-4: 0.07-0.88), with `mmd_start_step: 100` 0.89 (seeds 0-4: 0.82-0.89,
    test_uncorrelated 0.88-0.94; docs/results.md). 0.6 sits between the two spreads' relevant ends for this seed."""
    crm_bias = _load("crm_sweep").load_benchmark()
    out = crm_bias.train_and_score("sycophancy", "conditional", seed=2, output_dir=str(tmp_path), mmd_start_step=100)
    assert out["test_anti"] > 0.6 and out["test_uncorrelated"] > 0.75


def test_fdpo_distance_report_compares_the_divergences_at_matched_reverse_kl(tmp_path):
    """Table 2.2 at equal distance: each metric read off a run's curve (from the start at 0 nats) by linear
    interpolation, hand-computed here; a distance the curve does not reach gives no row."""
    import json
    import sys

    sys.path.insert(0, str(REPRO))
    import fdpo_distance_real as f

    def point(kl, vader, step=10):  # steps of 10 and more: the by-step table's rows cannot pass for matched ones
        return {"step": step, "reverse_kl": kl, "vader": vader, "entropy": 3.0 - kl, "distinct_1": 0.7, "distinct_2": 0.9,
                "self_bleu": 0.1, "vader_per_prompt": [vader]}

    (tmp_path / "base.json").write_text(json.dumps({"curve": [point(0.0, 0.2)]}))
    for name, curve in (("fdpo-reverse_kl", [point(0.5, 0.4), point(2.5, 0.8, 20)]),
                        ("fdpo-forward_kl", [point(1.5, 0.5)])):
        (tmp_path / f"seed0-{name}.json").write_text(json.dumps({"name": name, "seed": 0, "curve": curve}))
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in f.report(tmp_path, f.SETTINGS).splitlines()
            if line.startswith("| fdpo-") and line.split("|")[2].strip() in ("1", "2", "3")}
    assert "| 0.500 | 2.000 |" in rows[("fdpo-reverse_kl", "1")]  # 0.4 + (0.8 - 0.4) * (1 - 0.5) / 2
    assert "| 0.700 | 1.000 |" in rows[("fdpo-reverse_kl", "2")]
    assert "| 0.400 | 2.000 |" in rows[("fdpo-forward_kl", "1")]  # 0.2 + (0.5 - 0.2) * 1 / 1.5
    assert ("fdpo-reverse_kl", "3") not in rows and ("fdpo-forward_kl", "2") not in rows
