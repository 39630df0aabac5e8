"""The tiny random Llama of tests/vllm_app/make_model.py (nothing is downloaded), plus what a
Dynamo deployment needs and vLLM alone did not: a tokenizer (Dynamo's frontend tokenizes the
prompt itself, and routes by the token blocks). A byte-level BPE with the model's vocabulary size
(512) is trained here on a fixed text, so every run makes the same tokenizer; `<unk>`, `<s>`, `</s>`
get ids 0, 1, 2 (Llama's default pad/bos/eos ids), and a plain chat template is set for
/v1/chat/completions.

    python make_dynamo_model.py OUT_DIR
"""

import json
import runpy
import sys
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

out = Path(sys.argv[1])
saved_argv = sys.argv
sys.argv = [sys.argv[0], str(out)]
runpy.run_path(str(Path(__file__).resolve().parents[1] / "vllm_app" / "make_model.py"))
sys.argv = saved_argv

VOCAB = 512
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
TEXT = (
    "the cache stores blocks of keys and values so a prompt that shares a prefix with an earlier "
    "one skips the prefill of that prefix the router sends each request to the worker holding "
    "most of its blocks in memory on disk or in a remote tier and every worker publishes events "
    "when it stores or removes a block"
)
WORDS = TEXT.split()
# A fixed corpus (rotations of the text, word pairs, numbers), rich enough for the merges to fill
# the vocabulary: every id the model can emit is a token the frontend can decode.
corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
corpus += [f"{a}{b} {n}" for n, (a, b) in enumerate(zip(WORDS, reversed(WORDS), strict=True))]
corpus += [f"{n} {n * 7 % 1000} {WORDS[n % len(WORDS)]}" for n in range(1000)]

bpe = ByteLevelBPETokenizer()
bpe.train_from_iterator(
    corpus, vocab_size=VOCAB, min_frequency=1, special_tokens=["<unk>", "<s>", "</s>"]
)
assert bpe.get_vocab_size() == VOCAB, bpe.get_vocab_size()
assert [bpe.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]

tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=bpe._tokenizer,
    unk_token="<unk>",
    bos_token="<s>",
    eos_token="</s>",
    pad_token="<unk>",
    chat_template=CHAT_TEMPLATE,
    model_max_length=1024,
)
tokenizer.save_pretrained(out)
# The chat template inside tokenizer_config.json too (newer transformers write it to
# chat_template.jinja only; readers of tokenizer_config.json would miss it).
config_path = out / "tokenizer_config.json"
config = json.loads(config_path.read_text())
config["chat_template"] = CHAT_TEMPLATE
config_path.write_text(json.dumps(config, indent=2) + "\n")
