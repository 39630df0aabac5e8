"""A tiny random-weight Llama saved locally (nothing is downloaded): 2 layers, hidden 128, 2
attention heads, 1 KV head (head_dim 64, which the CPU attention backend supports)."""

import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

config = LlamaConfig(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=1024,
)
torch.manual_seed(0)
LlamaForCausalLM(config).save_pretrained(sys.argv[1])
