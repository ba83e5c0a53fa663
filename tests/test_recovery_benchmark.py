"""benchmarks/recovery.py in miniature, on the real stories260k (skipped without ../shared): the probes the
allocators see (several label draws per text; the soft probe's loss is the students' KL) and a tiny run whose
rows are labelled by probe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moela.allocators.probe import collate

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def recovery(monkeypatch, shared, one_thread):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import recovery

    return recovery


@pytest.fixture
def teacher_data(recovery):
    ids = recovery.texts(6, 12)
    teacher, _ = recovery.make_teacher("deep", 0.3)
    return ids, recovery.teacher_targets(teacher, ids)


def test_several_draws_per_text_are_text_major_and_differ(recovery, teacher_data):
    ids, targets = teacher_data
    one = recovery.sampled_examples(ids, targets, seed=0)
    three = recovery.sampled_examples(ids, targets, seed=0, samples=3)
    assert len(one) == 6 and len(three) == 18
    assert [e["input_ids"] for e in three[:3]] == [ids[0].tolist()] * 3
    assert all(e["labels"][0] == -100 and e["labels"][1:] for e in three)
    assert len({tuple(e["labels"]) for e in three[:3]}) > 1


def test_probe_texts_beyond_the_students_come_after_their_held_out_texts(recovery):
    ids, val_ids, probe_ids = recovery.split_texts(4, 3, 6, 12)
    every = recovery.texts(9, 12)
    assert torch.equal(ids, every[:4]) and torch.equal(val_ids, every[4:7])
    assert torch.equal(probe_ids, torch.cat([every[:4], every[7:]]))  # never a held-out text
    assert torch.equal(recovery.split_texts(4, 3, 2, 12)[2], every[:2])


def test_soft_probe_loss_is_the_students_kl(recovery, teacher_data):
    ids, targets = teacher_data
    model = recovery.load_base()
    probe = recovery.soft_probe(model, recovery.sampled_examples(ids, targets, seed=0), targets)
    batch = collate(probe[2:5])
    with torch.no_grad():
        loss = model(**batch).loss
        expected = recovery.kl(recovery.load_base()(input_ids=ids[2:5]).logits, targets[2:5])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("where", ["fit", "measure"])
def test_split_soft_probe_gives_the_kl_only_where_gradients_are_on_or_off(recovery, teacher_data, where):
    ids, targets = teacher_data
    examples = recovery.sampled_examples(ids, targets, seed=0)
    model = recovery.load_base()
    batch = collate(recovery.soft_probe(model, examples, targets, where)[2:5])
    base = recovery.load_base()
    kl = recovery.kl(base(input_ids=ids[2:5]).logits, targets[2:5]).detach()
    sampled = base(**collate(examples[2:5])).loss.detach()
    with torch.no_grad():
        measured = model(**batch).loss
    fitted = model(**batch).loss
    assert fitted.requires_grad
    torch.testing.assert_close(measured, sampled if where == "fit" else kl)
    torch.testing.assert_close(fitted.detach(), kl if where == "fit" else sampled)


def test_tiny_run_labels_rows_by_probe(recovery, tmp_path, capsys, monkeypatch):
    out = tmp_path / "recovery.json"
    argv = ["--scenarios", "deep", "--methods", "uniform", "prune", "--seeds", "0", "--steps", "2", "--train", "16",
            "--val", "8", "--probe", "8", "--length", "12", "--soft", "--no-write", "--out", str(out)]
    recovery.main(argv)
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["uniform/soft@8", "prune/soft@8"]
    assert all(r["loss"] > 0 and 0 <= r["planted_share"] <= 1 for r in rows)
    assert "| prune/soft@8 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        recovery.main([*argv, "--samples", "2"])  # --soft replaces the sampled labels
    with pytest.raises(SystemExit):
        recovery.main([*argv, "--teacher"])  # two ways to the same probe loss
    entered = []

    def recording(model, teacher, **kwargs):
        entered.append(teacher)
        return real(model, teacher, **kwargs)

    real = recovery.moela.teacher_loss
    monkeypatch.setattr(recovery.moela, "teacher_loss", recording)
    recovery.main([a for a in argv if a != "--soft"] + ["--teacher", "--methods", "prune"])
    assert [r["method"] for r in json.loads(out.read_text())][-1] == "prune/teacher@8"
    assert len(entered) == 1 and entered[0] is not None  # the allocator probed inside teacher_loss
    wider = [a for a in argv if a != "--soft"]
    wider[wider.index("--probe") + 1] = "20"  # 4 probe texts beyond the students' 16
    recovery.main([*wider, "--methods", "prune"])
    assert [r["method"] for r in json.loads(out.read_text())][-1] == "prune@20"


def test_gap_closure_compares_a_method_with_uniform_and_the_oracle_on_the_same_seeds(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import recovery

    losses = {("uniform", 0): 0.05, ("oracle", 0): 0.01, ("m", 0): 0.03,
              ("uniform", 1): 0.09, ("oracle", 1): 0.05,  # seed 1: uniform and the oracle only
              ("x", 2): 0.02}  # seed 2: no uniform or oracle
    get = {("s", m, seed): {"loss": loss} for (m, seed), loss in losses.items()}
    assert recovery.gap_closure(get, "s", "m", [0, 1]) == pytest.approx(0.5)  # seed 0 only, not 0.07 vs 0.03
    assert math.isnan(recovery.gap_closure(get, "s", "x", [2]))


def test_paired_differences_use_the_seeds_both_rows_have(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import recovery

    losses = {("a", 0): 0.05, ("b", 0): 0.04, ("a", 1): 0.07, ("b", 1): 0.04, ("a", 2): 0.5}  # b has no seed 2
    get = {("s", m, seed): {"loss": loss} for (m, seed), loss in losses.items()}
    *_, row = recovery.paired_differences(get, ["s"], ["a:b"], [0, 1, 2])
    assert row.startswith("| a − b | +0.0200 ± ") and row.endswith(" (2) |")
    assert recovery.paired_differences(get, ["s"], [], [0, 1, 2]) == []


def test_following_is_zero_for_a_plan_that_ignores_the_data_and_positive_for_one_that_follows_it(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import recovery

    maps = [f"model.layers.{b}.{part}.{t}" for b in range(5) for part, types in
            (("self_attn", recovery.ATTN), ("mlp", recovery.MLP)) for t in types]
    planted = {s: {n for n in maps if (int(n.split(".")[2]), n.rsplit(".", 1)[-1]) in recovery.SCENARIOS[s]}
               for s in recovery.SCENARIOS}
    flat = {n: [2] for n in maps}
    get = {}
    for seed in (0, 1, 2):
        for s in recovery.SCENARIOS:
            get[s, "uniform", seed] = {"ranks": flat}
            get[s, "follows", seed] = {"ranks": {n: [8 if n in planted[s] else 1 + seed % 2] for n in maps}}
            if seed < 2:  # planned on seeds 0 and 1 only: seed 2 is left out
                get[s, "partial", seed] = {"ranks": flat}
    assert recovery.rank_share({n: [8 if n in planted["deep"] else 0] for n in maps}, "deep") == 1.0
    table = "\n".join(recovery.following(get, ["uniform", "follows", "partial"], [0, 1, 2]))
    assert "| uniform | +0.000 ± 0.0000 (3) |" in table and "| partial | +0.000 ± 0.0000 (2) |" in table
    value = float(table.split("| follows | ")[1].split(" ")[0])
    assert 0.3 < value < 1


def test_label_effect_compares_real_vs_shuffled_with_seed_vs_seed_distances(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import guilomo_control

    seeds = range(5)
    seed_pairs = {(a, b): 3.0 + 0.1 * (a + b) for a in seeds for b in seeds if a < b}
    apart = guilomo_control.label_effect(seed_pairs, {s: 6.0 + 0.1 * s for s in seeds}, resamples=500)
    mean_seed = sum(seed_pairs.values()) / len(seed_pairs)
    assert apart[0] == pytest.approx(6.2 - mean_seed)
    assert 0 < apart[1] <= apart[0] <= apart[2]
    mixed = guilomo_control.label_effect(seed_pairs, {0: 1.0, 1: 6.0, 2: 1.5, 3: 6.5, 4: 3.0}, resamples=500)
    assert mixed[1] < 0 < mixed[2]  # real-vs-shuffled distances on both sides of seed-vs-seed: not resolved


def test_shape_distance_ignores_a_plan_wide_scale_that_distance_counts(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import guilomo_control

    a = {"q": 2, "k": 4, "v": 6}
    doubled = {n: 2 * r for n, r in a.items()}
    assert guilomo_control.distance(a, doubled) == pytest.approx(4.0)
    assert guilomo_control.shape_distance(a, doubled, total=12) == pytest.approx(0.0)
    moved = {"q": 6, "k": 4, "v": 2}  # same total, mass moved from v to q
    assert guilomo_control.shape_distance(a, moved, total=12) == pytest.approx(guilomo_control.distance(a, moved))
    assert guilomo_control.shape_distance(a, moved, total=24) == pytest.approx(2 * 8 / 3)  # in ranks at that total


def test_shape_shift_finds_a_shift_that_every_seed_shares_and_no_shift_in_noise(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import guilomo_control

    g = torch.Generator().manual_seed(0)
    noise = [{"q": int(r[0]), "k": int(r[1]), "v": int(r[2])} for r in torch.randint(2, 9, (24, 3), generator=g)]
    real = noise[:12]
    same = guilomo_control.shape_shift(real, noise[12:], total=15, resamples=400)
    moved = guilomo_control.shape_shift(real, [{**p, "q": p["q"] + 6} for p in real], total=15, resamples=400)
    assert same[2] > 0.05  # two draws of the same noise: no resolved shift
    assert moved[2] < 0.01 and moved[0] > moved[1]  # rank moved to q under one kind of label on every seed
    assert guilomo_control.planted_share([{"q": 2, "k": 6}], {"q": 8}) == [0.25]


def test_prune_fit_curve_starts_at_the_base_and_both_probes_learn(recovery, monkeypatch):
    """benchmarks/prune_fit.py: the warm-up adapters start at the base model (B = 0, no update norm) whatever
    the probe, both probes train them, and a few steps on the teacher's distributions lower the held-out KL (on
    12 texts of 12 tokens sampled labels may not); the table reports both probes; adapters on the planted maps
    only hold all of the update norm, and the "other" maps are as many, none of them planted."""
    import prune_fit

    curves = {label: prune_fit.fit_curve("deep", 0, label, steps=3, every=3, probe=16, length=12)
              for label in prune_fit.LABELS}
    for points in curves.values():
        assert [p["step"] for p in points] == [0, 3]
        assert points[0]["planted"] == 0 and 0 < points[1]["planted"] < 1
    assert curves["soft"][1]["kl"] < curves["soft"][0]["kl"]
    assert curves["sampled"][0]["kl"] == pytest.approx(curves["soft"][0]["kl"])
    text = prune_fit.table([{"scenario": "deep", "label": k, "points": v} for k, v in curves.items()])
    assert "| deep sampled | deep soft |" in text and text.count("\n") == 3
    only = prune_fit.fit_curve("deep", 0, "soft", steps=3, every=3, probe=16, length=12, maps="planted")
    assert only[0]["planted"] == 0 and only[1]["planted"] == 1  # adapters on the planted maps alone
    row = {"scenario": "deep", "label": "soft", "maps": "planted", "probe": 16, "points": only}
    assert "| step | deep soft planted-only @16 |" in prune_fit.table([row])
    names, planted = ["a", "b", "c", "d", "e"], {"b": 8, "d": 8}
    other = prune_fit.adapted_maps(names, planted, "other", seed=0)
    assert len(other) == 2 and not set(other) & set(planted)  # as many maps, none planted
    assert prune_fit.adapted_maps(names, planted, "planted", seed=0) == ["b", "d"]


def test_students_on_sampled_labels_train_on_the_examples_the_allocators_probe(recovery, tmp_path, monkeypatch):
    """``--students sampled``: the students' cross-entropy labels are the sampled examples whose first ``--probe``
    the allocators see (all of them by default, rows then unlabelled by probe); such rows are not reported with
    rows of students trained on KL."""
    seen = {}
    plan_for, train_student = recovery.plan_for, recovery.train_student

    def recording_plan(method, model, planted, data, seed, budget):
        seen[method] = data
        return plan_for(method, model, planted, data, seed, budget)

    def recording_train(*args):
        seen["labels"] = args[-1]
        return train_student(*args)

    monkeypatch.setattr(recovery, "plan_for", recording_plan)
    monkeypatch.setattr(recovery, "train_student", recording_train)
    out = tmp_path / "sampled.json"
    argv = ["--students", "sampled", "--scenarios", "deep", "--methods", "uniform", "prune", "--seeds", "0",
            "--steps", "2", "--train", "16", "--val", "8", "--length", "12", "--no-write", "--out", str(out)]
    recovery.main(argv)
    rows = json.loads(out.read_text())
    assert [(r["method"], r["students"]) for r in rows] == [("uniform", "sampled"), ("prune", "sampled")]
    assert all(r["loss"] > 0 for r in rows)
    labels = torch.tensor([e["labels"] for e in seen["prune"]])
    assert labels.shape == (16, 12) and torch.equal(seen["labels"], labels)
    recovery.main([*argv, "--probe", "8", "--methods", "prune"])
    assert json.loads(out.read_text())[-1]["method"] == "prune@8"
    assert torch.equal(torch.tensor([e["labels"] for e in seen["prune"]]), labels[:8])
    with pytest.raises(SystemExit):
        recovery.main([*argv, "--probe", "20"])  # the probe must be part of the students' data
    kl_rows = tmp_path / "kl.json"
    kl_rows.write_text(json.dumps([{**rows[0], "students": "kl"}]))
    with pytest.raises(SystemExit, match="mix"):
        recovery.main(["--report-only", str(out), str(kl_rows), "--no-write"])


def test_students_on_sampled_labels_stop_when_their_own_held_out_labels_stop_improving(recovery, teacher_data,
                                                                                         monkeypatch):
    """Scripted stopping losses 3, 2, 2.5, 2.6: training ends at the fourth check (``STOP_PATIENCE`` = 2 misses
    after the best) and the adapter kept is the one of the second check, the best."""
    ids, targets = teacher_data
    labels = torch.tensor([e["labels"] for e in recovery.sampled_examples(ids, targets, seed=0)])
    students, snapshots, scripted = [], [], iter([3.0, 2.0, 2.5, 2.6, 1.0])
    inject, sampled_ce = recovery.moela.inject, recovery.sampled_ce

    def recording_inject(*args, **kwargs):
        students.append(inject(*args, **kwargs))
        return students[-1]

    def scripted_ce(logits, labels):
        if torch.is_grad_enabled():
            return sampled_ce(logits, labels)
        snapshots.append([p.detach().clone() for p in students[-1].parameters() if p.requires_grad])
        return torch.tensor(next(scripted))

    monkeypatch.setattr(recovery.moela, "inject", recording_inject)
    monkeypatch.setattr(recovery, "sampled_ce", scripted_ce)
    monkeypatch.setattr(recovery, "STOP_EVERY", 1)
    monkeypatch.setattr(recovery, "STOP_PATIENCE", 2)
    plan = recovery.allocate("uniform", recovery.load_base(), targets="all-linear", budget="uniform:E=1,r=2")
    loss = recovery.train_student(plan, ids, targets, ids, targets, seed=0, steps=50, batch=4, lr=1e-2,
                                  labels=labels)
    assert len(snapshots) == 4 and loss > 0
    kept = [p for p in students[-1].parameters() if p.requires_grad]
    assert all(torch.equal(k, b) for k, b in zip(kept, snapshots[1]))
    assert not all(torch.equal(k, b) for k, b in zip(kept, snapshots[3]))
