"""Seeds (issue 23, item 5): train-reference --seeds trains each scheme once per seed on the same data; compare
gives each headline number of a scheme as its seeds' mean with their spread, and decides a paper's claim only
beyond that spread, saying on how many seeds it rests."""

from __future__ import annotations

import math
import statistics

import pandas as pd
import pytest

import layerprobe
from fixtures_reference import MICRO, assert_one_line_error, read_json, read_metrics, run_cli
from layerprobe.comparison import paper_checks, seed_summary, seed_verdict
from layerprobe.training.settings import parse_seeds


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """pre and lns on seeds 0 and 1 (micro, 4 steps), and an lns run on seed 0 without --seeds."""
    root = tmp_path_factory.mktemp("seeds")
    result, text = run_cli("train-reference", *MICRO, "--threads", 1, "--norm", "pre,lns", "--steps", 4,
                           "--eval-every", 2, "--eval-samples", 8, "--seeds", 2, "--out", root / "runs")
    assert result.exit_code == 0, text
    single, text1 = run_cli("train-reference", *MICRO, "--threads", 1, "--norm", "lns", "--steps", 4,
                            "--eval-every", 2, "--eval-samples", 8, "--out", root / "single")
    assert single.exit_code == 0, text1
    return root, text


def test_each_seed_has_its_own_folder_weights_and_losses_on_the_same_data(seeded):
    root, text = seeded
    runs = root / "runs"
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["lns-seed0", "lns-seed1", "pre-seed0", "pre-seed1"]
    assert "pre-seed1" in text  # the summary table names each run
    for scheme in ("pre", "lns"):
        a, b = read_json(runs / f"{scheme}-seed0" / "run.json"), read_json(runs / f"{scheme}-seed1" / "run.json")
        assert (a["identity"]["train"]["seed"], b["identity"]["train"]["seed"]) == (0, 1)
        # The same data in the same order: the batch order's seed, the data and the held-out split agree.
        assert a["identity"]["train"]["data_seed"] == b["identity"]["train"]["data_seed"] == 0
        drop = lambda ident: {**ident["train"], "seed": None}  # noqa: E731
        assert drop(a["identity"]) == drop(b["identity"]) and a["identity"]["model"] == b["identity"]["model"]
        # Different initial weights: different losses from the first step on.
        la = [r["loss"] for r in read_metrics(runs / f"{scheme}-seed0") if "loss" in r]
        lb = [r["loss"] for r in read_metrics(runs / f"{scheme}-seed1") if "loss" in r]
        assert len(la) == len(lb) == 4 and all(x != y for x, y in zip(la, lb))
    from safetensors.torch import load_file

    w0, w1 = (load_file(str(runs / f"pre-seed{k}" / "model.safetensors")) for k in (0, 1))
    assert w0.keys() == w1.keys() and any(not (w0[k] == w1[k]).all() for k in w0)
    # Seed 0 of --seeds is the run without --seeds: same folder contents but for its name.
    plain = [r["loss"] for r in read_metrics(root / "single" / "lns") if "loss" in r]
    assert plain == [r["loss"] for r in read_metrics(runs / "lns-seed0") if "loss" in r]
    assert read_json(runs / "summary.json")["settings"]["seeds"] == [0, 1]


def test_seed_runs_are_resumed_and_refused_like_any_run(seeded):
    root, _ = seeded
    runs = root / "runs"
    before = {p.name: (p / "metrics.jsonl").read_bytes() for p in runs.iterdir() if p.is_dir()}
    args = ["train-reference", *MICRO, "--threads", 1, "--norm", "pre,lns", "--steps", 4, "--eval-every", 2,
            "--eval-samples", 8, "--seeds", "0,1", "--out", runs]
    result, text = run_cli(*args)
    assert_one_line_error(result, text, "already holds this run")
    result, text = run_cli(*args, "--resume")  # every seed is complete: nothing trains again
    assert result.exit_code == 0, text
    assert {p.name: (p / "metrics.jsonl").read_bytes() for p in runs.iterdir() if p.is_dir()} == before


