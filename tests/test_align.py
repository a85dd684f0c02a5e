"""clipita.align: the e-CLIP model (packaged EfficientNet-Lite0 + the shipped MiniLM as open_clip's HF tower), what
each mode trains, GradCache's exact chunked gradient (one process and two), and open_clip-loadable checkpoints."""
import shutil
import socket

import open_clip
import pytest
import torch

from clipita import align
from clipita.config import ConfigError, load_config
from clipita.loss import ContrastiveLoss

OFFLINE = "configs/offline.yaml"
TITLES = ["red leather ankle boots", "blue denim jacket", "red leather ankle boots", "wool scarf",
          "white running shoes", "silver ring", "black leather handbag", "green cotton t-shirt"]
GROUPS = ["g1", "", "", "", "g1", "", "", ""]  # rows 0 and 4: one product listed twice; 0 and 2: the same title


@pytest.fixture(scope="module")
def cfg():
    return load_config(OFFLINE)


@pytest.fixture(scope="module")
def model(cfg):
    return align.build_model(cfg.encoders, cfg.align)


def _batch(n: int = 8, size: int = 64):
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 3, size, size, generator=g), TITLES[:n]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_offline_model_is_open_clip_with_the_packaged_towers(cfg, model):
    assert align.text_tower(cfg.encoders, cfg.align) == "hf"
    assert isinstance(model, open_clip.CustomTextCLIP)
    # the image trunk holds the package's ImageNet weights (as the frozen encoder's), the text trunk MiniLM's
    from clipita.encoders import ImageEncoder, TextEncoder

    frozen = ImageEncoder(cfg.encoders).model.visual.trunk.state_dict()
    for k, v in model.visual.trunk.state_dict().items():
        torch.testing.assert_close(v, frozen[k], msg=k)
    bert = TextEncoder(cfg.encoders).model.state_dict()
    ours = model.text.transformer.state_dict()
    assert ours.keys() <= bert.keys() and all(torch.equal(ours[k], bert[k]) for k in ours)
    assert model.logit_scale.exp().item() == pytest.approx(1 / cfg.align.tau, rel=1e-5)


def test_modes_train_what_they_say(model):
    lock = align.set_trainable(model, "lock", "lock")
    d = load_config(OFFLINE).align.embed_dim
    assert lock == {"image": 1280 * d, "text": 384 * d}  # the two projections
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"logit_scale", "visual.head.proj.weight", "text.proj.weight"}
    partial = align.set_trainable(model, "partial", "partial")
    full = align.set_trainable(model, "full", "full")
    for side in ("image", "text"):
        assert lock[side] < partial[side] < full[side]
    assert full["image"] + full["text"] + 1 == sum(p.numel() for p in model.parameters())
    assert any(n.startswith("text.transformer.encoder.layer.5.") for n, p in model.named_parameters()
               if p.requires_grad)
    with pytest.raises(align.AlignError, match="align.image_train must be one of"):
        align.set_trainable(model, "most", "lock")
    with pytest.raises(ConfigError, match="align.text_train must be one of lock, partial, full"):
        load_config(None, {"align.text_train": "half"})


