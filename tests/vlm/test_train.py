"""Training: stages, exact resume, gradient accumulation and 2-process DDP (gloo, CPU)."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pyssm.vlm import VisionLanguageModel, VLMConfig
from pyssm.vlm.tiny_lm import build_tiny_lm, build_word_tokenizer
from pyssm.vlm.train import Trainer, TrainConfig

WORDS = "what color is it ? red blue".split()
COLOURS = {"red": (1.0, -1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}


class ColourData:
    """(image, prompt, answer): a flat red or blue square with noise fixed by the index."""

    def __init__(self, n=16):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        name = "red" if i % 2 == 0 else "blue"
        g = torch.Generator().manual_seed(i)
        img = torch.tensor(COLOURS[name])[:, None, None].expand(3, 32, 32)
        answer = name if name == "red" else "it is blue"   # unequal token counts on purpose
        return img + 0.1 * torch.randn(3, 32, 32, generator=g), "what color is it ?", answer


def make_vlm(seed=0):
    torch.manual_seed(seed)
    tok = build_word_tokenizer(WORDS)
    lm = build_tiny_lm(tok, hidden_size=32, num_layers=1, max_positions=64)
    cfg = VLMConfig(encoder="vmamba_tiny_s1l8", encoder_kwargs={"depths": [1, 1, 1, 1], "dims": 8},
                    image_size=32, connector="linear")
    return VisionLanguageModel.from_config(cfg, lm, tok)


def trainable(vlm):
    return {n: p.detach().clone() for n, p in vlm.named_parameters() if p.requires_grad}


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    cfg = dict(steps=8, batch_size=4, lr=1e-2, seed=3)
    straight = Trainer(make_vlm(), ColourData(), TrainConfig(out_dir=str(tmp_path / "a"), **cfg))
    want = straight.fit()
    first = Trainer(make_vlm(), ColourData(),
                    TrainConfig(out_dir=str(tmp_path / "b"), stop_after=3, **cfg))
    assert len(first.fit()) == 3
    resumed_vlm = make_vlm()                  # a fresh process: the same frozen encoder, and
    with torch.no_grad():                     # trainable weights that must come from the file
        for p in resumed_vlm.parameters():
            if p.requires_grad:
                p.add_(1.0)
    resumed = Trainer(resumed_vlm, ColourData(), TrainConfig(out_dir=str(tmp_path / "b"), **cfg))
    got = resumed.fit()
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    for name, value in trainable(straight.vlm).items():
        torch.testing.assert_close(dict(resumed_vlm.named_parameters())[name], value)
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint.pt"]   # no temporaries left
    with pytest.raises(ValueError, match="different \\(frozen\\) encoder weights"):
        Trainer(make_vlm(seed=7), ColourData(),
                TrainConfig(out_dir=str(tmp_path / "b"), **{**cfg, "steps": 9})).fit()


def test_align_stage_trains_only_the_connector():
    vlm = make_vlm()
    lm_before = {n: p.detach().clone() for n, p in vlm.lm.named_parameters()}
    conn_before = [p.detach().clone() for p in vlm.connector.parameters()]
    losses = Trainer(vlm, ColourData(), TrainConfig(stage="align", steps=3, batch_size=4,
                                                    lr=1e-2)).fit()
    assert len(losses) == 3
    assert all(torch.equal(p, lm_before[n]) for n, p in vlm.lm.named_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(vlm.connector.parameters(), conn_before))


def grads(vlm):
    return {n: p.grad.detach().clone() for n, p in vlm.named_parameters() if p.requires_grad}


def test_gradient_accumulation_equals_the_mean_token_loss_of_the_whole_batch():
    """Micro-batches of unequal answer lengths: the accumulated gradient is the gradient of
    the mean over all answer tokens of the batch (what one big batch gives), not a mean of
    per-micro-batch means."""
    results = []
    for accum in (1, 2, 4):
        vlm = make_vlm()
        trainer = Trainer(vlm, ColourData(), TrainConfig(steps=1, batch_size=4, grad_accum=accum))
        results.append((trainer.backward(0), grads(vlm)))
    vlm = make_vlm()
    trainer = Trainer(vlm, ColourData(), TrainConfig(steps=1, batch_size=4))
    images, ids, mask, labels = trainer.collate(trainer.batch_indices(0))
    loss = vlm(images, ids, mask, labels).loss            # Hugging Face's mean token loss
    loss.backward()
    for got_loss, got in results:
        assert got_loss == pytest.approx(loss.item(), rel=1e-5)
        for name, value in grads(vlm).items():
            torch.testing.assert_close(got[name], value, atol=1e-7, rtol=1e-4)


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    vlm = make_vlm()
    Trainer(vlm, ColourData(), TrainConfig(steps=1, batch_size=4)).backward(0)
    if rank == 0:
        torch.save(grads(vlm), out)
    dist.destroy_process_group()


def test_two_process_ddp_gradient_matches_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, port, out), nprocs=2, join=True)
    vlm = make_vlm()
    Trainer(vlm, ColourData(), TrainConfig(steps=1, batch_size=4)).backward(0)
    ddp = torch.load(out)
    for name, value in grads(vlm).items():
        torch.testing.assert_close(ddp[name], value, atol=1e-7, rtol=1e-4)


def test_bad_training_config():
    with pytest.raises(ValueError, match="stage must be one of"):
        Trainer(make_vlm(), ColourData(), TrainConfig(stage="pretrain"))
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        Trainer(make_vlm(), ColourData(), TrainConfig(batch_size=5, grad_accum=2))


def test_gradient_checkpointing_and_bf16_autocast_run():
    vlm = make_vlm()
    losses = Trainer(vlm, ColourData(), TrainConfig(steps=2, batch_size=4, lr=1e-2,
                                                    grad_checkpointing=True, bf16=True)).fit()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert getattr(vlm.lm, "is_activation_checkpointing", None) or vlm.lm.is_gradient_checkpointing


def test_training_on_cached_tokens_matches_training_on_images(tmp_path):
    from pyssm.vlm.cache import cache_tokens

    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2)
    direct = Trainer(make_vlm(), ColourData(), cfg).fit()
    vlm = make_vlm()
    path = tmp_path / "tokens.safetensors"
    cached = cache_tokens(vlm, ColourData(), path, dtype=torch.float32)
    assert cached[0][0].shape == (4, 32)          # 32 px: 2 x 2 stage-3 tokens of 32 channels
    again = cache_tokens(vlm, ColourData(), path, dtype=torch.float32)   # read back, not recomputed
    assert torch.equal(again.tokens, cached.tokens)
    got = Trainer(vlm, cached, cfg).fit()
    assert got == pytest.approx(direct, rel=1e-5)
    other = make_vlm(seed=5)                      # another encoder: the file is not reused
    assert not torch.equal(cache_tokens(other, ColourData(), path, dtype=torch.float32).tokens,
                           cached.tokens)
