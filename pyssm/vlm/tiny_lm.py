"""A tiny Llama-style causal LM and a word-level tokenizer, built from code (nothing is
downloaded): the LM of the tests and of the embedded default runs.

    tokenizer = build_word_tokenizer(["what", "color", "is", ...])
    lm = build_tiny_lm(tokenizer, hidden_size=64, num_layers=2)
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")


def build_word_tokenizer(words: Iterable[str]):
    """A PreTrainedTokenizerFast over ``words`` (split on whitespace and punctuation), with
    <pad>, <s> (prepended as BOS), </s>, <unk> and the <image> placeholder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", additional_special_tokens=["<image>"])


def build_tiny_lm(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                  max_positions: int = 512):
    """A randomly initialised LlamaForCausalLM sized for ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2), max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config)
