"""Training the VLM: stages, AdamW with warmup + cosine decay, gradient accumulation, bf16
autocast, atomic checkpoints with exact resume, and DDP or FSDP under torchrun.

    trainer = Trainer(vlm, dataset, TrainConfig(stage="finetune", steps=1000, out_dir="runs/a"))
    trainer.fit()                       # resumes from runs/a/checkpoint.pt when it exists

Stages: ``align`` trains the connector only; ``finetune`` and ``one-stage`` (the study's
recipe: a fresh connector and the LM trained together) train the connector and the LM. The
encoder is always frozen.

A dataset is any sequence of (image (3, S, S) tensor, prompt, answer). The samples of step s
are a function of (seed, s) alone, so a run killed after a checkpoint and resumed sees the same
batches, in the same order, with the same optimizer, scheduler and RNG state, and so gives the
same loss curve as an uninterrupted run.

Under torchrun (WORLD_SIZE > 1) each rank takes its share of every global batch and the loss
is normalised by the global count of answer tokens, so the update equals the single-process
one. ``parallel="ddp"`` (the default) keeps a full copy of the model on every rank and wraps it
in DistributedDataParallel; ``parallel="fsdp"`` shards the connector and the LM over the ranks
(FSDP2, ``shard_vlm``), for LMs that do not fit one device.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)

from pyssm.vlm.model import VisionLanguageModel, encoder_fingerprint
from pyssm.vlm.splice import IGNORE

STAGES = ("align", "finetune", "one-stage")
PARALLEL = ("ddp", "fsdp")
LOSS_WEIGHTINGS = ("token", "example")
# FSDP shards gathered to full tensors on rank 0's CPU, for writing (not one device's memory)
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    stage: str = "one-stage"
    steps: int = 100
    batch_size: int = 8               # global batch per optimizer step (all ranks, all micro-batches)
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    bf16: bool = False
    grad_checkpointing: bool = False
    seed: int = 0
    out_dir: str | None = None
    checkpoint_every: int = 0         # steps; 0: only at the end
    stop_after: int | None = None     # stop (as if killed) after this many steps; for tests
    parallel: str = "ddp"             # with several ranks: "ddp" replicates, "fsdp" shards
    # "token": the loss is the mean over all answer tokens of the global batch (LLaVA's);
    # "example": the mean over examples of each one's mean token loss, so a long answer (a
    # box is 17 tokens, "yes" 2) weighs no more than a short one, as in the benchmark's score
    loss_weighting: str = "token"


def lr_lambda(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def init_distributed() -> bool:
    """Joins the process group that torchrun describes (WORLD_SIZE > 1), unless one is already
    up: NCCL with the GPU LOCAL_RANK when CUDA is there, gloo on the CPU otherwise. Returns
    whether there are several ranks."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def shard_vlm(vlm: VisionLanguageModel) -> None:
    """Shards ``vlm`` in place over all ranks with FSDP2: each LM decoder layer is its own group,
    gathered only while it runs forward or backward; the VLM itself is the root group and holds
    the rest of the LM (embeddings, final norm, head) and the connector. The frozen encoder is
    left out (``ignored_params``): every rank keeps all of it and runs it under no_grad.

    The root is the VLM and not the LM because the VLM looks up the token embeddings and runs
    the connector before it calls the LM; with the LM as its own group the embedding weight is
    still sharded there (``aten.embedding.default got mixed torch.Tensor and DTensor``). The
    connector is small, so sharding it with the root costs nothing and keeps every gradient a
    DTensor, which clip_grad_norm_ needs (it cannot mix DTensors with plain tensors).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # shards live where the encoder runs (fully_shard moves the LM there, shard by shard)
    device = next(vlm.encoder.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # Hugging Face names the decoder layer classes in _no_split_modules
    names = set(getattr(vlm.lm, "_no_split_modules", None) or ())
    layers = [m for m in vlm.lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"parallel='fsdp' shards the LM per decoder layer, but "
                         f"{type(vlm.lm).__name__} names none in _no_split_modules")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(vlm, mesh=mesh, ignored_params=set(vlm.encoder.parameters()))


def answer_batch(vlm: VisionLanguageModel, prompts: Sequence[str], answers: Sequence[str],
                 device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and labels (the answer's tokens and EOS; IGNORE on the prompt
    and the padding) of prompt + answer for each pair, right-padded: what the VLM is trained
    on, and what ``evaluate`` scores an answer's likelihood with."""
    tok = vlm.tokenizer
    # two batched calls: one call per text cost ~15 ms a batch of 64 (the fast tokenizer's
    # per-call overhead), as long as a small LM's training step
    prompt_ids = tok([vlm.format_prompt(p) for p in prompts])["input_ids"]
    answer_ids = tok([f" {a}" for a in answers], add_special_tokens=False)["input_ids"]
    ids, labels = [], []
    for p, a in zip(prompt_ids, answer_ids):
        a = a + [tok.eos_token_id]
        ids.append(p + a)
        labels.append([IGNORE] * len(p) + a)
    n = max(len(x) for x in ids)
    pad = tok.pad_token_id
    mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids], device=device)
    input_ids = torch.tensor([x + [pad] * (n - len(x)) for x in ids], device=device)
    label_t = torch.tensor([x + [IGNORE] * (n - len(x)) for x in labels], device=device)
    return input_ids, mask, label_t