def test_seeds_change_the_weights_seed_only():
    """The rows a step reads depend on the data seed only (BlockBatches), which --seeds leaves at --seed."""
    from layerprobe.training import TrainSettings
    from layerprobe.training.distributed import DistEnv
    from layerprobe.training.settings import resolve_plan

    env = DistEnv()
    plan = resolve_plan(TrainSettings(norm="pre", preset="micro", steps=3, seeds="3,5", seed=2, device="cpu"), env)
    plans = plan.per_seed()
    assert [p.settings.seed for p in plans] == [3, 5] and {p.data_seed for p in plans} == {2}
    assert [p.run_name("pre") for p in plans] == ["pre-seed3", "pre-seed5"]
    assert resolve_plan(TrainSettings(norm="pre", preset="micro", device="cpu"), env).run_name("pre") == "pre"


def test_parse_seeds():
    assert parse_seeds(None) is None
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds(2, base=5) == [5, 6]
    assert parse_seeds("4,1") == [4, 1] and parse_seeds("7,") == [7] and parse_seeds([2, 3]) == [2, 3]


@pytest.mark.parametrize("seeds, needle", [("0", "at least 1"), ("a,b", "comma list"), ("1,1", "more than once"),
                                           ("-1,2", "at least 0"), (",", "names no seed")])
def test_bad_seeds_are_one_line(tmp_path, seeds, needle):
    result, text = run_cli("train-reference", *MICRO, "--seeds", seeds, "--out", tmp_path / "r")
    assert_one_line_error(result, text, needle)
    assert not (tmp_path / "r").exists()


def test_compare_gives_the_mean_and_spread_of_each_schemes_seeds(seeded, tmp_path):
    root, _ = seeded
    folders = sorted((root / "runs").glob("*-seed*"))
    comp = layerprobe.compare(folders, out=tmp_path / "report", progress=False)
    assert comp.seeded
    assert dict(zip(comp.headline["model"], comp.headline["seed_group"])) == {
        "lns-seed0": "lns", "lns-seed1": "lns", "pre-seed0": "pre", "pre-seed1": "pre"}
    seeds = comp.seeds.set_index("model")
    for scheme in ("pre", "lns"):
        # The runs' own numbers, read from their metrics.jsonl: the last evaluation's perplexity.
        ppl = []
        for k in (0, 1):
            evals = [r for r in read_metrics(root / "runs" / f"{scheme}-seed{k}") if "eval_ppl" in r]
            ppl.append(evals[-1]["eval_ppl"])
        row = seeds.loc[scheme]
        assert row["seeds"] == 2 and row["seed_list"] == "0 1"
        assert row["final_eval_perplexity"] == pytest.approx(sum(ppl) / 2, rel=1e-12)
        assert row["final_eval_perplexity_sd"] == pytest.approx(statistics.stdev(ppl), rel=1e-9)
        assert (row["final_eval_perplexity_min"], row["final_eval_perplexity_max"]) == (min(ppl), max(ppl))
        assert row["final_eval_perplexity_n"] == 2
    saved = pd.read_csv(tmp_path / "report" / "headline_seeds.csv")
    assert list(saved["model"]) == ["lns", "pre"] and list(saved["seeds"]) == [2, 2]
    html = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "Every run (one row per seed)" in html and " ± " in html
    from layerprobe.report.compare import headline_table
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(headline_table(comp, width=200))
    out = " ".join(console.export_text().split())  # the title may wrap
    assert "in 2 seed groups" in out and " ± " in out


def test_a_single_seed_comparison_is_unchanged_and_says_1_seed(seeded, tmp_path):
    root, _ = seeded
    comp = layerprobe.compare([root / "single" / "lns", root / "runs" / "pre-seed0"], out=None, progress=False)
    assert not comp.seeded and list(comp.headline["seed_group"]) == list(comp.headline["model"])
    h = pd.DataFrame({"model": ["pre", "lns"], "norm_scheme": ["pre", "lns"], "perplexity": [30.0, 20.0]})
    (check,) = paper_checks(h)
    assert check["sentence"] == "Reproduced: lns reaches a lower perplexity than Pre-LN (Curse of Depth) (lns 20.00, " \
                                "Pre-LN 30.00; on 1 seed)."


def _seed_headline(values: dict[str, list[float]], col: str = "perplexity") -> pd.DataFrame:
    rows = [{"model": f"{s}-seed{k}", "norm_scheme": s, "seed": k, "seed_group": s, col: v}
            for s, vs in values.items() for k, v in enumerate(vs)]
    return pd.DataFrame(rows)


