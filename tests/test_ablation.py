"""Ablation studies (nbhelpers.vit.ablation): variants, checks before any run, equal budgets, resume, measured takeaways."""
import json
import math

import pytest

from nbhelpers.vit import ablation
from nbhelpers.vit.config import build_config


def tiny_base(tmp_path, **overrides):
    """The smoke preset shrunk to seconds: 128 generated training images, a 32-wide model, on the CPU."""
    settings = dict(out_dir=str(tmp_path / "out"), device="cpu", synthetic_train_size=128, synthetic_test_size=64,
                    batch_size=32, eval_batch_size=64, dim=32, log_every=2)
    return build_config("smoke", **(settings | overrides))


class CountingFit:
    """Counts the runs `run_study` trains (and can stop at the n-th, as a kill would); training itself is real."""

    def __init__(self, stop_at: int | None = None):
        self.calls, self.stop_at = [], stop_at

    def __call__(self, config):
        self.calls.append(config.train.out_dir)
        if self.stop_at is not None and len(self.calls) == self.stop_at:
            raise KeyboardInterrupt("killed")
        return REAL_FIT(config)


REAL_FIT = ablation.fit


def test_overrides_parse_strings_dicts_and_aliases(tmp_path):
    base = tiny_base(tmp_path)
    assert ablation.parse_overrides("dim=96, heads=3") == {"dim": 96, "heads": 3}
    assert ablation.parse_overrides({"DEPTH": 4}) == {"depth": 4}
    assert ablation.parse_overrides("betas=(0.9,0.99), lr=0.002") == {"betas": (0.9, 0.99), "lr": 0.002}  # a comma in a value
    spt = ablation.apply_overrides(base, ablation.parse_overrides("spt=True"))
    assert spt.model.tokenizer == "spt" and base.model.tokenizer == "patch"  # the base is not changed
    mixed = ablation.apply_overrides(build_config("fast"), {"mix": False})
    assert mixed.augment.mixup_alpha == 0 and mixed.augment.cutmix_alpha == 0
    ratio = ablation.apply_overrides(base, {"dim": 48, "heads": 4, "mlp_ratio": 2.5})
    assert ratio.model.mlp_dim == 120
    assert ablation.apply_overrides(base, {"mlp_ratio": None}).model.mlp_dim == base.model.mlp_dim  # None keeps


@pytest.mark.parametrize("study, message", [
    ("seeds", "did you mean 'seed'"),
    ("everything", "one of ['seed', 'recipe']"),
    (["dpeth=4"], "did you mean 'depth'"),
    (["depth"], "is not NAME=VALUE"),
    (["dim=100,heads=3"], "not divisible"),
    ([], "non-empty list"),
    ([3], "write a string such as 'depth=4'"),
])
def test_bad_input_is_refused_before_any_run(tmp_path, monkeypatch, study, message):
    fit = CountingFit()
    monkeypatch.setattr(ablation, "fit", fit)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        ablation.run_study(study, tiny_base(tmp_path), epochs=1)
    assert "\n" not in str(error.value)
    assert fit.calls == [] and not (tmp_path / "out").exists()


def test_a_study_over_the_time_budget_is_refused_up_front_with_its_estimate(tmp_path, monkeypatch):
    fit = CountingFit()
    monkeypatch.setattr(ablation, "fit", fit)
    base = tiny_base(tmp_path)
    with pytest.raises(ValueError, match=r"2 run\(s\) still to train at 5 min of training each, estimated 10.0 min, over TIME_BUDGET_MINUTES=8"):
        ablation.run_study(["depth=1"], base, minutes=5, max_minutes=8)
    with pytest.raises(ValueError, match=r"estimated .* over TIME_BUDGET_MINUTES=1e-05\. Lower ABLATION_EPOCHS"):
        ablation.run_study(["depth=1"], base, epochs=50, max_minutes=1e-5)  # the estimate of an epoch budget is measured
    assert fit.calls == [] and not (tmp_path / "out").exists()
    assert ablation.plan_study(["depth=1"], base, minutes=5, max_minutes=10).estimate_seconds == 600


def test_seed_study_follows_the_write_up_cumulatively_at_the_model_scale(tmp_path):
    base = build_config("cpu", out_dir=str(tmp_path))  # 128 wide, 4 deep, 4 heads, lr 1e-3
    plan = ablation.plan_study("seed", base, minutes=1)  # a budget in minutes: nothing is timed to estimate it
    steps = dict(zip([v.name for v in plan.variants], plan.configs))
    assert list(steps) == ["baseline", "mixup-cutmix", "deeper", "higher-lr", "spt", "wider"]
    first = steps["baseline"]
    assert (first.model.depth, first.train.lr, first.model.tokenizer) == (2, 5e-4, "patch")
    assert first.augment.mixup_alpha == 0 and first.train.ema_decay == 0 and not first.train.tta
    assert steps["mixup-cutmix"].augment.mixup_alpha > 0 and steps["mixup-cutmix"].model.depth == 2
    assert steps["deeper"].model.depth == 4 and steps["deeper"].augment.cutmix_alpha > 0 and steps["deeper"].train.lr == 5e-4
    assert steps["higher-lr"].train.lr == 1e-3 and steps["higher-lr"].model.tokenizer == "patch"
    assert steps["spt"].model.tokenizer == "spt" and steps["spt"].model.dim == 128
    assert steps["wider"].model.dim == 192 and steps["wider"].model.dim % steps["wider"].model.heads == 0
    assert steps["wider"].model.tokenizer == "spt" and steps["wider"].model.mlp_dim == 384
    assert len({str(folder) for folder in plan.folders}) == 6 and all(config.train.time_budget_minutes == 1 for config in plan.configs)


