"""The run report's computed parts: memorisation distances and the claims sentences, against hand values."""

import torch

from meta_vqa.eval.claims import claims
from meta_vqa.eval.report import memorisation, nearest_distances


def test_memorisation_distances_by_hand():
    train = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    t = {
        "train": train,
        "generated": torch.tensor([[0.0, 1.0], [3.0, 4.0]]),  # distances 1 and 0
        "test_adapted": torch.tensor([[0.0, 2.0], [6.0, 8.0]]),  # distances 2 and 5
    }
    m = memorisation(t)
    assert m["generated_to_train"] == 0.5 and m["test_adapted_to_train"] == 3.5
    assert abs(m["ratio"] - 0.5 / 3.5) < 1e-12
    assert m["train_spacing"] == 5.0  # each training latent's nearest other one
    assert nearest_distances(train, train).tolist() == [0.0, 0.0]


def _rec(method, acc, shots=0, seed=0, **extra):
    return {"method": method, "split": "random", "shots": shots, "seed": seed, "accuracy": acc,
            "accuracy_pooled": acc, "n_tasks": 10, **extra}  # fmt: skip


def _ldm(acc_by_gamma, seed=0, shuffled=None, empty=None):
    recs = [
        _rec("hnet_hyperldm", acc, seed=seed, gamma=g, control="aligned") for g, acc in acc_by_gamma.items()
    ]
    if shuffled is not None:
        recs.append(_rec("hnet_hyperldm", shuffled, seed=seed, gamma=1.0, control="shuffled"))
    if empty is not None:
        recs.append(_rec("hnet_hyperldm", empty, seed=seed, gamma=1.0, control="empty"))
    return recs


def test_one_seed_claims_name_the_strongest_baseline_and_have_no_spread():
    recs = [_rec("uncond_multitask", 60.0), _rec("mnet_maml", 70.0), _rec("cond_multitask", 90.0)]
    recs += [_rec("hnet_maml", 55.0), _rec("hnet_maml", 95.0, shots="full")]
    recs += _ldm({0.0: 50.0, 1.0: 65.0, 2.0: 68.0}, shuffled=51.0, empty=50.0)
    recs.append(_rec("hnet_combined", 64.0, gamma=1.0, control="aligned", classifier_scale=1.0))
    text = claims(recs)
    assert "### random split (1 seed)" in text and "no difference is significant" in text
    # the guided table: vs empty +15.0, vs shuffled +14.0, vs the strongest baseline (cond_multitask) -25.0
    assert "| hnet_hyperldm γ=1 | 65.0 | +15.0 | +14.0 | -25.0 |" in text
    # from the floor (γ=0: 50) to the ceiling (hnet_maml whole support: 95): (65 - 50) / 45 = 33 %
    assert "50.0 (γ=0) → 95.0 (hnet_maml, whole support) | 33 % |" in text
    assert "above (one seed, no spread) uncond_multitask 60.0 (+5.0)" in text
    assert "below (one seed, no spread) mnet_maml 70.0 (-5.0)" in text
    assert "the strongest baseline of the table, cond_multitask 90.0" in text
    assert "γ=2 68.0 is above (one seed, no spread)" in text and "combined guidance s=1 64.0 is below" in text
    # shuffled 51 loses (65 - 51) / (65 - 50) = 93 % of the gain over γ=0
    assert "loses 93% of the gain over unconditional sampling, falling back towards" in text
    no_shuffled = [r for r in recs if r.get("control") != "shuffled"]
    assert "does as well as the task's own" in claims(no_shuffled + _ldm({}, shuffled=64.0))  # loses 7 %
    assert "keeps 60% of the gain" in claims(no_shuffled + _ldm({}, shuffled=59.0))  # loses 6 / 15
    assert "does better than the task's own" in claims(no_shuffled + _ldm({}, shuffled=70.0))


