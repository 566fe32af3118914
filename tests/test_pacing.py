"""Evaluation schedule, time budget and EMA warm-up: the decisions, and short runs that show them."""
import time

import pytest
import torch

from nbhelpers.vit.checkpoint import load_checkpoint
from nbhelpers.vit.config import build_config
from nbhelpers.vit.pacing import EVAL_SHARE, auto_eval_every, evaluation_epochs
from nbhelpers.vit.state import ModelEma
from nbhelpers.vit import train as train_module
from nbhelpers.vit.train import fit



def tiny(tmp_path, **overrides):
    settings = dict(dim=32, depth=1, heads=2, mlp_dim=64, synthetic_train_size=512, synthetic_test_size=128,
                    out_dir=str(tmp_path), device="cpu", report_plots=False) | overrides
    return build_config("smoke", **settings)


def test_auto_evaluation_schedule_costs_at_most_the_share():
    # fast on an H100: ~1.5 s epochs, evaluation of raw + EMA ~0.6 s: every epoch would cost 40% of training
    for epochs, eval_seconds, epoch_seconds in [(60, 0.6, 1.5), (300, 0.2, 2.0), (100, 1.0, 100.0)]:
        every = auto_eval_every(epochs, 3, eval_seconds, epoch_seconds)
        cost = len(evaluation_epochs(epochs, every, 3)) * eval_seconds
        assert cost <= EVAL_SHARE * epochs * epoch_seconds + 1e-9, (epochs, every, cost)
        assert every > 1 or eval_seconds <= EVAL_SHARE * epoch_seconds
        assert every == 1 or len(evaluation_epochs(epochs, every - 1, 3)) * eval_seconds > EVAL_SHARE * epochs * epoch_seconds
    assert evaluation_epochs(10, 4, 2) == {1, 4, 8, 9, 10}


def test_ema_decay_ramps_up_and_warm_up_ends_when_it_reaches_the_decay():
    ema = ModelEma(torch.nn.Linear(2, 2), decay=0.999)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(90) == pytest.approx(0.91)
    assert ema.decay_at(20_000) == 0.999
    assert not ema.warmed_up(8_980) and ema.warmed_up(9_000)  # (1 + s) / (10 + s) reaches 0.999 at s = 8990


def test_short_run_ema_is_not_behind_raw_and_reported_weights_say_why(tmp_path):
    # fast's decay on a 2-epoch run (16 steps): without the ramp the EMA would still be 98% random initialisation.
    result = fit(tiny(tmp_path, epochs=2, ema_decay=0.999, lr=3e-3))
    last = result.history[-1]
    assert last["ema_test_accuracy"] >= last["test_accuracy"] - 0.05, last
    assert last["test_accuracy"] > 0.2  # it learned something, so the comparison means something
    final = result.summary["final_test_accuracy"]
    assert final["reported_is"].startswith("raw") and "ramping" in final["reported_because"]
    with_val = fit(tiny(tmp_path / "val", epochs=2, ema_decay=0.999, lr=3e-3, val_size=128))
    last = with_val.history[-1]
    expected = "ema" if last["ema_val_accuracy"] >= last["val_accuracy"] else "raw"
    assert with_val.summary["final_test_accuracy"]["reported_is"].startswith(expected)


def test_time_budget_sizes_the_run_and_a_resume_keeps_the_schedule(tmp_path, one_thread):
    budget_minutes = 0.1
    start = time.monotonic()
    result = fit(tiny(tmp_path, epochs=1000, time_budget_minutes=budget_minutes, checkpoint_minutes=0.02, eval_batch_size=128, log_every=2))
    seconds = time.monotonic() - start
    assert result.status == "finished" and 8 < result.step < 1000 * 8  # the budget, not EPOCHS, ended it
    # The plan (made from measured speed) ends within 10% of the budget; the wall clock on CI's shared cores varied by
    # 40% between two clean CI runs (15.7 s vs 20.8 s for a 15 s budget), so it is only checked to be of that order.
    plan = load_checkpoint(tmp_path / "last.pt")["budget_plan"]
    planned_end = plan["planned_after_seconds"] + (plan["total_steps"] - plan["planned_at_step"]) * plan["seconds_per_step_with_overhead"] + plan["reserved_seconds"]
    assert abs(planned_end - budget_minutes * 60) <= 0.1 * budget_minutes * 60, plan
    assert 0.6 * budget_minutes * 60 <= seconds <= 1.5 * budget_minutes * 60, seconds
    budget = result.summary["time_budget"]
    assert budget["budget_seconds"] == budget_minutes * 60 and abs(budget["actual_seconds"] - seconds) < 1.0
    assert budget["planned_steps"] == result.step == load_checkpoint(tmp_path / "last.pt")["scheduler"]["total_steps"]
    assert any("test_accuracy" not in record for record in result.history), "evaluation should not run every epoch"
    # Re-run into the same OUT_DIR: the stored schedule wins over EPOCHS=1000, so nothing more is trained.
    again = fit(tiny(tmp_path, epochs=1000, time_budget_minutes=budget_minutes, checkpoint_minutes=0.05, eval_batch_size=128, log_every=2))
    assert again.step == result.step


