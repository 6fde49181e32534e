"""Tiny random Llama checkpoints (real safetensors + a real byte-level tokenizer) for unit tests."""
from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters. "
) * 4


def make_tokenizer(path: Path, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


def make_tiny_llama(path: Path, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=384,
                    tie=False, dtype=torch.float32, seed=0, head_dim=None, arch="llama") -> Path:
    """Random Llama (or Qwen2 with arch='qwen2') saved as safetensors, with outlier-ish weights and non-unit norms."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
              tie_word_embeddings=tie, max_position_embeddings=512, rms_norm_eps=1e-5,
              bos_token_id=0, eos_token_id=0)
    if head_dim:
        kw["head_dim"] = head_dim
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif p.dim() == 2:
                p.normal_(0, 0.08)
                p[:, :3] *= 6  # a few outlier input channels, as in trained models
            else:
                p.normal_(0, 0.05)
    model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer(path)
    return Path(path)


def random_qlayer(act_bits, group, rotation, n, out=96, seed=0):
    """(int4 codes [out, M], scales [out, 1 | M/group], H_K or None) of a random quantized linear with N = `n`
    inputs, M = rotation[0] (expanded) or n; `rotation` is (size, k, blocks) or None."""
    from vllm_qexpand.hadamard import hadamard_k

    g = torch.Generator().manual_seed(seed)
    m = rotation[0] if rotation else n
    codes = torch.randint(-8, 8, (out, m), generator=g, dtype=torch.int8)
    scale = torch.rand(out, m // group if group else 1, generator=g) * 0.02 + 0.001
    hk = hadamard_k(rotation[1]).float() if rotation else None
    return codes, scale, hk


def reference_outputs(path, prompts, new_tokens):
    """(prompt log-probs of each next prompt token, greedy continuation of `new_tokens`) of each prompt
    (token ids) in the torch reference (eval.reference.load_model(path)), float32."""
    from vllm_qexpand.eval.reference import load_model

    ref = load_model(path)
    lps, greedy = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            lp = torch.log_softmax(ref(ids).logits[0].float(), -1)
            lps.append(lp[torch.arange(len(p) - 1), ids[0, 1:]])
            seq = list(p)
            for _ in range(new_tokens):
                seq.append(int(ref(torch.tensor([seq])).logits[0, -1].argmax()))
            greedy.append(seq[len(p):])
    return lps, greedy