def test_several_seeds_judge_differences_by_their_spread():
    recs = []
    for seed, (a, e) in enumerate(((70.0, 50.0), (72.0, 51.0), (71.0, 52.0))):  # aligned − empty: 20, 21, 19
        recs += _ldm({0.0: e, 1.0: a}, seed=seed, empty=e)
        recs.append(_rec("uncond_multitask", a - 0.5 + seed, seed=seed))  # differences 0.5, -0.5, -1.5
    text = claims(recs)
    assert "### random split (3 seeds)" in text
    assert "| hnet_hyperldm γ=1 | 71.0 ± 1.0 | +20.0 ± 1.0 |" in text
    assert "within the seed spread of uncond_multitask" in text


def test_a_guided_method_identical_to_its_generator_is_flagged():
    recs = [_rec("hvae", 60.0), _rec("hvae", 61.0, shots="full")]
    recs += [
        _rec("hvae_hyperclip", 60.0, control="aligned"),
        _rec("hvae_hyperclip", 61.0, shots="full", control="aligned"),
    ]
    recs.append(_rec("hvae_hyperclip", 60.0, control="empty"))
    diag = [
        {
            "method": "hvae_hyperclip",
            "split": "random",
            "seed": 0,
            "retrieval_acc": 3.1,
            "retrieval_chance": 10.0,
        }
    ]
    text = claims(recs, diag)
    assert "hvae_hyperclip equals its generator hvae in every column" in text
    assert "retrieval of the task's own question 3.1 % against chance 10.0 %" in text
    # told apart on validation, not on the test tasks: a different message
    held_out = claims(recs, [dict(diag[0], val_retrieval_acc=50.0)])
    assert "3.1 % against chance 10.0 % on the test tasks, 50.0 % on the validation tasks" in held_out
    assert "does not tell the tasks apart" not in held_out
    healthy = [dict(r, accuracy=r["accuracy"] + 5) if r["method"] == "hvae_hyperclip" else r for r in recs]
    assert "Stages that look broken" not in claims(healthy, [dict(diag[0], retrieval_acc=60.0)])


def test_cond_hnet_maml_is_a_candidate_strongest_baseline_not_a_paper_baseline():
    """Conditional HNet-MAML reads the question: the claims compare guided methods with it as the strongest
    baseline of the table when it leads, never as one of the paper's unconditional baselines."""
    from meta_vqa.eval.methods import BASELINES, GUIDED, METHOD_ORDER

    assert METHOD_ORDER.index("cond_hnet_maml") == METHOD_ORDER.index("hnet_maml") + 1
    assert "cond_hnet_maml" not in BASELINES + GUIDED
    recs = [_rec("uncond_multitask", 60.0), _rec("cond_multitask", 80.0), _rec("cond_hnet_maml", 85.0)]
    recs += [_rec("hnet_maml", 55.0), _rec("hnet_maml", 95.0, shots="full")]
    recs += _ldm({0.0: 50.0, 1.0: 65.0}, empty=50.0)
    text = claims(recs)
    assert "| hnet_hyperldm γ=1 | 65.0 | +15.0 |  | -20.0 |" in text  # − cond_hnet_maml
    assert "the strongest baseline of the table, cond_hnet_maml 85.0" in text


def test_report_logs_chance_and_majority_once_and_writes_only_under_its_folder(tmp_path):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from meta_vqa.eval.report import build_report

    run = tmp_path / "run"
    for stage in ("hnet", "hvae"):  # every stage writes the same reference rows
        recs = [_rec("chance", 50.0), _rec("majority", 55.0, shots=1), _rec(f"{stage}_x", 70.0)]
        (run / stage).mkdir(parents=True)
        (run / stage / "results.json").write_text(json.dumps(recs))
    before = sorted(p for p in run.rglob("*"))
    build_report(run, tmp_path / "out", plots=False)
    assert sorted(p for p in run.rglob("*")) == before
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert sorted(tags) == ["reference/random/chance/acc_0", "reference/random/majority/acc_1"]
    assert [e.value for e in events.Scalars("reference/random/chance/acc_0")] == [50.0]
