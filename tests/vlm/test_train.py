"""Training: stages, exact resume, gradient accumulation, 2-process DDP and FSDP (gloo, CPU)."""

import os
import shutil
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


def make_vlm(seed=0, standardize=False):
    torch.manual_seed(seed)
    tok = build_word_tokenizer(WORDS)
    lm = build_tiny_lm(tok, hidden_size=32, num_layers=1, max_positions=64)
    cfg = VLMConfig(encoder="vmamba_tiny_s1l8", encoder_kwargs={"depths": [1, 1, 1, 1], "dims": 8},
                    image_size=32, connector="linear", standardize_tokens=standardize)
    return VisionLanguageModel.from_config(cfg, lm, tok)


def fit_statistics(vlm):
    """Standardisation statistics from the training images, as the study fits them."""
    data = ColourData()
    vlm.fit_token_statistics(torch.stack([data[i][0] for i in range(len(data))]))
    return vlm


def trainable(vlm):
    return {n: p.detach().clone() for n, p in vlm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("standardize", [False, True])
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, standardize):
    """With standardize, the resumed process never fits the connector's statistics: they must
    come from the checkpoint (an unfit Standardize raises, wrong ones change the losses)."""
    cfg = dict(steps=8, batch_size=4, lr=1e-2, seed=3)
    prepare = fit_statistics if standardize else (lambda vlm: vlm)
    straight = Trainer(prepare(make_vlm(standardize=standardize)), ColourData(),
                       TrainConfig(out_dir=str(tmp_path / "a"), **cfg))
    want = straight.fit()
    first = Trainer(prepare(make_vlm(standardize=standardize)), ColourData(),
                    TrainConfig(out_dir=str(tmp_path / "b"), stop_after=3, **cfg))
    assert len(first.fit()) == 3
    resumed_vlm = make_vlm(standardize=standardize)   # a fresh process: the same frozen
    with torch.no_grad():                     # encoder, and trainable weights that must come
        for p in resumed_vlm.parameters():    # from the file
            if p.requires_grad:
                p.add_(1.0)
    resumed = Trainer(resumed_vlm, ColourData(), TrainConfig(out_dir=str(tmp_path / "b"), **cfg))
    got = resumed.fit()
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)
    for name, value in trainable(straight.vlm).items():
        torch.testing.assert_close(dict(resumed_vlm.named_parameters())[name], value)
    for name, value in straight.vlm.connector.named_buffers():
        torch.testing.assert_close(dict(resumed_vlm.connector.named_buffers())[name], value)
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


def test_example_weighting_is_the_mean_of_each_examples_mean_token_loss():
    """loss_weighting="example": every example counts once however long its answer (here
    "red" and "it is blue"), with any number of micro-batches."""
    results = []
    for accum in (1, 2, 4):
        vlm = make_vlm()
        trainer = Trainer(vlm, ColourData(), TrainConfig(steps=1, batch_size=4, grad_accum=accum,
                                                         loss_weighting="example"))
        results.append((trainer.backward(0), grads(vlm)))
    vlm = make_vlm()
    trainer = Trainer(vlm, ColourData(), TrainConfig(steps=1, batch_size=4))
    batch = trainer.collate(trainer.batch_indices(0))
    per_example = [vlm(*(t[i:i + 1] for t in batch)).loss for i in range(4)]
    assert per_example[0].item() != pytest.approx(per_example[1].item())
    loss = torch.stack(per_example).mean()
    loss.backward()
    token_mean = Trainer(make_vlm(), ColourData(), TrainConfig(steps=1, batch_size=4)).backward(0)
    assert token_mean != pytest.approx(loss.item(), rel=1e-3)    # the two weightings differ
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_gradient_matches_single_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, free_port(), out), nprocs=2, join=True)
    vlm = make_vlm()
    Trainer(vlm, ColourData(), TrainConfig(steps=1, batch_size=4)).backward(0)
    ddp = torch.load(out)
    for name, value in grads(vlm).items():
        torch.testing.assert_close(ddp[name], value, atol=1e-7, rtol=1e-4)


FSDP_RUN = dict(steps=3, batch_size=4, grad_accum=2, lr=1e-2, seed=3)


def _fsdp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    cfg = TrainConfig(parallel="fsdp", out_dir=out_dir, **FSDP_RUN)
    probe = Trainer(make_vlm(), ColourData(), TrainConfig(parallel="fsdp", **FSDP_RUN))
    probe.backward(0)       # Adam hides a wrongly scaled gradient: compare the gradient itself
    full = {n: p.grad.full_tensor() for n, p in probe.vlm.named_parameters() if p.requires_grad}
    if rank == 0:
        torch.save(full, os.path.join(out_dir, "grads.pt"))
    first = Trainer(make_vlm(), ColourData(), TrainConfig(**{**vars(cfg), "stop_after": 1}))
    first.fit()                                  # one step, then a checkpoint, as if killed
    assert type(first.params[0]).__name__ == "DTensor"     # sharded indeed
    if rank == 0:                                # kept: the run overwrites it at step 3
        shutil.copy(os.path.join(out_dir, "checkpoint.pt"), os.path.join(out_dir, "step1.pt"))
    resumed_vlm = make_vlm()                     # trainable weights that must come from the file
    with torch.no_grad():
        for p in resumed_vlm.parameters():
            if p.requires_grad:
                p.add_(1.0)
    resumed = Trainer(resumed_vlm, ColourData(), cfg)
    losses = resumed.fit()                       # steps 2 and 3, after the one from the file
    resumed.save_model(os.path.join(out_dir, "model"))
    if rank == 0:
        torch.save(losses, os.path.join(out_dir, "losses.pt"))
    dist.destroy_process_group()


