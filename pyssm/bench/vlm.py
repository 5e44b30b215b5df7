"""VLM latency with each encoder: image encode (+ connector), prefill with the visual tokens,
time to first token, then decode tokens/s, the LM held fixed.

For each encoder and resolution, one VisionLanguageModel (fresh connector, random encoder
weights: speed does not depend on them) answers one prompt per image in the batch:
  encode_ms    encoder.tokens + connector (the encoder under no_grad, as in the VLM)
  prefill_ms   the LM's forward over the spliced sequence (visual + prompt tokens), with cache
  ttft_ms      measured as one call: encode, splice, prefill, argmax of the last logits
  decode       ``new_tokens`` greedy steps on the KV cache, each timed from a fresh prefill:
               ms per step and tokens/s (batch x steps / time)
LMs: "tiny" (the built-in toy Llama, the CPU default), "llama-1b" (a randomly initialised
1.1B-parameter Llama shape in bf16, the GPU default: a realistic prefill/decode cost without
downloading weights), or a local Hugging Face folder.
"""

from __future__ import annotations

import contextlib
import inspect
import time

import torch

from pyssm.bench.harness import _percentile
from pyssm import _extension
from pyssm.bench.encoders import KERNEL, visual_tokens

NOTES = [
    "ttft_ms: encode + connector + splice + prefill + first token, timed as one call; "
    "encode_ms and prefill_ms are the same stages timed alone.",
    "decode_tok_s = batch x new_tokens / decode time, greedy, KV cache, after a fresh prefill.",
    "Encoder and connector weights are random; the LM is named in the lm column.",
]
PROMPT = "what color is the circle left of the square ?"


def build_lm(lm: str, device: torch.device):
    """(causal LM, tokenizer) for "tiny", "llama-1b" or a local folder, on ``device``."""
    from pyssm.vlm.recipes import load_lm

    if lm == "llama-1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        from pyssm.data import vocabulary
        from pyssm.vlm.tiny_lm import build_word_tokenizer

        tokenizer = build_word_tokenizer(vocabulary())
        config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                             num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                             max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        with torch.device(device):
            model = LlamaForCausalLM(config)
    else:
        model, tokenizer = load_lm(lm, "prismatic")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device, repeats: int, prepare=lambda: None) -> dict:
    """Median / p20 / p80 ms of ``fn(prepare())`` after one warm-up; prepare is untimed."""
    fn(prepare())
    times = []
    for _ in range(repeats):
        state = prepare()
        _sync(device)
        start = time.perf_counter()
        fn(state)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median": _percentile(times, 0.5), "p20": _percentile(times, 0.2),
            "p80": _percentile(times, 0.8)}


def measure_vlm(vlm, images: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    device = images.device
    tok = vlm.tokenizer
    batch = tok([PROMPT] * images.shape[0], return_tensors="pt").to(device)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    lm = vlm.lm
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    @torch.no_grad()
    def encode(_=None):
        with autocast:
            return vlm.encode_images(images)

    @torch.no_grad()
    def spliced():
        with autocast:
            feats = vlm.encoder.tokens(images)
        embeds, full_mask, _ = vlm.build_inputs(feats, ids, mask)
        return embeds.to(lm.dtype), full_mask

    @torch.no_grad()
    def prefill(state):
        embeds, full_mask = state
        return lm(inputs_embeds=embeds, attention_mask=full_mask, use_cache=True)

    @torch.no_grad()
    def first_token(_=None):
        with autocast:
            embeds, full_mask, _ = vlm.build_inputs(images, ids, mask)
        out = lm(inputs_embeds=embeds.to(lm.dtype), attention_mask=full_mask, use_cache=True)
        return out.logits[:, -1].argmax(-1)

    @torch.no_grad()
    def prefilled():
        embeds, full_mask = spliced()
        out = lm(inputs_embeds=embeds, attention_mask=full_mask, use_cache=True)
        return out, full_mask

    # transformers 5.x names the KV cache "cache"; earlier versions "past_key_values"
    cache_arg = ("cache" if "cache" in inspect.signature(lm.forward).parameters
                 else "past_key_values")

    @torch.no_grad()
    def decode(state):
        out, full_mask = state
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens):
            full_mask = torch.cat([full_mask, full_mask.new_ones(full_mask.shape[0], 1)], 1)
            out = lm(input_ids=token, attention_mask=full_mask, use_cache=True,
                     **{cache_arg: getattr(out, cache_arg)})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        return token

    enc = _median_ms(encode, device, repeats)
    pre = _median_ms(prefill, device, repeats, prepare=spliced)
    ttft = _median_ms(first_token, device, repeats)
    dec = _median_ms(decode, device, repeats, prepare=prefilled)
    b = images.shape[0]
    return {"encode_ms": enc["median"], "prefill_ms": pre["median"], "ttft_ms": ttft["median"],
            "ms_p20": ttft["p20"], "ms_p80": ttft["p80"],
            "decode_ms_per_token": dec["median"] / new_tokens,
            "decode_tok_s": b * new_tokens / dec["median"] * 1e3,
            "prompt_tokens": int(spliced()[1].shape[1])}


def run(device: torch.device, quick: bool = False, encoders: list[str] | None = None,
        lm: str | None = None, batch: int = 1, new_tokens: int | None = None,
        repeats: int | None = None, log=print) -> list[dict]:
    """A row per (encoder, resolution): the stage times above, or the reason it failed."""
    from pyssm.vlm import VisionLanguageModel, VLMConfig

    gpu = device.type == "cuda"
    lm = lm or ("llama-1b" if gpu else "tiny")
    encoders = encoders or ["vmamba_tiny_s1l8", "vit_small_patch16"]
    resolutions = ([224, 512] if quick else [224, 384, 512, 768]) if gpu else (
        [64] if quick else [64, 128])
    new_tokens = new_tokens or (8 if quick else 32)
    repeats = repeats or ((5 if quick else 10) if gpu else 3)
    model, tokenizer = build_lm(lm, device)
    rows = []
    for name in encoders:
        for res in resolutions:
            row = {"op": "vlm", "encoder": name, "provider": "pyssm", "mode": "generate",
                   "lm": lm, "res": res, "batch": batch, "new_tokens": new_tokens,
                   "tokens": visual_tokens(name, res), "dtype": "bf16" if gpu else "float32",
                   "device": device.type, "status": "ok"}
            family = name.split("_")[0]
            if gpu and not _extension.has_kernel(KERNEL[family], "cuda"):
                row["status"] = f"not built ({KERNEL[family]} has no cuda kernel yet)"
                log(f"  vlm {name} {res}px: {row['status']}")
                rows.append(row)
                continue
            try:
                vlm = VisionLanguageModel.from_config(
                    VLMConfig(encoder=name, image_size=res), model, tokenizer)
                vlm.encoder.to(device)
                vlm.connector.to(device=device, dtype=model.dtype)
                vlm.eval()
                torch.manual_seed(0)
                images = torch.randn(batch, 3, res, res, device=device)
                row.update(measure_vlm(vlm, images, new_tokens, repeats))
                row["ms"] = row["ttft_ms"]
            except Exception as exc:  # an OOM or a missing kernel is a row, not a crash
                row["status"] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
                if gpu:
                    torch.cuda.empty_cache()
            log(f"  vlm {name} {res}px: " + (f"TTFT {row['ttft_ms']:.1f} ms, decode "
                                             f"{row['decode_tok_s']:.0f} tok/s"
                                             if row.get("ttft_ms") else row["status"]))
            rows.append(row)
    return rows