class FakeClock:
    """time.monotonic for the training loop's LoopClock that advances only as the stubbed device 'computes'."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now


def stub_device_speed(monkeypatch, seconds_for_step):
    """The loop's clock advances by seconds_for_step(step) at each optimizer step, and by nothing else."""
    from nbhelpers.vit import pacing

    clock = FakeClock()
    original = train_module.train_step

    def timed(loop, *args):
        clock.now += seconds_for_step(loop.state.step)
        return original(loop, *args)

    monkeypatch.setattr(pacing, "time", clock)
    monkeypatch.setattr(train_module, "train_step", timed)
    return clock


@pytest.mark.parametrize("seconds_per_step, expected, hint", [(20.0, "8.9 h", True), (0.05, "80 s", False)])
def test_the_estimate_comes_after_a_few_steps_and_leaves_out_compile(tmp_path, monkeypatch, capsys, seconds_per_step, expected, hint):
    # The first step "compiles" for 600 s: an estimate that counted it would say ~30x too long on the fast device.
    stub_device_speed(monkeypatch, lambda step: 600.0 if step == 0 else seconds_per_step)
    printed_by_step = {}
    original = train_module.train_step

    def watch(loop, *args):  # what had been printed before each step
        printed_by_step[loop.state.step] = capsys.readouterr().out
        return original(loop, *args)

    monkeypatch.setattr(train_module, "train_step", watch)
    # 1600 steps, 40 an epoch, a logging window every 50 steps: the old estimate waited for the epoch's end
    fit(tiny(tmp_path, epochs=40, stop_after_epochs=1, warmup_epochs=0, synthetic_train_size=1280, batch_size=32, log_every=50))
    printed = "".join(printed_by_step.values()) + capsys.readouterr().out
    before_sixth = "".join(printed_by_step[step] for step in range(6))
    assert "estimating…" in printed_by_step[0]
    assert f"estimated training time on this device: {expected} (1,600 steps at {seconds_per_step:.3g} s/step" in before_sixth
    assert ("PRESET='cpu'" in printed and "GPU platform" in printed) == hint


def test_a_budget_is_a_deadline_when_the_machine_slows_down_mid_run(tmp_path, monkeypatch):
    # 1 s a step, 3x slower from step 20 (epoch 3 of 8-step epochs). Planned once, after epoch 1, the budget's 57 steps
    # would take about 130 s; re-planned at each epoch end, the run ends within the budget plus one slowed epoch.
    clock = stub_device_speed(monkeypatch, lambda step: 1.0 if step < 20 else 3.0)
    result = fit(tiny(tmp_path, epochs=1000, time_budget_minutes=1, log_every=2))
    assert result.status == "finished" and clock.now <= 60 + 8 * 3.0, (clock.now, result.step)
    plan = load_checkpoint(tmp_path / "last.pt")["budget_plan"]
    assert plan["replans"] >= 1 and result.step == plan["total_steps"] < 57
    last = result.history[-1]
    assert last["lr"] == pytest.approx(1e-5) and "test_accuracy" in last  # the squeezed cosine ended; the end was evaluated


def test_a_budget_run_killed_after_its_plan_resumes_with_it_and_counts_every_epoch_and_second(tmp_path, monkeypatch):
    # SIGKILL right after the plan (nothing saved at the kill): the plan and epoch 1 must already be in last.pt.
    clock = stub_device_speed(monkeypatch, lambda step: 1.0)
    settings = dict(epochs=1000, time_budget_minutes=1, log_every=2)
    original = train_module.train_step

    def killed_after_the_plan(loop, *args):
        if loop.state.step == 8:
            raise KeyboardInterrupt("SIGKILL")
        return original(loop, *args)

    monkeypatch.setattr(train_module, "train_step", killed_after_the_plan)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(tmp_path, **settings))
    killed = load_checkpoint(tmp_path / "last.pt")
    assert killed["budget_plan"]["planned_at_step"] == 8 and [r["epoch"] for r in killed["history"]] == [1]
    parts = [clock.now]
    monkeypatch.setattr(train_module, "train_step", original)
    assert fit(tiny(tmp_path, stop_after_epochs=2, **settings)).status == "stopped"
    parts.append(clock.now - sum(parts))
    result = fit(tiny(tmp_path, **settings))
    parts.append(clock.now - sum(parts))
    budget = result.summary["time_budget"]
    assert budget["plan"]["planned_at_step"] == 8, "the resumed sessions kept the plan"
    epochs = -(-result.step // 8)  # the last one may be cut short by the plan
    assert [r["epoch"] for r in result.history] == list(range(1, epochs + 1)) and budget["epochs"] == epochs
    # the stubbed device's seconds of all three sessions, plus the real seconds of the final report
    assert sum(parts) <= budget["actual_seconds"] < sum(parts) + 60, (parts, budget["actual_seconds"])


def test_an_epoch_with_no_steady_step_makes_no_plan_from_compile_time():
    """A resume that finishes an epoch in its first 2 steps (compile and warm-up) times no steady step: that epoch
    records no speed, so a time budget is not re-planned from the compile time (it once cut a run short)."""
    from nbhelpers.vit.pacing import WARMUP_STEPS, LoopClock

    clock = LoopClock()
    clock.start_epoch()
    clock.lap(WARMUP_STEPS, WARMUP_STEPS)  # the session's first steps: warm-up only
    clock.end_epoch(WARMUP_STEPS, seconds=30.0)  # 15 s a step, all of it compile
    assert clock.step_seconds is None
    clock.start_epoch()
    clock.lap(WARMUP_STEPS + 10, 10)  # the next epoch: 10 steady steps
    clock.end_epoch(10, seconds=1.0)
    assert clock.step_seconds is not None and clock.step_seconds < 15.0