def test_two_process_fsdp_matches_single_process_and_resumes_exactly(tmp_path):
    """2 ranks, LM and connector sharded, 2 micro-batches: the first step's gradient, loss and
    updated weights (read from the checkpoint, gathered from the shards) equal one process's;
    resuming from it gives the losses of an uninterrupted run (Adam's moments came back too),
    and the saved model holds the final weights."""
    out_dir = str(tmp_path / "fsdp")
    os.makedirs(out_dir)
    mp.spawn(_fsdp_worker, args=(2, free_port(), out_dir), nprocs=2, join=True)
    one = make_vlm()
    Trainer(one, ColourData(), TrainConfig(**FSDP_RUN)).backward(0)
    fsdp_grads = torch.load(os.path.join(out_dir, "grads.pt"))
    for name, value in grads(one).items():
        # float32 sums in another order (reduce-scatter): a few 1e-7 apart near zero
        torch.testing.assert_close(fsdp_grads[name], value, atol=1e-6, rtol=1e-4)
    after_one = Trainer(make_vlm(), ColourData(), TrainConfig(**FSDP_RUN))
    after_one.train_step()
    straight = Trainer(make_vlm(), ColourData(), TrainConfig(**FSDP_RUN))
    want = straight.fit()
    step1 = torch.load(os.path.join(out_dir, "step1.pt"), weights_only=False)
    assert step1["losses"] == pytest.approx(want[:1], rel=1e-5)
    for name, value in trainable(after_one.vlm).items():
        # Adam divides by sqrt(v): near-zero gradients turn summation-order noise into ~1e-6
        torch.testing.assert_close(step1["params"][name], value, atol=1e-5, rtol=1e-4)
    assert torch.load(os.path.join(out_dir, "losses.pt")) == pytest.approx(want, rel=1e-5)
    saved = VisionLanguageModel.from_pretrained(os.path.join(out_dir, "model"))
    for name, value in trainable(straight.vlm).items():
        torch.testing.assert_close(dict(saved.named_parameters())[name], value,
                                   atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="written under FSDP; resume it the same way"):
        Trainer(make_vlm(), ColourData(),
                TrainConfig(out_dir=out_dir, **{**FSDP_RUN, "steps": 4})).fit()


def test_bad_training_config():
    with pytest.raises(ValueError, match="stage must be one of"):
        Trainer(make_vlm(), ColourData(), TrainConfig(stage="pretrain"))
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        Trainer(make_vlm(), ColourData(), TrainConfig(batch_size=5, grad_accum=2))
    with pytest.raises(ValueError, match="parallel must be one of \\('ddp', 'fsdp'\\)"):
        Trainer(make_vlm(), ColourData(), TrainConfig(parallel="zero3"))
    with pytest.raises(ValueError, match="loss_weighting must be one of"):
        Trainer(make_vlm(), ColourData(), TrainConfig(loss_weighting="answer"))


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


def test_cached_tokens_are_recomputed_for_other_images_tap_or_dtype(tmp_path):
    """The token cache's fingerprint: a dataset of the same length with other images, another
    tap, another stored dtype, or a file from before the fingerprint held them (two values),
    are recomputed, not read back."""
    from safetensors.torch import load_file, save_file

    from pyssm.vlm.cache import cache_tokens

    class Brighter(ColourData):
        def __getitem__(self, i):
            img, prompt, answer = super().__getitem__(i)
            return img + 0.5, prompt, answer

    vlm = make_vlm()
    path = tmp_path / "tokens.safetensors"
    first = cache_tokens(vlm, ColourData(), path, dtype=torch.float32).tokens
    brighter = cache_tokens(vlm, Brighter(), path, dtype=torch.float32).tokens
    assert brighter.shape == first.shape and not torch.equal(brighter, first)
    assert torch.equal(cache_tokens(vlm, ColourData(), path, dtype=torch.float32).tokens, first)
    assert cache_tokens(vlm, ColourData(), path, dtype=torch.float16).tokens.dtype == torch.float16
    vlm.config.tap = 1  # (stage 2's tokens: another shape, read from the encoder again)
    assert cache_tokens(vlm, ColourData(), path, dtype=torch.float32).tokens.shape != first.shape
    vlm.config.tap = None
    save_file({"tokens": torch.zeros_like(first),
               "fingerprint": load_file(path)["fingerprint"][:2].contiguous()}, path)
    assert torch.equal(cache_tokens(vlm, ColourData(), path, dtype=torch.float32).tokens, first)