def test_recipe_study_switches_off_only_what_the_configuration_uses(tmp_path):
    best = ablation.plan_study("recipe", build_config("best", out_dir=str(tmp_path)), minutes=1)
    names = [variant.name for variant in best.variants]
    assert names == ["reference", "no-trivialaugment", "no-mixup-cutmix", "no-random-erasing", "no-label-smoothing",
                     "no-droppath", "no-layerscale", "no-lsa", "no-spt", "no-ema", "no-tta"]
    configs = dict(zip(names, best.configs))
    assert configs["no-lsa"].model.lsa is False and configs["no-lsa"].model.tokenizer == "spt"  # one change at a time
    assert not configs["no-layerscale"].model.layerscale and configs["reference"].model.layerscale == 1e-4
    cpu = ablation.plan_study("recipe", build_config("cpu", out_dir=str(tmp_path)), minutes=1)
    assert [variant.name for variant in cpu.variants] == ["reference", "no-label-smoothing", "no-ema", "no-tta"]
    assert "MixUp/CutMix" in cpu.notes[0] and "SPT" in cpu.notes[0]


def test_study_trains_at_equal_budget_measures_and_resumes_after_a_kill(tmp_path, monkeypatch):
    base = tiny_base(tmp_path)
    killed = CountingFit(stop_at=2)
    monkeypatch.setattr(ablation, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        ablation.run_study(["depth=1", {"spt": True}], base, epochs=1)
    assert len(killed.calls) == 2  # the reference finished, the kill came in the second run
    resumed = CountingFit()
    monkeypatch.setattr(ablation, "fit", resumed)
    result = ablation.run_study(["depth=1", {"spt": True}], base, epochs=1)
    assert resumed.calls == killed.calls[1:] + [str(result.plan.folders[2])]  # the finished reference is not redone
    assert [row.status for row in result.rows] == ["already finished", "trained", "trained"]
    summaries = [json.loads((folder / "run_summary.json").read_text()) for folder in result.plan.folders]
    assert [s["epochs"] for s in summaries] == [1, 1, 1]  # equal budget
    assert [s["config"]["model"]["depth"] for s in summaries] == [2, 1, 2] and summaries[2]["config"]["model"]["tokenizer"] == "spt"
    assert [row.accuracy for row in result.rows] == [s["final_test_accuracy"]["reported"] for s in summaries]
    delta = 100 * (summaries[1]["final_test_accuracy"]["reported"] - summaries[0]["final_test_accuracy"]["reported"])
    assert result.takeaways[0].startswith(f"depth=1: {delta:+.1f} points over the reference")
    assert "on generated data (not CIFAR-10)" in result.takeaways[0]
    noise = 100 * 2 * math.sqrt(2 * sum(r.accuracy for r in result.rows) / 3 * (1 - sum(r.accuracy for r in result.rows) / 3) / 64)
    assert f"differences under about {noise:.1f} points" in result.takeaways[-1]
    table = ablation.study_table(result)
    assert table.count("\n| ") == 5 and "generated data" in table and f"{delta:+.1f}" in table
    assert ablation.plot_study(result, show=False).stat().st_size > 0
    again = CountingFit()
    monkeypatch.setattr(ablation, "fit", again)
    (result.plan.folders[1] / "run_summary.json").write_text("{truncated")  # not a completion record any more
    ablation.run_study(["depth=1", {"spt": True}], base, epochs=1)
    assert again.calls == [str(result.plan.folders[1])]
    # The recipe study of the same configuration and budget shares the finished reference; EMA and TTA rows are read from it.
    recipe = ablation.run_study("recipe", base, epochs=1)
    assert again.calls == [str(result.plan.folders[1])] and recipe.plan.folders[0] == result.plan.folders[0]
    final = summaries[0]["final_test_accuracy"]
    rows = {row.name: row for row in recipe.rows}
    assert rows["no-tta"].accuracy == final[final["reported_is"].split("+")[0]] and rows["no-ema"].accuracy == final["raw"]
    # EMA's takeaway compares raw with EMA weights, both without TTA (not with the reported EMA + TTA figure)
    ema = next(line for line in recipe.takeaways if line.startswith("EMA") or "EMA" in line.split(":")[0])
    assert f"({100 * final['ema']:.1f}% with it, {100 * final['raw']:.1f}% without)" in ema, ema


def test_a_summary_of_another_configuration_is_not_a_finished_run(tmp_path):
    base = tiny_base(tmp_path)
    plan = ablation.plan_study(["depth=1"], base, epochs=1)
    folder, config = plan.folders[1], plan.configs[1]
    folder.mkdir(parents=True)
    summary = {"config": json.loads(json.dumps(config.to_dict())), "final_test_accuracy": {"reported": 0.5}}
    (folder / "run_summary.json").write_text(json.dumps(summary))
    assert ablation.finished_summary(folder, config) is not None
    summary["config"]["train"]["epochs"] = 2
    (folder / "run_summary.json").write_text(json.dumps(summary))
    assert ablation.finished_summary(folder, config) is None


def test_parallel_runs_go_one_process_each(tmp_path):
    # Two CPU processes stand in for two GPUs (each run is a separate `python -m nbhelpers.vit` process).
    result = ablation.run_study(["depth=1"], tiny_base(tmp_path), epochs=1, processes=2)
    assert [row.status for row in result.rows] == ["trained", "trained"]
    for folder in result.plan.folders:
        assert "final test accuracy" in (folder / "train.log").read_text()
        assert json.loads((folder / "launch_config.json").read_text())["train"]["out_dir"] == str(folder)