def test_seed_summary_is_the_plain_mean_and_spread():
    values = {"pre": [30.0, 31.5, 29.0], "lns": [20.0, 22.0, float("nan")]}
    s = seed_summary(_seed_headline(values)).set_index("model")
    for scheme, vs in values.items():
        finite = [v for v in vs if math.isfinite(v)]
        assert s.loc[scheme, "seeds"] == 3 and s.loc[scheme, "perplexity_n"] == len(finite)
        assert s.loc[scheme, "perplexity"] == pytest.approx(sum(finite) / len(finite))
        mean = sum(finite) / len(finite)
        sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
        assert s.loc[scheme, "perplexity_sd"] == pytest.approx(sd)
        assert s.loc[scheme, "perplexity_min"] == min(finite) and s.loc[scheme, "perplexity_max"] == max(finite)
    from layerprobe.report.compare_table import cell

    rows = seed_summary(_seed_headline(values))
    assert cell(rows.iloc[1], "perplexity", ".2f") == f"21.00 ± {math.sqrt(2):.2f} (n=2)"  # one seed lacks it
    assert cell(rows.iloc[0], "perplexity", ".2f") == f"30.17 ± {statistics.stdev(values['pre']):.2f}"


def test_reproduced_only_beyond_the_spread_of_the_seeds():
    claim = "lns reaches a lower perplexity than Pre-LN (Curse of Depth)"

    def verdict(pre, lns):
        (c,) = [c for c in paper_checks(_seed_headline({"pre": pre, "lns": lns})) if c["claim"] == claim]
        return c

    # Every lns seed below every Pre-LN seed: reproduced.
    c = verdict([30.0, 31.0, 32.0], [20.0, 25.0, 29.9])
    assert c["verdict"] == "reproduced" and c["reproduced"] and c["seeds"] == {"lns": 3, "pre": 3}
    assert c["sentence"].startswith("Reproduced: ") and c["sentence"].endswith("; on 3 seeds each).")
    assert "range 20.00 to 29.90 over 3 seeds" in c["sentence"]
    # The means keep the same order, but the ranges overlap: not decided.
    c = verdict([30.0, 31.0, 32.0], [20.0, 25.0, 30.5])
    assert c["verdict"] == "not decided" and not c["reproduced"] and c["sentence"].startswith("Not decided: ")
    # Every lns seed above every Pre-LN seed: not reproduced.
    c = verdict([10.0, 11.0], [20.0, 21.0, 22.0])
    assert c["verdict"] == "not reproduced" and c["sentence"].startswith("Not reproduced: ")
    assert c["sentence"].endswith("; on 3 (lns) and 2 (pre) seeds).")
    # A claim about one scheme against a constant: all seeds, none, or some.
    var = lambda vs: next(c for c in paper_checks(_seed_headline({"pre": vs}, "variance_growth_factor")))  # noqa
    assert var([1.5, 2.0])["verdict"] == "reproduced"
    assert var([0.5, 0.9])["verdict"] == "not reproduced"
    assert var([0.9, 2.0])["verdict"] == "not decided"


def test_seed_verdict():
    assert seed_verdict([True, True]) == "reproduced"
    assert seed_verdict([False, False]) == "not reproduced"
    assert seed_verdict([True, False]) == "not decided"


def test_demo_seeds_option_is_checked_first(tmp_path):
    result, text = run_cli("demo", "--seeds", 0, "--out", tmp_path / "o", "--runs", tmp_path / "r")
    assert_one_line_error(result, text, "--seeds")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_demo_on_two_seeds(tmp_path):
    """demo --seeds 2: every scheme trained, analysed and swept per seed; the page gives means ± sd and says on
    how many seeds each verdict rests."""
    from layerprobe.comparison import paper_checks as checks_of

    comp = layerprobe.demo(out=tmp_path / "report", runs=tmp_path / "runs", norm="pre,lns", preset="micro", steps=4,
                           seeds=2, block_sweep=False, workers=1, threads=1, progress=False)
    names = ["pre-seed0", "lns-seed0", "pre-seed1", "lns-seed1"]
    assert [m.label for m in comp.models] == names
    for name in names:
        assert (tmp_path / "runs" / name / "run.json").is_file()
        assert (tmp_path / "report" / name / "layers.csv").is_file()
    assert comp.seeded and list(comp.seeds["model"]) == ["pre", "lns"] and list(comp.seeds["seeds"]) == [2, 2]
    html = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "Each scheme was trained on 2 seeds" in html and "--seeds 2" in html
    sentences = [c["sentence"] for c in checks_of(comp.headline)]
    assert sentences and all(s.endswith(("on 2 seeds each).", "on 2 seeds).")) for s in sentences)
    for s in sentences:
        assert s in html.replace("&#x27;", "'")
