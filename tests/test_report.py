"""The run report's computed parts: memorisation distances and the claims sentences, against hand values."""

import torch

from meta_vqa.eval.report import claims, memorisation, nearest_distances
from meta_vqa.eval.results import aggregate


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


def test_claims_sentences_follow_the_numbers():
    recs = [_rec("uncond_multitask", 60.0), _rec("mnet_maml", 70.0)]
    for g, acc in ((0.0, 50.0), (1.0, 65.0), (2.0, 68.0)):
        recs.append(_rec("hnet_hyperldm", acc, gamma=g, control="aligned"))
    recs.append(_rec("hnet_hyperldm", 51.0, gamma=1.0, control="shuffled"))
    recs.append(_rec("hnet_combined", 64.0, gamma=1.0, control="aligned", classifier_scale=1.0))
    recs.append(_rec("hvae_hyperldm", 99.0, gamma=0.0, control="aligned"))  # unconditional: not guidance
    text = claims(aggregate(recs))
    assert "Best guided zero-shot: hnet_hyperldm γ=2 68.0" in text
    assert "Above uncond_multitask 60.0" in text and "Not above mnet_maml 70.0" in text
    assert "CFG γ=2 68.0 is above γ=1 65.0" in text and "combined s=1 64.0 is not above γ=1" in text
    assert "falls back to the unconditional level, so the description is used" in text
    # a shuffled description as good as the aligned one: the text is not what drives the result
    i = next(i for i, r in enumerate(recs) if r.get("control") == "shuffled")
    recs[i] = _rec("hnet_hyperldm", 64.0, gamma=1.0, control="shuffled")
    assert "the description is not what drives the result" in claims(aggregate(recs))