class Trainer:
    def __init__(self, vlm: VisionLanguageModel, dataset: Sequence, config: TrainConfig):
        if config.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {config.stage!r}")
        if config.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {config.parallel!r}")
        if config.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got "
                             f"{config.loss_weighting!r}")
        if config.batch_size % config.grad_accum:
            raise ValueError(f"batch_size {config.batch_size} must be a multiple of grad_accum "
                             f"{config.grad_accum}")
        self.vlm, self.dataset, self.config = vlm, dataset, config
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        micro = config.batch_size // config.grad_accum
        if micro % self.world:
            raise ValueError(f"a micro-batch of {micro} does not split over {self.world} ranks")
        vlm.lm.requires_grad_(config.stage != "align")
        vlm.connector.requires_grad_(True)
        if config.grad_checkpointing and config.stage != "align":
            # transformers 5 renamed it; older releases only have gradient_checkpointing_enable
            enable = (getattr(vlm.lm, "activation_checkpointing_enable", None)
                      or vlm.lm.gradient_checkpointing_enable)
            enable()
        self.fsdp = config.parallel == "fsdp" and self.world > 1
        self.model = vlm
        if self.fsdp:
            shard_vlm(vlm)        # replaces the parameters by their shards: collect them after
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.model = DistributedDataParallel(vlm)
        self.params = [p for p in vlm.parameters() if p.requires_grad]
        # every name of a trainable parameter, tied aliases too (the LM's head and embeddings)
        self.trainable_names = {n for n, p in vlm.named_parameters(remove_duplicate=False)
                                if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr,
                                           weight_decay=config.weight_decay)
        warmup = max(1, round(config.warmup_ratio * config.steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, config.steps, warmup))
        self.step = 0
        self.losses: list[float] = []
        torch.manual_seed(config.seed)
        random.seed(config.seed)

    # ---- data -------------------------------------------------------------------------------

    def batch_indices(self, step: int) -> list[int]:
        """The global batch of ``step``: consecutive slices of one permutation per epoch."""
        n, bs = len(self.dataset), self.config.batch_size
        start = step * bs
        out = []
        while len(out) < bs:
            epoch, offset = divmod(start + len(out), n)
            g = torch.Generator().manual_seed(self.config.seed * 100003 + epoch)
            order = torch.randperm(n, generator=g).tolist()
            out += order[offset:offset + bs - len(out)]
        return out

    def collate(self, indices: list[int]):
        """images, input_ids, attention_mask, labels (answer tokens + EOS only), right-padded."""
        items = [self.dataset[i] for i in indices]
        device = next(self.vlm.connector.parameters()).device
        texts = answer_batch(self.vlm, [p for _, p, _ in items], [a for *_, a in items],
                             device)
        return (torch.stack([image for image, *_ in items]).to(device), *texts)

    # ---- the loop -----------------------------------------------------------------------------

    def backward(self, step: int) -> float:
        """Accumulates into .grad the gradient of the mean loss of ``step``'s global batch
        (summed over micro-batches, divided by the global count of answer tokens, or of
        examples with ``loss_weighting="example"``) and returns that loss."""
        cfg = self.config
        indices = self.batch_indices(step)
        micro = cfg.batch_size // cfg.grad_accum
        batches = [self.collate(indices[k * micro:(k + 1) * micro][self.rank::self.world])
                   for k in range(cfg.grad_accum)]
        per_example = cfg.loss_weighting == "example"
        reduction = "sequence_sum" if per_example else "sum"
        n_total = torch.tensor(float(sum(
            int((b[3] != IGNORE).any(1).sum()) if per_example else int((b[3] != IGNORE).sum())
            for b in batches)))
        if self.world > 1:
            dist.all_reduce(n_total)
        self.model.train()
        total = torch.zeros(())
        for images, input_ids, mask, labels in batches:
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss_sum = self.model(images, input_ids, mask, labels,
                                      loss_reduction=reduction).loss
            # DDP and FSDP average gradients over ranks: scale so the result is sum / global
            # count. FSDP reduce-scatters after every micro-batch: skipping the sync until the
            # last one would keep full, unsharded gradients, which is what FSDP is there to avoid
            (loss_sum * self.world / n_total).backward()
            total += loss_sum.detach().float().cpu()
        if self.world > 1:
            dist.all_reduce(total)
        return float(total / n_total)

    def train_step(self) -> float:
        """One optimizer step over the global batch; returns its mean token loss."""
        loss = self.backward(self.step)
        if self.config.max_grad_norm:   # under FSDP the norm is over all ranks' shards
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss

    def fit(self) -> list[float]:
        cfg = self.config
        if cfg.out_dir and os.path.exists(os.path.join(cfg.out_dir, CHECKPOINT)):
            self.load_checkpoint(os.path.join(cfg.out_dir, CHECKPOINT))
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=self.step, disable=None if self.rank == 0 else True,
                   desc=f"{cfg.stage}", unit="step")
        start, tokens = time.perf_counter(), 0
        while self.step < cfg.steps:
            loss = self.train_step()
            self.losses.append(loss)
            tokens += cfg.batch_size
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{tokens / (time.perf_counter() - start):.1f}")
            bar.update(1)
            done = self.step == cfg.steps
            every = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
            stopping = cfg.stop_after is not None and self.step >= cfg.stop_after
            if cfg.out_dir and (done or every or stopping):
                self.save_checkpoint(os.path.join(cfg.out_dir, CHECKPOINT))
            if stopping:
                break
        bar.close()
        return self.losses

    # ---- checkpoints --------------------------------------------------------------------------

    def trainable_state(self) -> dict:
        """name -> value of every trainable parameter. Under FSDP the shards are gathered to
        full tensors on rank 0's CPU (other ranks get {}), so every rank must call it."""
        if self.fsdp:
            full = get_model_state_dict(self.vlm, options=GATHER)
            return {n: v for n, v in full.items() if n in self.trainable_names}
        names = {id(p): n for n, p in self.vlm.named_parameters()}
        return {names[id(p)]: p.detach().clone() for p in self.params}

    def connector_buffers(self) -> dict:
        """name -> value of the connector's buffers (Standardize's mean and std): not trained,
        but a resumed run needs them as they were (fit once, before training)."""
        return {n: b.detach().cpu().clone() for n, b in self.vlm.connector.named_buffers()}

    def save_checkpoint(self, path: str) -> None:
        """Everything a resume needs, written by rank 0 to a temporary file and renamed into
        place. Every rank must call it (under FSDP it gathers the shards); all return once the
        file is in place."""
        if self.fsdp or self.rank == 0:
            params = self.trainable_state()
            optimizer = (get_optimizer_state_dict(self.vlm, self.optimizer, options=GATHER)
                         if self.fsdp else self.optimizer.state_dict())
        if self.rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            state = {"step": self.step, "losses": self.losses, "config": asdict(self.config),
                     "encoder_fingerprint": encoder_fingerprint(self.vlm),
                     "fsdp": self.fsdp, "params": params, "optimizer": optimizer,
                     "connector_buffers": self.connector_buffers(),
                     "scheduler": self.scheduler.state_dict(),
                     "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
            tmp = f"{path}.tmp-{os.getpid()}"
            torch.save(state, tmp)
            os.replace(tmp, path)
        if self.world > 1:
            dist.barrier()

    def load_checkpoint(self, path: str) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)   # no pickled code
        saved, now = state["encoder_fingerprint"], encoder_fingerprint(self.vlm)
        if abs(saved - now) > 1e-6 * max(1.0, abs(saved)):
            raise ValueError(f"{path} was written with different (frozen) encoder weights; "
                             f"resume with the encoder the run started with")
        if state.get("fsdp", False) != self.fsdp:   # the optimizer state is keyed differently
            written = "under FSDP" if state.get("fsdp") else "without FSDP"
            raise ValueError(f"{path} was written {written}; resume it the same way")
        if self.fsdp:
            # every rank has read the full tensors; each keeps its own shard of them
            options = StateDictOptions(full_state_dict=True, strict=False)
            set_model_state_dict(self.vlm, state["params"], options=options)
            set_optimizer_state_dict(self.vlm, self.optimizer, state["optimizer"],
                                     options=options)
        else:
            params = dict(self.vlm.named_parameters())
            with torch.no_grad():
                for name, value in state["params"].items():
                    params[name].copy_(value)
            self.optimizer.load_state_dict(state["optimizer"])
        buffers = state.get("connector_buffers", {})
        if buffers:   # through load_state_dict, so Standardize knows its statistics are fit
            self.vlm.connector.load_state_dict(buffers, strict=False)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.losses = state["step"], list(state["losses"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])

    def save_model(self, path: str) -> None:
        """``vlm.save_pretrained(path)`` by rank 0, FSDP shards gathered first; every rank must
        call it, and all return once the folder is in place."""
        state = get_model_state_dict(self.vlm, options=GATHER) if self.fsdp else None
        if self.rank == 0:
            self.vlm.save_pretrained(path, state_dict=state)
        if self.world > 1:
            dist.barrier()