@pytest.mark.parametrize("image_mode,text_mode", [("lock", "lock"), ("partial", "partial")])
def test_chunked_gradient_equals_the_whole_batch(cfg, model, image_mode, text_mode):
    """GradCache: 3 chunks of an 8-pair batch (uneven: 3 + 3 + 2) give the unchunked step's loss and gradients,
    BatchNorm included (partial trains the trunk's last stage, its statistics stay the pre-trained ones)."""
    images, tok, labels = _prepared(model, cfg, image_mode, text_mode)
    loss = ContrastiveLoss(label_mask=True)
    out = {}
    for chunk in (0, 3):
        model.zero_grad(set_to_none=True)
        value = align.GradCacheStep(model, loss, chunk=chunk)(images, tok, labels)
        out[chunk] = (value, _grads(model))
    assert out[3][0] == pytest.approx(out[0][0], rel=1e-5)
    assert out[0][1].keys() == out[3][1].keys() and "logit_scale" in out[0][1]
    for name, g in out[0][1].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(out[3][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_group_labels_mask_duplicate_listings():
    labels = align.group_labels(GROUPS, TITLES).tolist()
    assert labels[0] == labels[4]  # the same group
    assert labels[2] != labels[0]  # row 0 has a group: its group, not its title, says which product it is
    assert len(set(labels)) == 7
    same = align.group_labels(["", ""], ["A shoe ", "a shoe"]).tolist()
    assert same[0] == same[1]  # no group: identical titles
    assert align.group_labels(GROUPS, TITLES).tolist() == labels  # stable: the same keys on every worker


def _prepared(model, cfg, image: str, text: str):
    """The model set to train ``image`` / ``text`` in alignment's mode, and the test batch: images, tokens, labels."""
    align.set_trainable(model, image, text)
    align.train_mode(model)
    images, titles = _batch()
    return images, align.tokenizer(cfg.encoders, cfg.align)(titles), align.group_labels(GROUPS, titles)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = load_config(OFFLINE)
        model = align.build_model(cfg.encoders, cfg.align)
        images, tok, labels = _prepared(model, cfg, "lock", "partial")
        half = slice(rank * 4, (rank + 1) * 4)
        loss = align.GradCacheStep(model, ContrastiveLoss(label_mask=True), chunk=2)(
            images[half], tok[half], labels[half])
        torch.save({"loss": loss, "grads": _grads(model)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_workers_of_b_equal_one_of_2b(cfg, model, tmp_path):
    """2 processes x 4 pairs, each in chunks of 2, gathered: the loss and gradient of 1 process x 8 pairs."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    images, tok, labels = _prepared(model, cfg, "lock", "partial")
    model.zero_grad(set_to_none=True)
    full = align.GradCacheStep(model, ContrastiveLoss(label_mask=True))(images, tok, labels)
    want = _grads(model)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(full, rel=1e-5)
    for name, g in want.items():
        for r in range(2):
            torch.testing.assert_close(ranks[r]["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_steps_pull_pairs_together(cfg):
    """A few lock-mode steps on 8 pairs: the loss falls and each title's nearest image becomes its own."""
    model = align.build_model(cfg.encoders, cfg.align)
    images, tok, labels = _prepared(model, cfg, "lock", "lock")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step = align.GradCacheStep(model, ContrastiveLoss(label_mask=True), chunk=4)
    losses = []
    for _ in range(15):
        opt.zero_grad(set_to_none=True)
        losses.append(step(images, tok, labels))
        opt.step()
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    with torch.no_grad():
        sim = model.encode_text(tok, normalize=True) @ model.encode_image(images, normalize=True).T
    best = sim.argmax(1).tolist()
    assert sum(b == i or labels[b] == labels[i] for i, b in enumerate(best)) >= 7


def test_checkpoint_loads_in_open_clip_and_from_a_copied_folder(cfg, model, tmp_path):
    model.eval()
    images, titles = _batch(2)
    with torch.no_grad():
        model.visual.head.proj.weight.add_(0.01)  # not the build's weights: the file must carry them
        want_t = model.encode_text(align.tokenizer(cfg.encoders, cfg.align)(titles), normalize=True)
        want_i = model.encode_image(images, normalize=True)
    folder = align.save_checkpoint(model, str(tmp_path / "best"), cfg.encoders, cfg.align, {"epoch": 3})
    loaded = open_clip.create_model(f"local-dir:{folder}").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images, normalize=True), want_i, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded.encode_text(open_clip.get_tokenizer(f"local-dir:{folder}")(titles),
                                                      normalize=True), want_t, rtol=1e-5, atol=1e-6)
    moved = shutil.copytree(folder, tmp_path / "elsewhere")
    shutil.rmtree(folder)
    again = align.load_checkpoint(str(moved))
    with torch.no_grad():
        torch.testing.assert_close(again.encode_text(open_clip.get_tokenizer(f"local-dir:{moved}")(titles), normalize=True), want_t,
                                   rtol=1e-5, atol=1e-6)


def test_own_text_tower_of_a_clip_model(tmp_path):
    """A CLIP model (here clipita-tiny, random init) keeps its own text tower: lock trains the two projections,
    partial adds each tower's last block, and the checkpoint round-trips through open_clip's local-dir."""
    from clipita.config import AlignConfig, EncoderConfig

    enc, acfg = EncoderConfig(image_model="clipita-tiny", image_pretrained=""), AlignConfig(text_tower="own")
    model = align.build_model(enc, acfg)
    assert type(model) is open_clip.CLIP
    lock = align.set_trainable(model, "lock", "lock")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"logit_scale", "visual.proj",
                                                                           "text_projection"}
    assert lock == {"image": model.visual.proj.numel(), "text": model.text_projection.numel()}
    partial = align.set_trainable(model, "partial", "partial")
    assert all(lock[s] < partial[s] for s in lock)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "ln_final.weight" in names and "visual.ln_post.weight" in names
    model.eval()
    tok = align.tokenizer(enc, acfg)(TITLES[:2])
    folder = align.save_checkpoint(model, str(tmp_path / "own"), enc, acfg)
    with torch.no_grad():
        torch.testing.assert_close(align.load_checkpoint(folder).encode_text(tok), model.encode_text(tok))
